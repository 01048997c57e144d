"""The DemoFusion-style high-resolution pipelines on the tiny SD-1.5 and SD-XL models (native 128 px, latent 16)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

import gspn_diffusers
from gspn_diffusers.cli import main
from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline
from gspn_diffusers.pipelines.budget import gspn_backend_for, largest_view_batch, memory_budget
from gspn_diffusers.pipelines.memory import estimate_stage_peak, peak_activation_bytes
from gspn_diffusers.pipelines.stages import (
    base_size,
    choose_local_denoising,
    gaussian_blur,
    get_views,
    kept_steps,
    match_statistics,
    plan_stage_sizes,
)
from gspn_diffusers.tiny import tiny_pipeline

HIRES = {"sd15": GSPNDemoFusionPipeline, "sdxl": GSPNDemoFusionSDXLPipeline}
IMG2IMG = {"sd15": StableDiffusionImg2ImgPipeline, "sdxl": StableDiffusionXLImg2ImgPipeline}
PROMPT = "a lighthouse at dawn"
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize(
    "height,width,native,expected",
    [
        (8192, 16384, 1024, (704, 1408)),  # SD-XL's 2:1 bucket, not 512x1024 (0.5 MP)
        (1080, 7680, 1024, (384, 2752)),  # not 144x1024
        (4096, 4096, 1024, (1024, 1024)),
        (3000, 2000, 1024, (1280, 832)),  # SD-XL's 2:3 bucket
        (1024, 2048, 512, (384, 768)),  # SD-1.5: about 512x512 pixels
        (2048, 2048, 512, (512, 512)),
    ],
)
def test_base_is_near_the_trained_pixel_count_at_the_target_aspect(height, width, native, expected):
    base_h, base_w = base_size(height, width, native, multiple=8)
    assert (base_h, base_w) == expected
    assert base_h % 64 == 0 and base_w % 64 == 0
    assert 0.85 < base_h * base_w / native**2 < 1.15
    assert abs(math.log(base_w / base_h * height / width)) < 0.05


@pytest.mark.parametrize("height,width", [(8192, 16384), (1080, 7680), (3000, 2000), (1024, 1024), (1024, 1032)])
def test_stage_plan_reaches_the_target_exactly_in_steps_of_at_most_2x(height, width):
    sizes = plan_stage_sizes(height, width, native=1024, multiple=8)
    assert sizes[0] == base_size(height, width, 1024, 8) and sizes[-1] == (height, width)
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:], strict=False):
        assert h0 <= h1 <= 2 * h0 and w0 <= w1 <= 2 * w0 and h0 * w0 < h1 * w1
        assert h0 % 8 == 0 and w0 % 8 == 0
    assert len(plan_stage_sizes(8192, 16384, native=1024, multiple=8)) == 5  # 11.6x in 4 stages


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
    base = base_size(height, width, 128, 8)  # tiny models: native 128 px, a 96x192 base for 1:2
    assert [image[0].size for image in out.stage_images] == [(base[1], base[0]), (width, height)]


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
        (0.6, 256, 512, {1: (20, 40, False), 2: (32, 64, True)}),
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
        local_denoising="windows",
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


def test_whole_latent_calls_the_unet_once_on_the_whole_latent():
    pipe = hires_pipe("sd15", gspn=True)
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(a[0].shape)), with_kwargs=True)
    generate(pipe, 128, 256, num_inference_steps=5, cosine_scale_2=None, output_type="latent")
    handle.remove()
    assert shapes[5:] == [(2, 4, 16, 32)] * 2  # "auto" -> whole with GSPN; 2 of 5 steps kept; no dilated branch


def test_the_user_s_feed_forward_chunking_survives_a_call():
    """The stages chunk the feed-forward per level; afterwards every block has the user's setting back."""
    pipe = hires_pipe("sd15", gspn=True)
    blocks = [m for m in pipe.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    for block in blocks:
        block.set_chunk_feed_forward(2, dim=1)
    generate(pipe, 128, 256, num_inference_steps=5, output_type="latent", forward_chunking=True)
    assert blocks and all((m._chunk_size, m._chunk_dim) == (2, 1) for m in blocks)


def test_whole_latent_with_the_dilated_branch_calls_the_unet_twice_per_step():
    pipe = hires_pipe("sd15", gspn=True)
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(a[0].shape)), with_kwargs=True)
    generate(pipe, 128, 256, num_inference_steps=5, output_type="latent")
    handle.remove()
    # Per kept step: the whole 16x32 latent (CFG batch 2), then the d = 2 -> 4 dilated 8x16 sub-latents in one call.
    assert shapes[5:] == [(2, 4, 16, 32), (8, 4, 8, 16)] * 2


