"""ControlNet in the high-resolution stages: the control image at each stage's size, cut as the views are cut.

Each upscaling stage resizes the caller's control image to the stage's pixel size (from the original image,
not from the previous stage's copy); a local window gets the pixels under it, and the dilated sub-latents,
which see the whole (padded) latent at ``1 / d`` of its resolution, get the whole control image downsampled to
their size. The ControlNet runs on the same input, timestep and conditioning as the UNet call it feeds, and its
residuals go into that call, as in Diffusers' ControlNet pipelines; ``control_guidance_start/end`` count in
steps of the full schedule, so a stage that skips the first 60 % of the steps keeps the rule of the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .stages import dilation_factor


@dataclass
class StageControl:
    """A stage's control image (``(B, 3, H, W)`` in ``[0, 1]`` at the stage's pixel size, B the latents' batch),
    the one of its dilated sub-latents, and when the ControlNet acts: ``scale`` from step ``start * n`` to
    ``end * n`` of the ``num_steps`` of the full schedule, this stage's first step being ``first_step``."""

    image: torch.Tensor
    dilated: torch.Tensor | None
    scale: float
    guidance: tuple[float, float]
    first_step: int
    num_steps: int

    def scale_at(self, i: int) -> float:
        """The conditioning scale at the stage's step ``i``: Diffusers' ``controlnet_keep`` rule on the full
        schedule (off before ``start``, off once a step would end after ``end``)."""
        step, start, end = self.first_step + i, *self.guidance
        off = step / self.num_steps < start or (step + 1) / self.num_steps > end
        return 0.0 if off else self.scale


def window_control(image: torch.Tensor, views: list[tuple[int, int, int, int]], factor: int) -> torch.Tensor:
    """The control pixels under each latent window ``(h0, h1, w0, w1)``, view-major as the windows' latents."""
    return torch.cat([image[:, :, h0 * factor : h1 * factor, w0 * factor : w1 * factor] for h0, h1, w0, w1 in views])


def dilated_control(image: torch.Tensor, pad: tuple[int, int], dilation: int, factor: int) -> torch.Tensor:
    """The control image of the dilated sub-latents: padded at the top and left as the latent is (``pad`` latent
    rows and columns, by replication), then downsampled by ``dilation`` (area average: a thin edge of an edge map
    stays visible, where taking every d-th row would drop it)."""
    pad_h, pad_w = pad
    if pad_h or pad_w:
        image = F.pad(image, (pad_w * factor, 0, pad_h * factor, 0), mode="replicate")
    size = (image.shape[-2] // dilation, image.shape[-1] // dilation)
    return F.interpolate(image, size=size, mode="area") if dilation > 1 else image


def stage_control(
    image: torch.Tensor,
    window: int,
    factor: int,
    dilated: bool,
    scale: float,
    guidance: tuple[float, float],
    first_step: int,
    num_steps: int,
) -> StageControl:
    """The :class:`StageControl` of a stage from its control ``image`` (at the stage's pixel size): the dilated
    branch's copy is made once per stage, padded and downsampled as that stage's latent is."""
    height, width = image.shape[-2] // factor, image.shape[-1] // factor
    sub = None
    if dilated:
        d = dilation_factor(height, width, window)
        sub = dilated_control(image, ((d - height % d) % d, (d - width % d) % d), d, factor)
    return StageControl(image, sub, scale, guidance, first_step, num_steps)


def prepare_control_image(
    processor: Any,
    image: Any,
    size: tuple[int, int],
    batch_size: int,
    num_images_per_prompt: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The caller's control image at pixel ``size``, batched as Diffusers' ControlNet pipelines batch it (one image
    serves every prompt; one per prompt is repeated per image of that prompt)."""
    pixels = processor.preprocess(image, height=size[0], width=size[1]).to(dtype=torch.float32)
    repeat = batch_size if pixels.shape[0] == 1 else num_images_per_prompt
    if pixels.shape[0] not in (1, batch_size):
        raise ValueError(
            f"control_image holds {pixels.shape[0]} images for {batch_size} prompts: give one, or one per prompt."
        )
    return pixels.repeat_interleave(repeat, dim=0).to(device=device, dtype=dtype)


def controlnet_residuals(
    controlnet: torch.nn.Module,
    sample: torch.Tensor,
    t: torch.Tensor,
    unet_kwargs: dict[str, Any],
    control: torch.Tensor,
    scale: float,
    cross_attention_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ControlNet's residuals for one UNet call (the same sample, timestep and conditioning), as the keyword
    arguments the UNet takes them by."""
    down, mid = controlnet(
        sample,
        t,
        encoder_hidden_states=unet_kwargs["encoder_hidden_states"],
        controlnet_cond=control.to(sample.dtype),
        conditioning_scale=scale,
        added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"),
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
    )
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
