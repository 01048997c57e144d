"""GSPNAttnProcessor: what it hands the scan op (one dtype under autocast)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import gspn_diffusers
from gspn_diffusers import ops
from gspn_diffusers.ops import backend
from gspn_diffusers.tiny import tiny_pipeline


def tiny_unet_inputs(unet, height: int = 16, width: int = 24):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, height, width, generator=gen)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, text_dim, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    return sample, embeds, added


@pytest.fixture
def recorded_dtypes(monkeypatch):
    """Wrap the backend each op call resolves to, so every fused call records the dtypes of its tensor inputs."""
    calls: list[tuple[torch.dtype | None, ...]] = []
    resolve = ops.resolve_backend

    def recording_resolve(example):
        chosen = resolve(example)

        def scan_fused(*args, **kwargs):
            calls.append(tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in args[:6]))
            return chosen.scan_fused(*args, **kwargs)

        return backend.Backend(chosen.name, chosen.scan, scan_fused)

    monkeypatch.setattr(ops, "resolve_backend", recording_resolve)
    return calls


@pytest.fixture
def cuda_autocast_softplus(monkeypatch):
    """CPU autocast keeps softplus in the input dtype; CUDA autocast runs it in fp32 (its fp32 op list). Do the
    same here, so the CPU test sees the mixed dtypes a CUDA autocast step produces."""
    softplus = F.softplus

    def fp32_softplus(t, *args, **kwargs):
        return softplus(t.float() if torch.is_autocast_enabled("cpu") else t, *args, **kwargs)

    monkeypatch.setattr(F, "softplus", fp32_softplus)


def run_tiny_unet(device: str, autocast_dtype: torch.dtype | None) -> int:
    """One call of a converted tiny SD-XL UNet (fp32 weights), under autocast if a dtype is given; returns the
    number of GSPN layers."""
    unet = tiny_pipeline("sdxl").unet.to(device)
    gspn_diffusers.convert(unet)
    sample, embeds, added = tiny_unet_inputs(unet)
    sample, embeds = sample.to(device), embeds.to(device)
    added = {k: v.to(device) for k, v in added.items()}
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        out = unet(sample, 10, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert torch.isfinite(out).all()
    return len(gspn_diffusers.gspn_processors(unet))


def assert_one_activation_dtype(calls, expected: torch.dtype, layers: int) -> None:
    assert len(calls) == layers
    for x, lam, gates, u, merge, skip in calls:
        assert (x, lam, gates, u) == (expected,) * 4
        assert (merge, skip) == (torch.float32, torch.float32)  # fp32 parameters: the kernel reads them as they are


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_processor_hands_the_op_one_activation_dtype(recorded_dtypes, cuda_autocast_softplus, dtype):
    """x, lam, gates and u share the value's dtype under autocast (merge and skip stay fp32 parameters)."""
    layers = run_tiny_unet("cpu", dtype)
    assert_one_activation_dtype(recorded_dtypes, dtype or torch.float32, layers)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_hands_the_op_one_activation_dtype(recorded_dtypes, dtype):
    layers = run_tiny_unet("cuda", dtype)
    assert_one_activation_dtype(recorded_dtypes, dtype, layers)
