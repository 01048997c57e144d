"""GSPNAttnProcessor: what it hands the scan op (one dtype under autocast), and line-block inference."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import gspn_diffusers
from gspn_diffusers import GSPNConfig, line_block, ops
from gspn_diffusers import module as module_module
from gspn_diffusers.attention import to_gspn_attention
from gspn_diffusers.module import GSPNModule
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
    return len(gspn_diffusers.gspn_modules(unet))


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


def processor_case(chunk_size, gate_channels, normalize, use_skip=True, height=13, width=11, channels=8, seed=0):
    """A GSPN module with random non-zero gates on a diffusers Attention, and tokens of a height x width latent."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    attn = Attention(query_dim=channels, heads=2, dim_head=channels // 2).double()
    processor = GSPNModule(
        channels,
        gate_rank=2,
        gate_channels=gate_channels,
        chunk_size=chunk_size,
        use_skip=use_skip,
        normalize=normalize,
        line_block_tokens=None,
        line_block_lines=4,
    ).double()
    with torch.no_grad():
        for param in processor.parameters():
            param.normal_()
    to_gspn_attention(attn, processor)
    processor.latent_size = (height, width)
    return attn, processor, torch.randn(2, height * width, channels, dtype=torch.float64)


@pytest.mark.parametrize(
    "chunk_size,gate_channels,normalize,use_skip",
    [
        (None, None, True, True),
        (None, 2, False, True),
        (3, None, True, False),
        (5, 4, True, True),
        (2, 8, False, False),
    ],
)
@pytest.mark.parametrize("height,width", [(13, 11), (7, 16), (1, 9)])
@pytest.mark.parametrize("block_lines", [1, 4, 64])
def test_line_block_inference_equals_the_whole_computation(
    chunk_size, gate_channels, normalize, use_skip, height, width, block_lines
):
    attn, processor, tokens = processor_case(chunk_size, gate_channels, normalize, use_skip, height, width)
    with torch.no_grad():
        whole = attn(tokens)
        processor.line_block_tokens, processor.line_block_lines = 0, block_lines
        blocks = attn(tokens)
    torch.testing.assert_close(blocks, whole, rtol=1e-10, atol=1e-10)


def test_line_block_inference_in_fp32(monkeypatch):
    """fp32 (the dtype users run on a CPU): equal within fp32 rounding, and the gates never exist whole."""
    attn, processor, tokens = processor_case(None, None, True, height=12, width=10)
    attn, tokens = attn.float(), tokens.float()
    seen = []
    scan = ops.gspn_scan

    def recording_scan(x, lam, gate_logits, *args, **kwargs):
        seen.append(gate_logits.shape)
        return scan(x, lam, gate_logits, *args, **kwargs)

    monkeypatch.setattr(line_block, "gspn_scan", recording_scan)
    with torch.no_grad():
        whole = attn(tokens)
        processor.line_block_tokens, processor.line_block_lines = 100, 4
        blocks = attn(tokens)
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-5)
    # 4 directions x 3 blocks of <= 4 lines, each with the gates of its own lines and direction only (G = C = 8:
    # value and normaliser channels interleaved share them, no doubled copy).
    assert len(seen) == 12
    for _, h, w, *gates in seen:
        assert gates == [3, 8] and ((h == 12 and w <= 4) or (h <= 4 and w == 10))


def test_line_block_inference_only_without_grad_and_above_the_threshold(monkeypatch):
    attn, processor, tokens = processor_case(None, None, True, height=6, width=5)
    calls = []
    monkeypatch.setattr(
        module_module,
        "line_block_scan_fused",
        lambda *a, **k: calls.append(1) or line_block.line_block_scan_fused(*a, **k),
    )
    processor.line_block_tokens = 30
    with torch.no_grad():
        attn(tokens)  # 30 tokens: not above the threshold
    assert not calls
    processor.line_block_tokens = 29
    attn(tokens)  # above it, but gradients are recorded: the whole computation, which autograd can differentiate
    assert not calls
    with torch.no_grad():
        attn(tokens)
    assert calls == [1]
    processor.line_block_tokens = None  # never
    with torch.no_grad():
        attn(tokens)
    assert calls == [1]


def test_config_line_block_fields_reach_every_processor():
    unet = tiny_pipeline("sd15").unet
    gspn_diffusers.convert(unet, GSPNConfig(line_block_tokens=None, line_block_lines=8))
    processors = gspn_diffusers.gspn_modules(unet).values()
    assert all(p.line_block_tokens is None and p.line_block_lines == 8 for p in processors)
    with pytest.raises(ValueError, match="line_block_lines"):
        GSPNConfig(line_block_lines=0)


def test_line_block_memory_per_token_channel_on_the_meta_sdxl():
    """The meta-device estimate of one SD-XL GSPN layer at 16384x8192 (latent 1024x2048), bf16: the kernel drops the
    reference's fp32 copies of the gates, and line-block inference drops the whole gate tensor (12 x 2 bytes)."""
    from gspn_diffusers.pipelines.memory import gspn_layer_bytes_per_token_channel, meta_sdxl

    unet, _ = meta_sdxl(True, torch.bfloat16)
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"  # C = 640, local scan
    reference = gspn_layer_bytes_per_token_channel(unet, layer, 64, 128, line_block=False, backend="reference")
    whole = gspn_layer_bytes_per_token_channel(unet, layer, 1024, 2048, line_block=False)
    blocks = gspn_layer_bytes_per_token_channel(unet, layer, 1024, 2048, line_block=True)
    assert reference > 100 and 30 < whole < 40
    assert blocks <= 22 and whole - blocks > 12
    assert unet.get_submodule(layer).gspn.line_block_tokens == GSPNConfig().line_block_tokens  # restored


def test_line_block_inference_under_autocast_matches_the_whole_computation():
    """A converted tiny SD-XL UNet under CPU bf16 autocast: line-block and whole agree within bf16 rounding."""
    unet = tiny_pipeline("sdxl").unet
    gspn_diffusers.convert(unet)
    with torch.no_grad():  # gates and merge away from their uniform initialisation
        for processor in gspn_diffusers.gspn_modules(unet).values():
            processor.gate_up.weight.normal_()
            processor.merge.normal_()
    sample, embeds, added = tiny_unet_inputs(unet, height=24, width=20)
    outputs = []
    for threshold in (None, 0):
        for processor in gspn_diffusers.gspn_modules(unet).values():
            processor.line_block_tokens, processor.line_block_lines = threshold, 5
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(unet(sample, 10, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.float())
    whole, blocks = outputs
    assert blocks.dtype == whole.dtype and not torch.equal(blocks, torch.zeros_like(blocks))
    torch.testing.assert_close(blocks, whole, rtol=0, atol=3e-2 * whole.abs().max().item())
