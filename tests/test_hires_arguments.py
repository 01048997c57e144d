"""The Diffusers and DemoFusion arguments of the high-resolution pipelines, each by its effect on the output, on the
tiny SD-1.5 and SD-XL models (native 128 px, latent 16): prompt embeddings, cross-attention kwargs, SD-XL's
micro-conditioning, eta, denoising_end, image=, multi_decoder / lowvram, show_image."""

from __future__ import annotations

import functools
import logging
import sys
import types

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline
from gspn_diffusers.pipelines.vae_io import decode_latents, decode_latents_multi
from gspn_diffusers.tiny import tiny_pipeline

HIRES = {"sd15": GSPNDemoFusionPipeline, "sdxl": GSPNDemoFusionSDXLPipeline}
PROMPT = "a lighthouse at dawn"


def hires_pipe(kind: str):
    pipe = HIRES[kind].from_pipe(tiny_pipeline(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    """One SD-1.5 pipeline for the module (tests remove the hooks they add). The arguments do not depend on the
    attention, so the original one keeps these tests fast (GSPN's reference backend is a Python loop on the CPU);
    the whole latent is asked for explicitly."""
    return hires_pipe("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return hires_pipe("sdxl")


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("height", 128)
    kwargs.setdefault("width", 256)
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("local_denoising", "whole")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)


def differ(a, b, tol=1e-4) -> bool:
    return (torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max() > tol


# ----------------------------------------------------------------------------- prompt embeddings


def test_sd15_prompt_embeds_equal_to_the_encoded_prompt_give_the_same_image(sd15):
    pipe = sd15
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, "blurry")
    by_text = run(pipe, negative_prompt="blurry").images
    by_embeds = run(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative).images
    torch.testing.assert_close(by_embeds, by_text, atol=1e-5, rtol=1e-5)


def test_sdxl_prompt_and_pooled_embeds_equal_to_the_encoded_prompt_give_the_same_image(sdxl):
    pipe = sdxl
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu", negative_prompt="blurry")
    by_text = run(pipe, negative_prompt="blurry").images
    by_embeds = run(
        pipe,
        None,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    ).images
    torch.testing.assert_close(by_embeds, by_text, atol=1e-5, rtol=1e-5)
    other = run(
        pipe,
        None,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=-pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    ).images
    assert differ(other, by_text)


@pytest.mark.parametrize(
    "kind,kwargs,message",
    [
        ("sd15", {"prompt_embeds": torch.zeros(1, 77, 32)}, "Cannot forward both `prompt`"),
        (
            "sd15",
            {"prompt": None, "prompt_embeds": torch.zeros(1, 77, 32), "negative_prompt_embeds": torch.zeros(1, 7, 32)},
            "must have the same shape",
        ),
        ("sd15", {"pooled_prompt_embeds": torch.zeros(1, 32)}, "pooled_prompt_embeds: SD-XL's arguments"),
        ("sd15", {"crops_coords_top_left": (0, 8)}, "crops_coords_top_left: SD-XL's micro-conditioning"),
        ("sdxl", {"prompt": None, "prompt_embeds": torch.zeros(1, 77, 64)}, "pooled_prompt_embeds"),
        ("sdxl", {"original_size": (128,)}, "original_size must be a pair of integers"),
        ("sd15", {"denoising_end": 1.5}, "denoising_end must be in (0, 1)"),
        ("sd15", {"denoising_end": 0.3, "strength": 0.6}, "ends before the last stage starts"),
        ("sd15", {"image": Image.new("RGB", (64, 64)), "latents": torch.zeros(1, 4, 16, 16)}, "not both"),
        ("sd15", {"multi_decoder": True, "tiled_vae": True}, "choose one"),
        ("sd15", {"control_image": Image.new("RGB", (64, 64))}, "control_image needs a ControlNet"),
    ],
)
def test_bad_arguments_raise_before_any_step(request, kind, kwargs, message):
    pipe = request.getfixturevalue(kind)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    kwargs = {"prompt": PROMPT, "height": 128, "width": 256, "output_type": "latent", **kwargs}
    try:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe(**kwargs)
    finally:
        handle.remove()
    assert not calls


# ----------------------------------------------------------------------------- cross_attention_kwargs


class GainProcessor(AttnProcessor2_0):
    """Diffusers' attention scaled by a ``gain`` that only cross_attention_kwargs can set."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        self.seen.append(gain)
        return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_every_attention_call_of_the_base_and_the_stages():
    pipe = hires_pipe("sd15")
    seen: list = []
    pipe.unet.set_attn_processor(GainProcessor(seen))
    stages_seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: stages_seen.append((pipe.hires_stage, len(seen))))
    plain = run(pipe, local_denoising="windows").images
    assert set(seen) == {1.0}
    seen.clear()
    scaled = run(pipe, local_denoising="windows", cross_attention_kwargs={"gain": 0.5}).images
    assert seen and set(seen) == {0.5}  # every call, base and stage
    assert {stage for stage, _ in stages_seen} == {0, 1}
    assert differ(scaled, plain)
    torch.testing.assert_close(
        run(pipe, local_denoising="windows", cross_attention_kwargs={"gain": 1.0}).images, plain
    )


# ----------------------------------------------------------------------------- SD-XL micro-conditioning


def test_sdxl_given_sizes_and_crops_reach_every_call_and_windows_add_their_offset(sdxl):
    pipe = sdxl
    calls = []

    def hook(module, args, kwargs):
        calls.append((pipe.hires_stage, tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"].tolist()))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    micro = {
        "original_size": (512, 1024),
        "crops_coords_top_left": (8, 16),
        "target_size": (256, 512),
        "negative_original_size": (64, 128),
        "negative_crops_coords_top_left": (0, 0),
        "negative_target_size": (96, 192),
    }
    # stride 16 = the window: the stage's two windows start at 0 and 128 px, no jitter
    run(pipe, num_inference_steps=2, strength=1.0, local_denoising="windows", stride=16, **micro)
    handle.remove()
    positive, negative = [512, 1024, 8, 16, 256, 512], [64, 128, 0, 0, 96, 192]
    base = [ids for stage, _, ids in calls if stage == 0]
    assert base and all(ids == [negative, positive] for ids in base)  # CFG batch: uncond first
    windows = [ids for stage, shape, ids in calls if stage == 1 and shape[-2:] == (16, 16)]
    assert len(windows) == 2
    for ids in windows:  # [uncond: window 0, window 1; cond: window 0, window 1]
        assert ids == [
            negative,
            [64, 128, 0, 128, 96, 192],
            positive,
            [512, 1024, 8, 16 + 128, 256, 512],
        ]
    dilated = [ids for stage, shape, ids in calls if stage == 1 and shape[-2:] == (8, 16)]
    assert dilated and all(ids == [negative] * 4 + [positive] * 4 for ids in dilated)


def test_sdxl_a_different_crop_changes_the_image(sdxl):
    default = run(sdxl).images
    torch.testing.assert_close(run(sdxl, crops_coords_top_left=(0, 0), original_size=(128, 256)).images, default)
    assert differ(run(sdxl, crops_coords_top_left=(64, 32)).images, default)


# ----------------------------------------------------------------------------- eta and denoising_end


def test_eta_changes_a_ddim_result_and_reaches_every_stage(sd15, monkeypatch):
    pipe = sd15
    etas = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # the pipelines pass eta only to a step whose signature names it
    def recording_step(*args, **kwargs):
        etas.append((pipe.hires_stage, kwargs.get("eta")))
        return step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    deterministic = run(pipe, num_inference_steps=3, strength=1.0).images
    stochastic = run(pipe, num_inference_steps=3, strength=1.0, eta=1.0).images
    assert {stage for stage, eta in etas if eta == 1.0} == {0, 1}
    assert differ(stochastic, deterministic, tol=1e-3)


def test_denoising_end_stops_the_last_stage_early_and_keeps_its_latent_noisy(sd15):
    """DDIM, 5 steps: 801 601 401 201 1; strength 0.8 keeps 601..1; denoising_end 0.7 keeps t >= 300: 601, 401.
    The result is the full run's latent after those two steps (no rescaling to the base's statistics)."""
    pipe = sd15
    calls, captured = [], {}
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append((pipe.hires_stage, int(a[1]))))

    def capture(p, i, t, tensors):
        if p.hires_stage == 1:
            captured[i] = tensors["latents"].clone()
        return tensors

    kwargs = {"num_inference_steps": 5, "strength": 0.8, "cosine_scale_2": None, "callback_on_step_end": capture}
    run(pipe, **kwargs)
    assert [t for stage, t in calls if stage == 1] == [601, 401, 201, 1]
    full_after_two = captured[1]
    calls.clear()
    early = run(pipe, denoising_end=0.7, **kwargs).images
    handle.remove()
    assert [t for stage, t in calls if stage == 1] == [601, 401]
    torch.testing.assert_close(early, full_after_two)


# ----------------------------------------------------------------------------- image=


def test_image_is_upscaled_instead_of_a_generated_base(sd15):
    pipe = sd15
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(pipe.hires_stage))
    rng = np.random.default_rng(0)
    first = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    second = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    out = run(pipe, image=first, strength=0.5, output_type="np", return_stages=True, num_inference_steps=5)
    handle.remove()
    assert 0 not in calls and 1 in calls  # no base loop: the stage starts from the image
    assert out.images.shape == (1, 128, 256, 3)
    assert out.stage_images[0].shape == (1, 96, 192, 3)  # the image, resized to the base size of the plan
    other = run(pipe, image=second, strength=0.5, output_type="np", num_inference_steps=5).images
    assert differ(other, out.images, tol=1e-2)
    weak = run(pipe, image=first, strength=0.2, output_type="np", num_inference_steps=5).images  # 1 step, not 2
    assert differ(weak, out.images, tol=1e-3)


# ----------------------------------------------------------------------------- multi_decoder, lowvram, show_image


def test_multi_decoder_decodes_cores_with_context_and_lowvram_takes_smaller_tiles(sd15):
    pipe = sd15
    latents = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(0))
    shapes = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[-2:])))
    with torch.no_grad():
        multi = decode_latents_multi(pipe.vae, latents, window=16, lowvram=False)
        tiles = len(shapes)
        shapes.clear()
        small = decode_latents_multi(pipe.vae, latents, window=16, lowvram=True)
        handle.remove()
        whole = decode_latents(pipe.vae, latents, tiled=False)
    # cores of 4 latent px at stride 4 (4 x 8 of them), each with 12 px of context (clipped to the latent);
    # lowvram: stride 2 (7 x 15 cores), 4 px of context
    assert tiles == 32 and len(shapes) == 105 and max(shapes) == (12, 12)
    assert multi.shape == small.shape == whole.shape == (1, 3, 128, 256)
    # close to the untiled decode (a random VAE has global attention and GroupNorm, so not exact), and not equal
    assert (multi - whole).abs().mean() < 0.2 * whole.abs().mean() + 0.02
    assert differ(small, multi, tol=1e-3)
    by_default = run(pipe, output_type="np").images
    by_multi = run(pipe, output_type="np", multi_decoder=True).images
    assert by_multi.shape == by_default.shape == (1, 128, 256, 3)
    assert differ(by_multi, by_default, tol=1e-3)


def test_show_image_displays_every_stage_in_a_notebook(sd15, monkeypatch, caplog):
    pipe = sd15
    shown = []
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: object()
    fake.display = types.SimpleNamespace(display=lambda image: shown.append(image.size))
    monkeypatch.setitem(sys.modules, "IPython", fake)
    out = run(pipe, show_image=True)
    assert shown == [(192, 96), (256, 128)]  # the base, then the stage; the output type stays the caller's
    assert torch.is_tensor(out.images)
    shown.clear()
    fake.get_ipython = lambda: None  # a plain script: nothing to show in, one log line per stage
    caplog.set_level(logging.INFO, logger="gspn_diffusers.pipelines.vae_io")
    run(pipe, show_image=True)
    assert not shown and "return_stages=True" in caplog.text


def test_lowvram_parks_the_idle_models_on_the_cpu_and_puts_them_back(sd15, monkeypatch):
    """On an accelerator the named models go to the CPU inside the block and back to where they were after it;
    on the CPU, or with model offloading (which moves them itself), nothing moves."""
    moves = []
    monkeypatch.setattr(sd15.vae, "to", lambda place: moves.append(str(place)))
    with sd15._parked(True, ("vae",), torch.device("cuda")):
        assert moves == ["cpu"]
    assert moves == ["cpu", "cpu"]  # back to its own device (the CPU on this machine)
    moves.clear()
    with sd15._parked(True, ("vae",), torch.device("cpu")), sd15._parked(False, ("vae",), torch.device("cuda")):
        pass
    monkeypatch.setattr(sd15, "_all_hooks", [object()], raising=False)
    with sd15._parked(True, ("vae",), torch.device("cuda")):
        pass
    assert moves == []
