"""The DemoFusion-style high-resolution pipelines on the tiny SD-1.5 and SD-XL models (native 128 px, latent 16)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

import gspn_diffusers
from gspn_diffusers.cli import main
from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline
from gspn_diffusers.pipelines.memory import peak_activation_bytes
from gspn_diffusers.pipelines.stages import gaussian_blur, get_views, plan_stage_sizes, resolve_local_denoising
from gspn_diffusers.tiny import tiny_pipeline

HIRES = {"sd15": GSPNDemoFusionPipeline, "sdxl": GSPNDemoFusionSDXLPipeline}
IMG2IMG = {"sd15": StableDiffusionImg2ImgPipeline, "sdxl": StableDiffusionXLImg2ImgPipeline}
PROMPT = "a lighthouse at dawn"


def hires_pipe(kind: str, gspn: bool = False):
    base = tiny_pipeline(kind)
    if gspn:
        gspn_diffusers.convert(base)
    pipe = HIRES[kind].from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, height, width, **kwargs):
    kwargs.setdefault("num_inference_steps", 5)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(PROMPT, height=height, width=width, **kwargs)


# ----------------------------------------------------------------------------- stage plan and geometry


def test_stage_plan_reaches_the_target_exactly_in_2x_steps():
    assert plan_stage_sizes(8192, 16384, native=1024, multiple=8) == [
        (512, 1024),
        (1024, 2048),
        (2048, 4096),
        (4096, 8192),
        (8192, 16384),
    ]
    sizes = plan_stage_sizes(3000, 2000, native=1024, multiple=8)
    assert sizes[0][0] == 1024 and sizes[-1] == (3000, 2000)
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:], strict=False):
        assert h1 / h0 <= 2.01 and w1 / w0 <= 2.01
        assert h0 % 8 == 0 and w0 % 8 == 0
    assert plan_stage_sizes(1024, 512, native=1024, multiple=8) == [(1024, 512)]


def test_views_cover_the_latent_and_stay_inside():
    generator = torch.Generator().manual_seed(0)
    views = get_views(40, 72, window=16, stride=8, jitter=True, generator=generator)
    covered = torch.zeros(40, 72)
    for h0, h1, w0, w1 in views:
        assert 0 <= h0 and h1 <= 40 and 0 <= w0 and w1 <= 72 and (h1 - h0, w1 - w0) == (16, 16)
        covered[h0:h1, w0:w1] += 1
    assert covered.min() >= 1
    assert len(views) == 4 * 8


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    constant = torch.full((1, 4, 12, 12), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 5, 0.8), constant)
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise, 5, 0.8).std() < 0.8 * noise.std()
    assert gaussian_blur(noise, 1, 0.8) is noise


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("kind,height,width", [("sd15", 128, 256), ("sdxl", 256, 128)])
def test_two_stage_image_has_the_exact_target_size(kind, height, width):
    pipe = hires_pipe(kind)
    out = generate(pipe, height, width, output_type="pil", return_stages=True, num_inference_steps=3)
    assert out.images[0].size == (width, height)
    assert [image[0].size for image in out.stage_images] == [(width // 2, height // 2), (width, height)]


@pytest.mark.parametrize("kind,height,width", [("sd15", 512, 136), ("sdxl", 256, 512)])
def test_three_stage_latent_has_the_exact_target_size(kind, height, width):
    pipe = hires_pipe(kind)
    out = generate(pipe, height, width, output_type="latent", return_stages=True, num_inference_steps=3)
    sizes = plan_stage_sizes(height, width, 128, 8)
    assert len(sizes) == 3
    assert [tuple(latent.shape[-2:]) for latent in out.stage_images] == [(h // 8, w // 8) for h, w in sizes]
    assert tuple(out.images.shape) == (1, 4, height // 8, width // 8)
    assert torch.isfinite(out.images).all()


# ----------------------------------------------------------------------------- UNet calls


def _expected_calls(latent_h: int, latent_w: int, view_batch_size: int, split: bool) -> tuple[int, int]:
    """(UNet calls, samples) per step: local windows of 16 at stride 8, plus the d x d dilated sub-latents."""
    windows = (1 if latent_h <= 16 else math.ceil((latent_h - 16) / 8) + 1) * (
        1 if latent_w <= 16 else math.ceil((latent_w - 16) / 8) + 1
    )
    d = math.ceil(max(latent_h, latent_w) / 16)
    calls = math.ceil(windows / view_batch_size) + math.ceil(d * d / view_batch_size)
    return calls * (2 if split else 1), (windows + d * d) * 2


@pytest.mark.parametrize(
    "skip_ratio,height,width,stages",
    [
        # 2 of 5 steps kept; stage 2 (32x64 latent) has more than 4x the native area -> CFG as two calls
        (0.6, 256, 512, {1: (16, 32, False), 2: (32, 64, True)}),
        (0.8, 256, 128, {1: (32, 16, False)}),  # 1 of 5 steps kept
    ],
)
def test_unet_is_called_the_expected_number_of_times_per_stage(skip_ratio, height, width, stages):
    pipe = hires_pipe("sd15")
    calls: dict[int, list[int]] = {}

    def count(module, args, kwargs):
        calls.setdefault(pipe.hires_stage, []).append(args[0].shape[0])

    handle = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    steps, view_batch_size = 5, 8
    generate(
        pipe,
        height,
        width,
        num_inference_steps=steps,
        skip_ratio=skip_ratio,
        view_batch_size=view_batch_size,
        output_type="latent",
    )
    handle.remove()
    kept = round(steps * (1 - skip_ratio))
    assert calls[0] == [2] * steps  # base: CFG as one batch of 2
    assert sorted(calls) == [0, *stages]
    for stage, (latent_h, latent_w, split) in stages.items():
        per_step_calls, per_step_samples = _expected_calls(latent_h, latent_w, view_batch_size, split)
        assert len(calls[stage]) == kept * per_step_calls
        assert sum(calls[stage]) == kept * per_step_samples
        assert max(calls[stage]) <= 2 * view_batch_size


def test_full_local_denoising_calls_the_unet_once_on_the_whole_latent():
    pipe = hires_pipe("sd15", gspn=True)
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(a[0].shape)), with_kwargs=True)
    generate(pipe, 128, 256, num_inference_steps=5, cosine_scale_2=None, output_type="latent")
    handle.remove()
    assert shapes[5:] == [(2, 4, 16, 32)] * 2  # "auto" -> full with GSPN; 2 of 5 steps kept; no dilated branch


# ----------------------------------------------------------------------------- skip residual off == SDEdit


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_stage_without_residual_and_dilation_is_plain_sdedit(kind):
    pipe = hires_pipe(kind)
    steps, strength, guidance = 5, 0.6, 5.0  # 3 steps kept
    generator = torch.Generator().manual_seed(1)
    state = {}

    def capture_generator(p, i, t, tensors):
        if p.hires_stage == 0 and i == steps - 1:
            state["after_base"] = generator.get_state()
        return tensors

    out = generate(
        pipe,
        128,
        256,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance,
        generator=generator,
        cosine_scale_1=None,
        cosine_scale_2=None,
        local_denoising="full",
        forward_chunking=False,
        output_type="latent",
        return_stages=True,
        callback_on_step_end=capture_generator,
    )
    base_latent = out.stage_images[0]
    upsampled = F.interpolate(base_latent, size=(16, 32), mode="bicubic", align_corners=False)
    img2img = IMG2IMG[kind].from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    reference = img2img(
        PROMPT,
        image=upsampled,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().set_state(state["after_base"]),
        output_type="latent",
    ).images
    torch.testing.assert_close(out.images, reference, atol=1e-5, rtol=1e-4)
    # and the residual does change the result (scale 1: c1 = cos factor, about 0.1 at the second step, t = 201)
    with_residual = generate(
        pipe,
        128,
        256,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(1),
        cosine_scale_2=None,
        local_denoising="full",
        output_type="latent",
    ).images
    assert not torch.allclose(with_residual, reference, atol=1e-4)


# ----------------------------------------------------------------------------- tiled VAE, attention kinds, errors


def test_tiled_decode_matches_untiled_decode():
    pipe = hires_pipe("sd15")
    latents = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    decoder_calls = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: decoder_calls.append(a[0].shape))
    untiled = pipe.decode_latents_tiled(latents, tiled=False)
    tiled = pipe.decode_latents_tiled(latents, tiled=True)
    handle.remove()
    assert len(decoder_calls) > 2 and max(s[-1] for s in decoder_calls[1:]) < 40  # really tiled
    assert tiled.shape == untiled.shape == (1, 3, 192, 320)
    # A random VAE has a global mid-block attention and GroupNorm, so tiles cannot be exact; close on average.
    assert (tiled - untiled).abs().mean() < 0.1 * untiled.abs().mean() + 0.02
    assert pipe.vae.use_tiling is False


@pytest.mark.parametrize("kind,local_denoising", [("sd15", "views"), ("sdxl", "full")])
def test_works_with_gspn_and_original_attention(kind, local_denoising):
    gspn = hires_pipe(kind, gspn=True)
    original = hires_pipe(kind)
    assert gspn_diffusers.is_converted(gspn) and not gspn_diffusers.is_converted(original)
    kwargs = {"local_denoising": local_denoising, "output_type": "latent", "num_inference_steps": 3}
    out_gspn = generate(gspn, 128, 256, **kwargs).images
    out_original = generate(original, 128, 256, **kwargs).images
    assert out_gspn.shape == out_original.shape == (1, 4, 16, 32)
    assert torch.isfinite(out_gspn).all() and torch.isfinite(out_original).all()
    assert (out_gspn - out_original).abs().max() > 1e-3


def test_model_cpu_offload_keeps_working():
    # On this CPU-only machine the offload device is the CPU too, but the Accelerate hooks are real:
    # every model must be reached through its forward (or the VAE's hooked decode).
    pipe = hires_pipe("sd15")
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._all_hooks
    out = generate(pipe, 128, 256, num_inference_steps=3, output_type="pil")
    assert out.images[0].size == (256, 128)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"height": 252, "width": 256}, "multiples of the VAE's latent factor 8"),
        ({"height": 64, "width": 96}, "smaller than the base size"),
        ({"strength": 0.0}, "strength must be in (0, 1]"),
        ({"strength": 1.5}, "strength must be in (0, 1]"),
        ({"skip_ratio": 1.0}, "strength must be in (0, 1]"),
        ({"skip_ratio": 0.5, "strength": 0.5}, "not both"),
        ({"local_denoising": "tiles"}, "local_denoising must be one of"),
        ({"stride": 32}, "stride must be in [1, 16]"),
        ({"num_inference_steps": 2, "skip_ratio": 0.9}, "keeps no step"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    pipe = hires_pipe("sd15")
    kwargs = {"height": 256, "width": 256, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pipe(PROMPT, output_type="latent", **kwargs)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("kind,original", [("sd15", True), ("sdxl", False)])
def test_cli_generate_above_native_size_uses_the_hires_pipeline(tmp_path, caplog, kind, original):
    caplog.set_level(logging.INFO)
    output = tmp_path / "big.png"
    args = ["generate", "--tiny", kind, "--prompt", "x", "--height", "128", "--width", "256", "--steps", "2"]
    args += ["--skip-ratio", "0.5", "--save-stages", "--output", str(output)]
    assert main(args + (["--original"] if original else [])) == 0
    assert f"using {HIRES[kind].__name__}" in caplog.text
    assert Image.open(output).size == (256, 128)
    assert Image.open(tmp_path / "big_stage0.png").size == (128, 64)
    assert Image.open(tmp_path / "big_stage1.png").size == (256, 128)


def test_cli_reports_bad_high_resolution_input(tmp_path, caplog):
    args = ["generate", "--tiny", "sd15", "--original", "--prompt", "x", "--height", "128", "--width", "256"]
    assert main(args + ["--skip-ratio", "1.0", "--output", str(tmp_path / "x.png")]) == 2
    assert "strength must be in (0, 1]" in caplog.text


# ----------------------------------------------------------------------------- memory estimate


def test_meta_trace_counts_the_peak_of_live_intermediates():
    with torch.device("meta"):
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        x = torch.empty(8, 64)
    # Linear out (8x256 fp32) and GELU out alive together; the 8x64 result comes after the first is freed.
    assert peak_activation_bytes(mlp, mlp, x) == 2 * 8 * 256 * 4


def test_meta_trace_counts_sdpa_as_a_fused_kernel():
    with torch.device("meta"):
        attention = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        tokens = torch.empty(1, 4096, 64)
    peak = peak_activation_bytes(attention, lambda x: attention(x, x, x, need_weights=False)[0], tokens)
    assert peak < 4096 * 4096 * 4 / 8  # far below one N x N score matrix: linear in tokens


def test_auto_local_denoising_uses_the_whole_latent_only_with_gspn_and_within_the_memory_limit():
    native = 128 * 128
    assert resolve_local_denoising("auto", True, 1024 * 512, native) == "full"  # SD-XL 8192x4096
    assert resolve_local_denoising("auto", True, 2048 * 1024, native) == "views"  # SD-XL 16384x8192
    assert resolve_local_denoising("auto", False, 256 * 256, native) == "views"
    assert resolve_local_denoising("full", True, 2048 * 1024, native) == "full"
