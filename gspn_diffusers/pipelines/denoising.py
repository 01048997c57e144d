"""One upscaling stage's denoising: DemoFusion's skip residual, local branch and dilated branch on a UNet.

A mixin for the high-resolution pipelines (:mod:`.demofusion`), kept apart from the stage planning and
``__call__``: it needs only ``self.unet``, ``self.scheduler``, ``self.vae_scale_factor``, ``self.window``,
``self.progress_bar``, ``self.controlnet`` when a stage has a control image, and the family's
:meth:`StageDenoisingMixin._unet_kwargs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from .chunking import chunk_feed_forward
from .control import StageControl, controlnet_residuals, window_control
from .stages import (
    cosine_factor,
    cosine_weight,
    dilated_views,
    dilation_factor,
    gaussian_blur,
    get_views,
    match_statistics,
)


@dataclass
class TextConditioning:
    """Conditioning of one CFG branch: token embeddings and, for SD-XL, the pooled embedding and the branch's
    micro-conditioning (``None`` sizes: the final image's, DemoFusion's choice; a window adds its offset to
    ``crops_coords_top_left``)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None


@dataclass
class StageSettings:
    """The per-stage options of ``__call__`` (see its docstring), resolved to concrete values."""

    guidance_scale: float
    local_denoising: str
    view_batch_size: int
    stride: int
    cosine_scale_1: float | None
    cosine_scale_2: float | None
    cosine_scale_3: float | None
    sigma: float
    split_cfg: bool
    forward_chunking: bool
    final_size: tuple[int, int]
    guidance_rescale: float = 0.0
    cross_attention_kwargs: dict[str, Any] | None = None
    control: StageControl | None = None


