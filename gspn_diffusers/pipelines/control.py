"""ControlNet in the high-resolution stages: the control image at each stage's size, cut as the views are cut.

Each upscaling stage resizes the caller's control image to the stage's pixel size (from the original image,
not from the previous stage's copy); a local window gets the pixels under it, and the dilated sub-latents,
which see the whole (padded) latent at ``1 / d`` of its resolution, get the whole control image downsampled to
their size. The ControlNet runs on the same input, timestep and conditioning as the UNet call it feeds, and its
residuals go into that call, as in Diffusers' ControlNet pipelines; ``control_guidance_start/end`` count in
steps of the full schedule, so a stage that skips the first 60 % of the steps keeps the rule of the base.
:class:`ControlNetStagesMixin` is the pipelines' side of it: the optional ``controlnet`` component, the
controlled base image and each stage's :class:`StageControl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor

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


class ControlNetStagesMixin:
    """The ControlNet of a high-resolution pipeline: an optional ``controlnet`` component, the base image by
    Diffusers' ControlNet pipeline of the family (``controlnet_pipeline_class``, built on the same components) and
    each stage's :class:`StageControl`."""

    controlnet_pipeline_class: type

    def _init_control(self, controlnet: ControlNetModel | None) -> None:
        """Register the optional ControlNet and the processor of its control images (``[0, 1]``, RGB), as
        Diffusers' ControlNet pipelines do."""
        if controlnet is not None and not isinstance(controlnet, ControlNetModel):
            raise ValueError(
                f"controlnet must be one ControlNetModel; got {type(controlnet).__name__} (several ControlNets "
                "are not supported by the high-resolution pipeline)."
            )
        self.register_modules(controlnet=controlnet)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    def _controlnet_pipeline_kwargs(self) -> dict[str, Any]:
        """The configuration arguments of :attr:`controlnet_pipeline_class` that this pipeline's config sets."""
        raise NotImplementedError

    def controlled_base_latents(self, base_kwargs: dict[str, Any], control: dict[str, Any]) -> torch.Tensor:
        """The base image's latents by :attr:`controlnet_pipeline_class` with ``control`` (its image and schedule
        arguments); the user's callback sees this pipeline, and its ``_interrupt`` reaches the loop."""
        names, _ = self.controlnet_pipeline_class._get_signature_keys(self.controlnet_pipeline_class)
        components = {name: getattr(self, name, None) for name in names}
        controlled = self.controlnet_pipeline_class(**components, **self._controlnet_pipeline_kwargs())
        controlled.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        callback = base_kwargs.pop("callback_on_step_end")
        if callback is not None and not isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            user_callback = callback

            def callback(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
                outputs = user_callback(self, i, t, tensors)  # the user's callback sees this pipeline
                pipe._interrupt = self._interrupt
                return outputs

        base_kwargs.pop("guidance_rescale")
        return controlled(**base_kwargs, **control, callback_on_step_end=callback)[0]

    def _stage_control(
        self,
        control_image: Any,
        size: tuple[int, int],
        batch: int,
        num_images_per_prompt: int,
        dilated: bool,
        scale: float,
        guidance: tuple[float, float],
        kept: int,
    ) -> StageControl:
        """The control image of a stage of pixel ``size`` that keeps the last ``kept`` steps of the schedule
        (just set by :meth:`stage_timesteps`), for ``batch`` latents."""
        num_steps = len(self.scheduler.timesteps)
        image = prepare_control_image(
            self.control_image_processor,
            control_image,
            size,
            batch // num_images_per_prompt,
            num_images_per_prompt,
            self._execution_device,
            self.controlnet.dtype,
        )
        first_step = num_steps - kept * self.scheduler.order
        return stage_control(
            image, self.window, self.vae_scale_factor, dilated, scale, guidance, first_step, num_steps
        )