# ----------------------------------------------------------------------------- DemoFusion fidelity


def record_sdxl_conditioning(pipe) -> tuple[list, object]:
    """(sample shape, time_ids rows) of every UNet call, from a forward pre-hook on the real UNet."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((pipe.hires_stage, tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"].tolist()))

    return calls, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_sdxl_size_conditioning_is_the_final_size_with_a_zero_crop_on_the_whole_latent():
    pipe = hires_pipe("sdxl", gspn=True)
    calls, handle = record_sdxl_conditioning(pipe)
    generate(pipe, 256, 512, num_inference_steps=4, strength=0.5, local_denoising="whole", output_type="latent")
    handle.remove()
    assert {stage for stage, _, _ in calls} == {0, 1, 2}
    for _, shape, time_ids in calls:  # base, whole latents and dilated sub-latents alike
        assert len(time_ids) == shape[0] and all(row == [256, 512, 0, 0, 256, 512] for row in time_ids)


def test_sdxl_crop_conditioning_is_each_window_offset_in_pixels():
    pipe = hires_pipe("sdxl", gspn=True)
    calls, handle = record_sdxl_conditioning(pipe)
    # stride 16 = the window: the windows of the 16x32 latent start at 0 and 16 (128 px), no jitter
    generate(
        pipe, 128, 256, num_inference_steps=2, strength=1.0, local_denoising="windows", stride=16, output_type="latent"
    )
    handle.remove()
    windows = [time_ids for stage, shape, time_ids in calls if stage == 1 and shape[-2:] == (16, 16)]
    dilated = [time_ids for stage, shape, time_ids in calls if stage == 1 and shape[-2:] == (8, 16)]
    assert len(windows) == len(dilated) == 2  # 2 steps, one call each (CFG batched)
    for time_ids in windows:  # [uncond: window 0, window 1; cond: window 0, window 1]
        assert [row[2:4] for row in time_ids] == [[0, 0], [0, 128]] * 2
        assert all(row[:2] == row[4:] == [128, 256] for row in time_ids)
    assert all(row == [128, 256, 0, 0, 128, 256] for time_ids in dilated for row in time_ids)
    jittered, handle = record_sdxl_conditioning(pipe)
    generate(pipe, 256, 256, num_inference_steps=2, strength=1.0, local_denoising="windows", output_type="latent")
    handle.remove()
    for stage, shape, time_ids in jittered:
        if stage == 1 and shape[-2:] == (16, 16):  # jittered windows of the 32x32 latent stay inside it
            assert all(row[2] % 8 == 0 and 0 <= row[2] <= 128 and 0 <= row[3] <= 128 for row in time_ids)


@pytest.mark.parametrize(
    "steps,strength,kept",
    [
        (7, 0.5, [3]),  # 3.5 -> 3, as Diffusers' img2img
        (5, 0.1, [1]),  # 0.5 -> never 0
        (7, [0.5, 0.3], [3, 2]),  # one strength per stage (LinFusion lowers it stage by stage)
    ],
)
def test_kept_steps_per_stage(steps, strength, kept):
    assert [kept_steps(steps, s) for s in (strength if isinstance(strength, list) else [strength])] == kept
    pipe = hires_pipe("sd15", gspn=True)
    calls: dict[int, int] = {}
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: calls.__setitem__(pipe.hires_stage, calls.get(pipe.hires_stage, 0) + 1), with_kwargs=True
    )
    height, width = (128, 256) if len(kept) == 1 else (256, 512)
    generate(
        pipe,
        height,
        width,
        num_inference_steps=steps,
        strength=strength,
        cosine_scale_2=None,
        split_cfg=False,
        output_type="latent",
    )
    handle.remove()
    assert [calls[stage] for stage in range(1, len(kept) + 1)] == kept  # one whole-latent call per step


def test_few_kept_steps_warn_with_the_api_names(caplog):
    pipe = hires_pipe("sd15", gspn=True)
    generate(pipe, 128, 256, num_inference_steps=5, skip_ratio=0.9, output_type="latent")
    assert "keeps only 1 of 5 denoising steps (num_inference_steps=5, skip_ratio=0.9)" in caplog.text


def test_each_stage_is_rescaled_to_the_base_statistics():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    reference = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    matched = match_statistics(latents, reference)
    torch.testing.assert_close(matched.mean((1, 2, 3)), reference.mean((1, 2, 3)))
    torch.testing.assert_close(matched.std((1, 2, 3)), reference.std((1, 2, 3)))
    pipe = hires_pipe("sd15", gspn=True)
    out = generate(pipe, 256, 512, num_inference_steps=3, output_type="latent", return_stages=True)
    base = out.stage_images[0]
    for latent in out.stage_images[1:]:
        torch.testing.assert_close(latent.mean(), base.mean(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(latent.std(), base.std(), atol=1e-5, rtol=1e-4)


def test_pixel_space_upsampling_decodes_resizes_and_encodes():
    pipe = hires_pipe("sd15", gspn=True)
    encoded = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(tuple(a[0].shape)))
    pixel = generate(
        pipe, 128, 256, num_inference_steps=3, upsample="pixel", tiled_vae=False, output_type="latent"
    ).images
    handle.remove()
    latent = generate(pipe, 128, 256, num_inference_steps=3, output_type="latent").images
    assert encoded == [(1, 3, 128, 256)]  # the base image, resized to the stage's size
    assert pixel.shape == latent.shape == (1, 4, 16, 32) and torch.isfinite(pixel).all()
    assert (pixel - latent).abs().max() > 1e-3


def test_sdxl_second_prompt_reaches_the_base_and_the_stages():
    pipe = hires_pipe("sdxl", gspn=True)
    texts = {}

    def hook(module, args, kwargs):
        texts.setdefault(pipe.hires_stage, kwargs["encoder_hidden_states"])

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    generate(pipe, 128, 256, num_inference_steps=2, strength=1.0, output_type="latent")
    plain, texts = texts, {}
    generate(pipe, 128, 256, num_inference_steps=2, strength=1.0, prompt_2="a red barn", output_type="latent")
    handle.remove()
    torch.testing.assert_close(texts[1], texts[0])  # the stages see what the base saw
    assert (texts[1] - plain[1]).abs().max() > 1e-4


def test_a_generator_per_image_gives_each_image_its_own_seed():
    pipe = hires_pipe("sdxl", gspn=True)
    kwargs = {"num_inference_steps": 3, "local_denoising": "whole", "output_type": "latent", "guidance_rescale": 0.5}
    both = generate(
        pipe, 128, 256, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kwargs
    ).images
    second = generate(pipe, 128, 256, generator=torch.Generator().manual_seed(4), **kwargs).images
    torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=1e-4)
    assert (both[0] - both[1]).abs().max() > 1e-2


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
        local_denoising="whole",
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
    # The stage's result is rescaled to the base latent's statistics (DemoFusion), after its denoising loop.
    torch.testing.assert_close(out.images, match_statistics(reference, base_latent), atol=1e-5, rtol=1e-4)
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
        local_denoising="whole",
        output_type="latent",
    ).images
    assert not torch.allclose(with_residual, out.images, atol=1e-4)


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


@pytest.mark.parametrize("kind,local_denoising", [("sd15", "windows"), ("sdxl", "whole")])
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
        ({"height": 64, "width": 96}, "smaller than the model's native size"),
        ({"strength": 0.0}, "strength must be in (0, 1]"),
        ({"strength": 1.5}, "strength must be in (0, 1]"),
        ({"skip_ratio": 1.0}, "strength must be in (0, 1]"),
        ({"skip_ratio": 0.5, "strength": 0.5}, "not both"),
        ({"local_denoising": "tiles"}, "local_denoising must be one of"),
        ({"stride": 32}, "stride must be in [1, 16]"),
        ({"strength": [0.5, 0.5]}, "one value per upscaling stage: this target has 1, got 2"),
        ({"skip_ratio": [0.5, 1.0], "height": 256, "width": 512}, "strength must be in (0, 1]"),
        ({"upsample": "nearest"}, "upsample must be one of latent, pixel"),
        ({"prompt_2": "y"}, "prompt_2 and negative_prompt_2 are for SD-XL"),
        ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, "callback_on_step_end_tensor_inputs"),
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
    assert Image.open(tmp_path / "big_stage0.png").size == (192, 96)  # about 128x128 pixels at 2:1
    assert Image.open(tmp_path / "big_stage1.png").size == (256, 128)
    # 2 steps x (1 - 0.5) keep 1 step: the warning speaks the command line's language
    assert "raise --steps or lower --skip-ratio" in caplog.text and "num_inference_steps" not in caplog.text


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


def test_auto_mode_takes_the_whole_latent_with_gspn_where_it_fits():
    fits = choose_local_denoising("auto", True, lambda: 10 * 2**30, budget=20 * 2**30)
    assert fits[0] == "whole" and "10.0 GiB of 20.0 GiB" in fits[1]
    too_big = choose_local_denoising("auto", True, lambda: 30 * 2**30, budget=20 * 2**30)
    assert too_big[0] == "windows" and "more than 20.0 GiB" in too_big[1]
    assert choose_local_denoising("auto", True, lambda: 1 / 0, budget=None)[0] == "whole"  # not even estimated
    assert choose_local_denoising("auto", False, lambda: 1, budget=None)[0] == "windows"
    assert choose_local_denoising("whole", False, lambda: 1 / 0, budget=1) == ("whole", "requested")
    assert memory_budget(torch.device("cpu"), None) is None
    assert memory_budget(torch.device("cpu"), 123) == 123


def test_stage_memory_is_planned_for_the_reference_where_the_kernel_did_not_build(monkeypatch):
    """A CUDA device whose kernel build failed runs the reference (7x the kernel's bytes per GSPN layer): the stages
    must be planned for it, not for the kernel."""
    from gspn_diffusers.ops import extension

    monkeypatch.delenv("GSPN_DIFFUSERS_BACKEND", raising=False)
    monkeypatch.setattr(extension, "_modules", {})
    monkeypatch.setattr(extension, "_errors", {"cuda": "OSError: no nvcc"})
    assert gspn_backend_for(torch.device("cuda")) == "reference"
    assert gspn_backend_for(torch.device("cpu")) == "reference"


def test_view_batch_is_the_most_windows_that_fit():
    assert largest_view_batch(lambda views: 10 * views, budget=55) == 5
    assert largest_view_batch(lambda views: 10 * views, budget=1) == 1  # never 0: one window per call
    assert largest_view_batch(lambda views: 1 / 0, budget=None) == 16  # DemoFusion's default, not estimated


def test_stage_estimate_grows_with_the_latent_and_the_kernel_needs_less_than_the_reference():
    unet = tiny_pipeline("sdxl").unet
    config, gspn_config = dict(unet.config), gspn_diffusers.GSPNConfig.from_preset("sdxl")

    def peak(h, w, backend="kernel", mode="whole"):
        return estimate_stage_peak(config, h, w, torch.float32, backend, mode, gspn_config=gspn_config)

    assert peak(64, 128) > 3 * peak(32, 64)  # linear in pixels plus a constant
    assert peak(64, 128, "kernel") < peak(64, 128, "reference")  # no fp32 copies of the gates
    assert peak(64, 128, mode="windows") < peak(64, 128)  # 16 windows of 16x16 at most
    # gspn_config=None traces the original attention: no scans, so the reference's fp32 gates are not in it (with the
    # kernel's memory model the tiny UNet's GSPN layers stay below its peak, which the ResNets set)
    original = estimate_stage_peak(config, 64, 128, torch.float32, "reference", "whole", gspn_config=None)
    assert original < peak(64, 128, "reference")


@pytest.mark.parametrize("max_memory,mode", [(2**40, "whole"), (2**16, "windows")])
def test_stage_mode_follows_the_given_memory(caplog, max_memory, mode):
    caplog.set_level(logging.INFO, logger="gspn_diffusers.pipelines")
    pipe = hires_pipe("sd15", gspn=True)
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(a[0].shape)), with_kwargs=True)
    generate(pipe, 128, 256, num_inference_steps=2, strength=1.0, max_memory=max_memory, output_type="latent")
    handle.remove()
    stage_log = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stage 1/1")]
    assert len(stage_log) == 1  # one line per stage, with the reason
    if mode == "whole":
        assert "whole latent (GSPN, the whole latent needs about" in stage_log[0]
        assert (2, 4, 16, 32) in shapes[2:]
    else:
        assert "windows (the whole latent needs about" in stage_log[0]
        assert "up to 1 views (windows, dilated sub-latents) per UNet call" in stage_log[0]
        assert (2, 4, 16, 32) not in shapes[2:] and max(s[0] for s in shapes[2:]) == 2  # one window per call


def test_estimate_script_prints_the_stages_as_json(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "estimate_hires_memory", ROOT / "benchmarks/estimate_hires_memory.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr("sys.argv", ["estimate_hires_memory.py", "--json", "--height", "8192", "--width", "16384"])
    script.main()
    rows = json.loads(capsys.readouterr().out)
    assert [(r["width"], r["height"]) for r in rows][-1] == (16384, 8192) and len(rows) == 5
    assert all({"width", "height", "mode", "peak_gib"} <= set(r) for r in rows)
    assert rows[-1]["mode"] == "whole" and rows[-1]["peak_gib"] < 30  # the kernel on an 80 GB device
