"""ControlNet in the high-resolution pipelines: a ControlNetModel made from the tiny (plain) UNet, its zero
convolutions perturbed so that the control image matters, guides the base and every stage; each view gets its
part of the control image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image

from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline
from gspn_diffusers.tiny import tiny_pipeline

PROMPT = "a lighthouse at dawn"


def controlnet_for(unet) -> ControlNetModel:
    """Diffusers' ControlNet of ``unet`` with its zero-initialised output convolutions made non-zero (the
    conditioning embedding's strongly, or the random tiny ControlNet's residuals barely depend on the image)."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        zeroed.append(controlnet.controlnet_cond_embedding.conv_out)
        for module in zeroed:
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
        controlnet.controlnet_cond_embedding.conv_out.weight.mul_(30)
    return controlnet


def control_images(seed: int) -> Image.Image:
    """An edge-map-like control image: a white frame on black (seed 0) or its negative (seed 1)."""
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[8:-8, 8:-8] = 255
    pixels[16:-16, 16:-16] = 0
    return Image.fromarray(pixels if seed == 0 else 255 - pixels)


@pytest.fixture(scope="module")
def sd15():
    base = tiny_pipeline("sd15")
    pipe = GSPNDemoFusionPipeline.from_pipe(base, controlnet=controlnet_for(base.unet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, control_image, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("strength", 0.5)
    return pipe(
        PROMPT,
        height=128,
        width=256,
        control_image=control_image,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


def record_control(pipe) -> tuple[list, object]:
    calls = []

    def hook(module, args, kwargs):
        calls.append((pipe.hires_stage, tuple(kwargs["controlnet_cond"].shape), kwargs["conditioning_scale"]))

    return calls, pipe.controlnet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("local_denoising", ["windows", "whole"])
def test_the_control_image_guides_the_base_and_every_stage(sd15, local_denoising):
    calls, handle = record_control(sd15)
    first = run(sd15, control_images(0), local_denoising=local_denoising, controlnet_conditioning_scale=2.0).images
    handle.remove()
    second = run(sd15, control_images(1), local_denoising=local_denoising, controlnet_conditioning_scale=2.0).images
    assert first.shape == second.shape == (1, 4, 16, 32)
    assert (first - second).abs().max() > 1e-2  # equal inputs agree to 1e-5
    assert {stage for stage, _, _ in calls} == {0, 1}
    stage_shapes = {shape for stage, shape, _ in calls if stage == 1}
    # CFG batch 2; the 16x32 latent's dilated sub-latents (d = 2: four of 8x16) see the image at 64x128 px
    dilated = (2 * 4, 3, 64, 128)
    if local_denoising == "windows":  # 3 windows of 16x16 latent px (stride 8) in one call, 128x128 px each
        assert stage_shapes == {(2 * 3, 3, 128, 128), dilated}
    else:
        assert stage_shapes == {(2, 3, 128, 256), dilated}
    assert {scale for _, _, scale in calls} == {2.0}


def test_control_guidance_end_counts_in_steps_of_the_full_schedule(sd15):
    """4 steps, strength 0.5: the stage runs steps 2 and 3 of 4; control_guidance_end 0.5 keeps steps 0 and 1 only,
    so the stage runs without the ControlNet and the base with it for two of its four steps."""
    calls, handle = record_control(sd15)
    steps = []

    def callback(pipe, i, t, tensors):
        steps.append((pipe is sd15, pipe.hires_stage, i))
        return tensors

    run(sd15, control_images(0), control_guidance_end=0.5, local_denoising="whole", callback_on_step_end=callback)
    handle.remove()
    base_scales = [scale for stage, _, scale in calls if stage == 0]
    assert base_scales == [1.0, 1.0, 0.0, 0.0]
    assert not [call for call in calls if call[0] == 1]
    # the controlled base runs in Diffusers' ControlNet pipeline, but the callback sees this one
    assert steps == [(True, 0, 0), (True, 0, 1), (True, 0, 2), (True, 0, 3), (True, 1, 0), (True, 1, 1)]


def test_controlnet_conditioning_scale_zero_is_no_controlnet(sd15):
    off = run(sd15, control_images(0), controlnet_conditioning_scale=0.0, local_denoising="whole").images
    other = run(sd15, control_images(1), controlnet_conditioning_scale=0.0, local_denoising="whole").images
    torch.testing.assert_close(off, other)


def test_sdxl_controlnet_comes_along_from_a_controlnet_pipeline():
    base = tiny_pipeline("sdxl")
    controlled = StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet_for(base.unet))
    pipe = GSPNDemoFusionSDXLPipeline.from_pipe(controlled)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.controlnet is controlled.controlnet
    first = run(pipe, control_images(0), local_denoising="windows", controlnet_conditioning_scale=2.0).images
    second = run(pipe, control_images(1), local_denoising="windows", controlnet_conditioning_scale=2.0).images
    assert (first - second).abs().max() > 1e-2  # equal inputs agree to 1e-5
    # without the control image the call is refused: the ControlNet would be silently unused
    with pytest.raises(ValueError, match="give its control_image"):
        pipe(PROMPT, height=128, width=256, output_type="latent")


def test_a_gspn_controlnet_keeps_the_whole_latent_in_auto_mode():
    """A GSPN UNet with a GSPN ControlNet (GSPNControlNetModel.from_unet: the UNet's GSPN weights) stays linear in
    tokens, so ``auto`` denoises each stage's whole latent, the ControlNet included, and the control image matters."""
    import gspn_diffusers
    from gspn_diffusers import GSPNControlNetModel

    base = gspn_diffusers.convert(tiny_pipeline("sd15"))
    controlnet = GSPNControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    reference = controlnet_for(tiny_pipeline("sd15").unet)  # the same perturbation of the zero convolutions
    with torch.no_grad():
        for name in ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding"):
            getattr(controlnet, name).load_state_dict(getattr(reference, name).state_dict())
    pipe = GSPNDemoFusionPipeline.from_pipe(base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    calls, handle = record_control(pipe)
    first = run(pipe, control_images(0), controlnet_conditioning_scale=2.0).images
    handle.remove()
    second = run(pipe, control_images(1), controlnet_conditioning_scale=2.0).images
    assert (first - second).abs().max() > 1e-2
    assert (2, 3, 128, 256) in {shape for stage, shape, _ in calls if stage == 1}  # the whole latent, not windows