class StageDenoisingMixin:
    """Denoising of one upscaling stage; the pipeline family supplies the UNet's conditioning arguments."""

    def _unet_kwargs(
        self, conds: list[TextConditioning], crops: list[tuple[int, int]], final_size: tuple[int, int]
    ) -> dict[str, Any]:
        """UNet keyword arguments for the branches ``conds`` (concatenated), each repeated for one view per
        ``crops`` entry (the view's top-left offset in pixels), in a final image of ``final_size`` pixels."""
        raise NotImplementedError

    # ------------------------------------------------------------------ UNet calls
    def _guided_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        uncond: TextConditioning | None,
        cond: TextConditioning,
        settings: StageSettings,
        crops: list[tuple[int, int]],
        control: torch.Tensor | None = None,
        control_scale: float = 0.0,
    ) -> torch.Tensor:
        """Classifier-free-guided noise prediction for ``latents`` holding ``len(crops) * batch`` samples (view-major).

        With ``split_cfg`` the unconditional and conditional halves run as two UNet calls, which
        halves the activations at the same total work. ``control`` (the control pixels of the same views) feeds
        the ControlNet's residuals into each call when ``control_scale`` is not 0.
        """
        height, width = latents.shape[-2:]
        if settings.forward_chunking:
            chunk_feed_forward(self.unet, height, width)

        def unet(conds: list[TextConditioning]) -> torch.Tensor:
            kwargs = self._unet_kwargs(conds, crops, settings.final_size)
            sample = latents.repeat(len(conds), 1, 1, 1)
            if control is not None and control_scale:
                kwargs |= controlnet_residuals(
                    self.controlnet,
                    sample,
                    t,
                    kwargs,
                    control.repeat(len(conds), 1, 1, 1),
                    control_scale,
                    settings.cross_attention_kwargs,
                )
            return self.unet(
                sample, t, cross_attention_kwargs=settings.cross_attention_kwargs, return_dict=False, **kwargs
            )[0]

        if uncond is None:
            return unet([cond])
        if settings.split_cfg:
            noise_uncond, noise_text = unet([uncond]), unet([cond])
        else:
            noise_uncond, noise_text = unet([uncond, cond]).chunk(2)
        noise = noise_uncond + settings.guidance_scale * (noise_text - noise_uncond)
        if settings.guidance_rescale > 0:
            noise = rescale_noise_cfg(noise, noise_text, guidance_rescale=settings.guidance_rescale)
        return noise

    def _local_noise(self, latents, t, uncond, cond, settings, generator, control_scale: float) -> torch.Tensor:
        """Local branch: the whole latent at once, or the average over overlapping native windows."""
        control = settings.control.image if settings.control is not None else None
        if settings.local_denoising == "whole":
            return self._guided_noise(latents, t, uncond, cond, settings, [(0, 0)], control, control_scale)
        views = get_views(*latents.shape[-2:], self.window, settings.stride, jitter=True, generator=generator)
        value = torch.zeros_like(latents)
        count = torch.zeros_like(latents[:1, :1])
        factor = self.vae_scale_factor
        for i in range(0, len(views), settings.view_batch_size):
            batch_views = views[i : i + settings.view_batch_size]
            crops = torch.cat([latents[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in batch_views])
            offsets = [(h0 * factor, w0 * factor) for h0, _, w0, _ in batch_views]
            views_control = window_control(control, batch_views, factor) if control is not None else None
            noise = self._guided_noise(crops, t, uncond, cond, settings, offsets, views_control, control_scale)
            noise = noise.chunk(len(batch_views))
            for part, (h0, h1, w0, w1) in zip(noise, batch_views, strict=True):
                value[:, :, h0:h1, w0:w1] += part
                count[:, :, h0:h1, w0:w1] += 1
        return value / count

    def _dilated_noise(self, latents, t, uncond, cond, settings, factor: float, control_scale: float) -> torch.Tensor:
        """Global branch: the UNet on the dilated sub-latents of a Gaussian-filtered copy of the latent."""
        height, width = latents.shape[-2:]
        d = dilation_factor(height, width, self.window)
        pad_h, pad_w = (d - height % d) % d, (d - width % d) % d
        padded = F.pad(latents, (pad_w, 0, pad_h, 0), mode="replicate") if pad_h or pad_w else latents
        c3 = 0.99 * cosine_weight(factor, settings.cosine_scale_3) + 1e-2
        blurred = gaussian_blur(padded, 2 * d - 1, settings.sigma * c3)
        if blurred is not padded:
            blurred = match_statistics(blurred, padded)
        value = torch.empty_like(padded)
        phases = dilated_views(d)
        control = settings.control.dilated if settings.control is not None else None
        for i in range(0, len(phases), settings.view_batch_size):
            batch_phases = phases[i : i + settings.view_batch_size]
            crops = torch.cat([blurred[:, :, h::d, w::d] for h, w in batch_phases])
            views_control = control.repeat(len(batch_phases), 1, 1, 1) if control is not None else None
            noise = self._guided_noise(
                crops, t, uncond, cond, settings, [(0, 0)] * len(batch_phases), views_control, control_scale
            )
            for part, (h, w) in zip(noise.chunk(len(batch_phases)), batch_phases, strict=True):
                value[:, :, h::d, w::d] = part
        return value[:, :, pad_h:, pad_w:]

    def _stage_noise(self, latents, t, uncond, cond, settings, generator, control_scale: float = 0.0) -> torch.Tensor:
        """The merged prediction ``(1 - c2) * local + c2 * dilated`` for the (scaled) latent at ``t``."""
        factor = cosine_factor(t, self.scheduler.config.num_train_timesteps)
        c2 = cosine_weight(factor, settings.cosine_scale_2)
        noise = 0
        if c2 < 1:
            noise = (1 - c2) * self._local_noise(latents, t, uncond, cond, settings, generator, control_scale)
        if c2 > 0:
            noise = noise + c2 * self._dilated_noise(latents, t, uncond, cond, settings, factor, control_scale)
        return noise

    # ------------------------------------------------------------------ one stage
    def denoise_stage(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        uncond: TextConditioning | None,
        cond: TextConditioning,
        settings: StageSettings,
        generator: torch.Generator | list[torch.Generator] | None,
        extra_step_kwargs: dict[str, Any],
        callback_on_step_end: Callable | None = None,
        stage: int = 0,
    ) -> torch.Tensor:
        """Re-noise the upsampled ``latents`` to ``timesteps[0]``, then denoise with the skip residual."""
        clean = latents
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        latents = self.scheduler.add_noise(clean, noise, timesteps[:1])
        num_train = self.scheduler.config.num_train_timesteps
        jitter_generator = generator[0] if isinstance(generator, list) else generator
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            progress_bar.set_description(
                f"stage {stage} {latents.shape[-1] * self.vae_scale_factor}x"
                f"{latents.shape[-2] * self.vae_scale_factor}"
            )
            for i, t in enumerate(timesteps):
                if getattr(self, "_interrupt", False):  # set by callbacks through pipe._interrupt
                    continue
                c1 = cosine_weight(cosine_factor(t, num_train), settings.cosine_scale_1)
                if c1 > 0:
                    latents = (1 - c1) * latents + c1 * self.scheduler.add_noise(clean, noise, t.reshape(1))
                model_input = self.scheduler.scale_model_input(latents, t)
                control_scale = settings.control.scale_at(i) if settings.control is not None else 0.0
                noise_pred = self._stage_noise(model_input, t, uncond, cond, settings, jitter_generator, control_scale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        return latents
