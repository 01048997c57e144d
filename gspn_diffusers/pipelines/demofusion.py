"""High-resolution generation, DemoFusion-style, for SD-1.5 and SD-XL with GSPN or the original attention.

A base image is generated at the model's native size by the pipeline's own text-to-image loop;
then each stage upsamples the previous latent (bicubic), re-noises it to the stage's ``strength``
(the first ``skip_ratio = 1 - strength`` of the steps are skipped, as in the GSPN paper) and
denoises it with DemoFusion's three mechanisms:

- **skip residual**: before each step the latent is pulled towards the re-noised upsampled
  latent, ``latents = (1 - c1) * latents + c1 * add_noise(upsampled, noise, t)`` with
  ``c1 = cos_factor(t) ** cosine_scale_1``;
- **local denoising**: the UNet on overlapping native-size windows (``"views"``), or on the
  whole latent at once (``"full"``, the default with GSPN up to 64x the native latent area:
  its cost is linear in tokens);
- **dilated sampling**: the UNet on the ``d x d`` dilated sub-latents ``latents[h::d, w::d]``
  of a Gaussian-filtered copy (``sigma * c3``), mixed with weight ``c2 = cos_factor(t) ** cosine_scale_2``.

Unlike DemoFusion, the branches are merged as noise predictions (a per-pixel average) and the
scheduler steps once per timestep on the whole latent. For schedulers whose step is linear in
(sample, prediction), such as DDIM and Euler, this equals DemoFusion's average of per-view steps;
multistep and ancestral schedulers keep a consistent state (one step per timestep, one noise draw).
Jittered windows stay inside the latent and the dilated branch pads by replication, where
DemoFusion feeds zero padding to the UNet.

A cosine scale of ``None`` is the limit ``scale -> inf``: its weight is exactly 0 and the term is
off. With ``cosine_scale_1=None``, ``cosine_scale_2=None`` and ``local_denoising="full"`` a stage
is plain SDEdit: re-noise once at the stage's start timestep, then denoise (the tests check this
against Diffusers' img2img pipelines).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import empty_device_cache, randn_tensor

from ..convert import is_converted
from ..loading import native_size
from .stages import (
    cosine_factor,
    cosine_weight,
    dilated_views,
    dilation_factor,
    gaussian_blur,
    get_views,
    plan_stage_sizes,
    resolve_local_denoising,
)

logger = logging.getLogger(__name__)

LOCAL_MODES = ("auto", "views", "full")


class _EmptyFp32ListFilter(logging.Filter):
    """Drops Diffusers' "modules ... should be kept in float32: []" warning, which ``ModelMixin.to(dtype=...)``
    prints even when the list is empty: ``from_pipe`` casts the UNet and the VAE, so every high-resolution run
    printed it twice for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@dataclass
class DemoFusionPipelineOutput(BaseOutput):
    """``images``: the final images; ``stage_images``: one entry per stage (base first) when asked for, else None."""

    images: list[PIL.Image.Image] | Any
    stage_images: list[Any] | None = None


@dataclass
class TextConditioning:
    """Text conditioning of one CFG branch: token embeddings and, for SD-XL, the pooled embedding."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


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


class DemoFusionMixin:
    """The stage logic shared by the SD-1.5 and SD-XL pipelines; they differ only in the text conditioning.

    Subclasses implement :meth:`_encode_conditioning` and :meth:`_unet_kwargs`.
    """

    def _encode_conditioning(
        self, prompt, negative_prompt, device: torch.device, num_images_per_prompt: int, do_cfg: bool
    ) -> tuple[TextConditioning | None, TextConditioning]:
        raise NotImplementedError

    def _unet_kwargs(self, conds: list[TextConditioning], repeat: int, height: int, width: int) -> dict[str, Any]:
        """UNet keyword arguments for the branches ``conds`` (concatenated), each repeated for ``repeat`` views
        of ``height x width`` pixels."""
        raise NotImplementedError

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Diffusers' ``from_pipe`` (same components, no copy), keeping the source pipeline's dtype.

        Diffusers casts to float32 unless ``torch_dtype`` is given, which would also upcast the
        shared components of the fp16/bf16 pipeline it was built from.
        """
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype
        modeling_logger, quiet = logging.getLogger("diffusers.models.modeling_utils"), _EmptyFp32ListFilter()
        modeling_logger.addFilter(quiet)
        try:
            return super().from_pipe(pipeline, **kwargs)
        finally:
            modeling_logger.removeFilter(quiet)

    # ------------------------------------------------------------------ sizes and checks
    @property
    def native_size(self) -> int:
        """The model's native image size in pixels (1024 for SD-XL, 512 for SD-1.5)."""
        return native_size(self)

    @property
    def window(self) -> int:
        """The UNet's native latent size (128 for SD-XL, 64 for SD-1.5): the local windows' size."""
        return self.native_size // self.vae_scale_factor

    def plan_stages(self, height: int, width: int) -> list[tuple[int, int]]:
        """Pixel sizes of the base and of every stage (see :func:`~.stages.plan_stage_sizes`)."""
        return plan_stage_sizes(height, width, self.native_size, self.vae_scale_factor)

    def check_hires_inputs(
        self,
        height: int,
        width: int,
        num_inference_steps: int,
        strength: float,
        local_denoising: str,
        view_batch_size: int,
        stride: int,
    ) -> None:
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of the VAE's latent factor {factor}; got {width}x{height}. "
                f"Try {width // factor * factor}x{height // factor * factor}."
            )
        if max(height, width) < self.native_size:
            raise ValueError(
                f"The target {width}x{height} is smaller than the base size: its long side must be at least the "
                f"model's native {self.native_size} px. Use the plain pipeline for smaller images."
            )
        if not 0 < strength <= 1:
            raise ValueError(
                f"strength must be in (0, 1] (skip_ratio = 1 - strength in [0, 1)); got strength={strength}."
            )
        if _kept_steps(num_inference_steps, strength) < 1:
            raise ValueError(
                f"strength={strength} keeps no step of {num_inference_steps}; raise num_inference_steps or strength."
            )
        if local_denoising not in LOCAL_MODES:
            raise ValueError(f"local_denoising must be one of {', '.join(LOCAL_MODES)}; got {local_denoising!r}.")
        if view_batch_size < 1:
            raise ValueError(f"view_batch_size must be at least 1; got {view_batch_size}.")
        window = self.window
        if not 0 < stride <= window:
            raise ValueError(f"stride must be in [1, {window}] latent pixels (the native window); got {stride}.")

    def stage_timesteps(self, num_inference_steps: int, strength: float, device: torch.device) -> torch.Tensor:
        """The timesteps left after skipping the first ``1 - strength`` of the schedule (as Diffusers' img2img)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        kept = _kept_steps(num_inference_steps, strength)
        start = (num_inference_steps - kept) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    # ------------------------------------------------------------------ UNet calls
    def _guided_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        uncond: TextConditioning | None,
        cond: TextConditioning,
        settings: StageSettings,
    ) -> torch.Tensor:
        """Classifier-free-guided noise prediction for ``latents`` holding ``n_views * batch`` samples (view-major).

        With ``split_cfg`` the unconditional and conditional halves run as two UNet calls, which
        halves the activations at the same total work.
        """
        height, width = latents.shape[-2:]
        if settings.forward_chunking:
            chunk_feed_forward(self.unet, height, width)
        repeat = latents.shape[0] // cond.embeds.shape[0]
        factor = self.vae_scale_factor

        def unet(conds: list[TextConditioning]) -> torch.Tensor:
            kwargs = self._unet_kwargs(conds, repeat, height * factor, width * factor)
            return self.unet(latents.repeat(len(conds), 1, 1, 1), t, return_dict=False, **kwargs)[0]

        if uncond is None:
            return unet([cond])
        if settings.split_cfg:
            noise_uncond, noise_text = unet([uncond]), unet([cond])
        else:
            noise_uncond, noise_text = unet([uncond, cond]).chunk(2)
        return noise_uncond + settings.guidance_scale * (noise_text - noise_uncond)

    def _local_noise(self, latents, t, uncond, cond, settings, generator) -> torch.Tensor:
        """Local branch: the whole latent at once, or the average over overlapping native windows."""
        if settings.local_denoising == "full":
            return self._guided_noise(latents, t, uncond, cond, settings)
        views = get_views(*latents.shape[-2:], self.window, settings.stride, jitter=True, generator=generator)
        value = torch.zeros_like(latents)
        count = torch.zeros_like(latents[:1, :1])
        for i in range(0, len(views), settings.view_batch_size):
            batch_views = views[i : i + settings.view_batch_size]
            crops = torch.cat([latents[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in batch_views])
            noise = self._guided_noise(crops, t, uncond, cond, settings).chunk(len(batch_views))
            for part, (h0, h1, w0, w1) in zip(noise, batch_views, strict=True):
                value[:, :, h0:h1, w0:w1] += part
                count[:, :, h0:h1, w0:w1] += 1
        return value / count

    def _dilated_noise(self, latents, t, uncond, cond, settings, factor: float) -> torch.Tensor:
        """Global branch: the UNet on the dilated sub-latents of a Gaussian-filtered copy of the latent."""
        height, width = latents.shape[-2:]
        d = dilation_factor(height, width, self.window)
        pad_h, pad_w = (d - height % d) % d, (d - width % d) % d
        padded = F.pad(latents, (pad_w, 0, pad_h, 0), mode="replicate") if pad_h or pad_w else latents
        c3 = 0.99 * cosine_weight(factor, settings.cosine_scale_3) + 1e-2
        blurred = gaussian_blur(padded, 2 * d - 1, settings.sigma * c3)
        if blurred is not padded:
            blurred = (blurred - blurred.mean()) / blurred.std() * padded.std() + padded.mean()
        value = torch.empty_like(padded)
        phases = dilated_views(d)
        for i in range(0, len(phases), settings.view_batch_size):
            batch_phases = phases[i : i + settings.view_batch_size]
            crops = torch.cat([blurred[:, :, h::d, w::d] for h, w in batch_phases])
            noise = self._guided_noise(crops, t, uncond, cond, settings).chunk(len(batch_phases))
            for part, (h, w) in zip(noise, batch_phases, strict=True):
                value[:, :, h::d, w::d] = part
        return value[:, :, pad_h:, pad_w:]

    def _stage_noise(self, latents, t, uncond, cond, settings, generator) -> torch.Tensor:
        """The merged prediction ``(1 - c2) * local + c2 * dilated`` for the (scaled) latent at ``t``."""
        factor = cosine_factor(t, self.scheduler.config.num_train_timesteps)
        c2 = cosine_weight(factor, settings.cosine_scale_2)
        noise = 0
        if c2 < 1:
            noise = (1 - c2) * self._local_noise(latents, t, uncond, cond, settings, generator)
        if c2 > 0:
            noise = noise + c2 * self._dilated_noise(latents, t, uncond, cond, settings, factor)
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
                noise_pred = self._stage_noise(model_input, t, uncond, cond, settings, jitter_generator)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    # ------------------------------------------------------------------ decoding
    def decode_latents_tiled(self, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
        """VAE decode to ``[-1, 1]`` images; ``tiled`` uses Diffusers' tiled VAE (constant memory in the size)."""
        vae = self.vae
        needs_upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcast:
            vae.to(dtype=torch.float32)
        dtype = next(iter(vae.post_quant_conv.parameters())).dtype
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        was_tiling = getattr(vae, "use_tiling", False)
        vae.use_tiling = tiled
        try:
            image = vae.decode(latents.to(dtype), return_dict=False)[0]
        finally:
            vae.use_tiling = was_tiling
            if needs_upcast:
                vae.to(dtype=torch.float16)
        return image

    def _to_output(self, latents: torch.Tensor, output_type: str, tiled_vae: bool | None) -> Any:
        if output_type == "latent":
            return latents
        tiled = tiled_vae if tiled_vae is not None else max(latents.shape[-2:]) > self.window
        image = self.decode_latents_tiled(latents, tiled)
        return self.image_processor.postprocess(image, output_type=output_type)

    # ------------------------------------------------------------------ __call__
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        skip_ratio: float | None = None,
        strength: float | None = None,
        local_denoising: str = "auto",
        view_batch_size: int = 16,
        stride: int | None = None,
        cosine_scale_1: float | None = 3.0,
        cosine_scale_2: float | None = 1.0,
        cosine_scale_3: float | None = 1.0,
        sigma: float = 0.8,
        split_cfg: bool | None = None,
        forward_chunking: bool = True,
        tiled_vae: bool | None = None,
        return_stages: bool = False,
    ) -> DemoFusionPipelineOutput | tuple:
        r"""Generate an image at ``height x width`` (any size and aspect ratio from the native size up).

        Args:
            prompt, negative_prompt, num_inference_steps, num_images_per_prompt, generator, output_type,
            return_dict: as in the Diffusers text-to-image pipeline; ``num_inference_steps`` is the length
                of every stage's schedule before skipping.
            height, width: the target in pixels, multiples of the VAE factor (default: 2x native).
            guidance_scale: CFG scale (default: the parent pipeline's, 7.5 for SD-1.5, 5.0 for SD-XL).
            latents: initial noise of the base stage, as in Diffusers.
            callback_on_step_end: called after every step of every stage with ``{"latents": ...}``
                (``pipe.hires_stage`` tells which stage); only ``"latents"`` can be requested.
            skip_ratio: fraction of each upscaling stage's steps skipped, in [0, 1) (default 0.6).
            strength: ``1 - skip_ratio``, in (0, 1]; give one of the two.
            local_denoising: ``"views"`` (DemoFusion's overlapping native-size windows), ``"full"``
                (the UNet on the whole latent: affordable with GSPN, linear in tokens), or ``"auto"``
                (``"full"`` for a GSPN-converted UNet up to 64x the native latent area, e.g. 8192x4096
                for SD-XL, ``"views"`` above that and for the original attention).
            view_batch_size: windows (and dilated sub-latents) per UNet call (DemoFusion's default 16).
            stride: step between local windows in latent pixels (default: half the native window,
                DemoFusion's 64 for SD-XL).
            cosine_scale_1, cosine_scale_2, cosine_scale_3: DemoFusion's cosine scales of the skip
                residual (3), of the local/dilated mix (1) and of the Gaussian filter's sigma (1);
                ``None`` switches the term off exactly (the limit of an infinite scale: c1 = 0 means no
                residual, c2 = 0 means no dilated sampling, c3 = 0.01 leaves almost no blur).
            sigma: Gaussian sigma of the dilated branch (DemoFusion's 0.8).
            split_cfg: run the unconditional and conditional batches as two UNet calls (less memory).
                ``None``: at stages with more than 4x the native latent area.
            forward_chunking: chunk the transformer feed-forwards over tokens at the upscaling stages.
            tiled_vae: decode with the tiled VAE; ``None``: when the latent is larger than the native one.
            return_stages: also return every stage's result (base first), in ``output_type``.

        Returns:
            :class:`DemoFusionPipelineOutput`, or ``(images, stage_images)`` when ``return_dict`` is False.
        """
        # 0. Defaults
        height = height or 2 * self.native_size
        width = width or 2 * self.native_size
        if skip_ratio is not None and strength is not None:
            raise ValueError("Give skip_ratio or strength (= 1 - skip_ratio), not both.")
        strength = 1.0 - (0.6 if skip_ratio is None else skip_ratio) if strength is None else strength
        stride = stride or self.window // 2
        converted = is_converted(self.unet)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs
        self.check_hires_inputs(height, width, num_inference_steps, strength, local_denoising, view_batch_size, stride)
        if set(tensor_inputs) - {"latents"}:
            raise ValueError("The high-resolution pipeline passes only 'latents' to callback_on_step_end.")
        sizes = self.plan_stages(height, width)
        logger.info(
            "Stages (WxH): %s with the %s attention",
            " -> ".join(f"{w}x{h}" for h, w in sizes),
            "GSPN" if converted else "original",
        )

        # 2. Base image at the native size, by the parent pipeline's own loop
        self.hires_stage = 0
        base_kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        latents = super().__call__(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=sizes[0][0],
            width=sizes[0][1],
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            **base_kwargs,
        )[0]
        stage_outputs = [self._to_output(latents, output_type, tiled_vae)] if return_stages else None

        # 3. Encode the prompt once for the upscaling stages
        device = self._execution_device
        guidance_scale = self.guidance_scale
        do_cfg = guidance_scale > 1
        uncond, cond = self._encode_conditioning(prompt, negative_prompt, device, num_images_per_prompt, do_cfg)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        native_area = self.window**2

        # 4. Upscaling stages: upsample, re-noise, denoise
        try:
            for stage, (stage_h, stage_w) in enumerate(sizes[1:], start=1):
                self.hires_stage = stage
                latent_h, latent_w = stage_h // self.vae_scale_factor, stage_w // self.vae_scale_factor
                settings = StageSettings(
                    guidance_scale=guidance_scale,
                    local_denoising=resolve_local_denoising(
                        local_denoising, converted, latent_h * latent_w, native_area
                    ),
                    view_batch_size=view_batch_size,
                    stride=stride,
                    cosine_scale_1=cosine_scale_1,
                    cosine_scale_2=cosine_scale_2,
                    cosine_scale_3=cosine_scale_3,
                    sigma=sigma,
                    split_cfg=split_cfg if split_cfg is not None else latent_h * latent_w > 4 * native_area,
                    forward_chunking=forward_chunking,
                )
                latents = F.interpolate(latents, size=(latent_h, latent_w), mode="bicubic", align_corners=False)
                timesteps = self.stage_timesteps(num_inference_steps, strength, device)
                logger.info(
                    "Stage %d/%d %dx%d: %d steps, local denoising %s, CFG %s",
                    stage,
                    len(sizes) - 1,
                    stage_w,
                    stage_h,
                    len(timesteps),
                    settings.local_denoising,
                    "in two calls" if settings.split_cfg else "batched",
                )
                latents = self.denoise_stage(
                    latents,
                    timesteps,
                    uncond,
                    cond,
                    settings,
                    generator,
                    extra_step_kwargs,
                    callback_on_step_end,
                    stage,
                )
                if return_stages and stage < len(sizes) - 1:
                    stage_outputs.append(self._to_output(latents, output_type, tiled_vae))
                _free_memory(device)
        finally:
            if forward_chunking:
                chunk_feed_forward(self.unet, None)

        # 5. Decode
        images = self._to_output(latents, output_type, tiled_vae)
        if return_stages and len(sizes) > 1:
            stage_outputs.append(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, stage_outputs
        return DemoFusionPipelineOutput(images=images, stage_images=stage_outputs)


def _kept_steps(num_inference_steps: int, strength: float) -> int:
    """Diffusers' ``int(steps * strength)``, robust to ``1 - 0.8 = 0.19999...`` (10 steps at skip 0.8 keep 2)."""
    return min(int(num_inference_steps * strength + 1e-6), num_inference_steps)


def _free_memory(device: torch.device) -> None:
    """Release what a finished stage left in the accelerator's cache before the next, 4x larger, stage."""
    if device.type != "cpu":
        gc.collect()
        empty_device_cache(device.type)


def chunk_feed_forward(unet: torch.nn.Module, height: int | None, width: int | None = None) -> None:
    """Chunk every transformer feed-forward over tokens for a ``height x width`` UNet input (``None``: off).

    Diffusers' chunk size must divide the token count, which differs per UNet level, so each
    block gets its own: its level's tokens split in up to 16 equal parts.
    """
    num_levels = len(unet.config.block_out_channels)
    for name, module in unet.named_modules():
        if not hasattr(module, "set_chunk_feed_forward"):
            continue
        if height is None:
            module.set_chunk_feed_forward(None, 0)
            continue
        level = _block_level(name, num_levels)
        tokens = _level_size(height, level) * _level_size(width, level)
        chunks = next(p for p in (16, 8, 4, 2, 1) if tokens % p == 0)
        module.set_chunk_feed_forward(tokens // chunks, dim=1)


def _block_level(name: str, num_levels: int) -> int:
    """The resolution level (0 = full latent) of a UNet submodule from its name."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_levels - 1 - int(parts[1])
    return num_levels - 1


def _level_size(size: int, level: int) -> int:
    """Latent size after ``level`` stride-2 downsamplings (padding 1, so each one rounds up)."""
    for _ in range(level):
        size = (size + 1) // 2
    return size


class GSPNDemoFusionPipeline(DemoFusionMixin, StableDiffusionPipeline):
    """DemoFusion-style high-resolution SD-1.5 (and SD-2) pipeline; build it with ``from_pipe(pipe)``.

    The safety checker is not run on the high-resolution images.
    """

    def _encode_conditioning(self, prompt, negative_prompt, device, num_images_per_prompt, do_cfg):
        embeds, negative = self.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt)
        return (TextConditioning(negative) if do_cfg else None), TextConditioning(embeds)

    def _unet_kwargs(self, conds, repeat, height, width):
        return {"encoder_hidden_states": torch.cat([c.embeds.repeat(repeat, 1, 1) for c in conds])}


class GSPNDemoFusionSDXLPipeline(DemoFusionMixin, StableDiffusionXLPipeline):
    """DemoFusion-style high-resolution SD-XL pipeline; build it with ``from_pipe(pipe)``.

    The size conditioning (``time_ids``) of every UNet call describes the input actually denoised:
    original and target size equal to the window (or the whole latent), crop (0, 0).
    """

    def _encode_conditioning(self, prompt, negative_prompt, device, num_images_per_prompt, do_cfg):
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
        )
        return (TextConditioning(negative, negative_pooled) if do_cfg else None), TextConditioning(embeds, pooled)

    def _unet_kwargs(self, conds, repeat, height, width):
        embeds = conds[0].embeds
        if self.text_encoder_2 is None:
            projection_dim = int(conds[0].pooled.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
        ).to(embeds.device)
        return {
            "encoder_hidden_states": torch.cat([c.embeds.repeat(repeat, 1, 1) for c in conds]),
            "added_cond_kwargs": {
                "text_embeds": torch.cat([c.pooled.repeat(repeat, 1) for c in conds]),
                "time_ids": time_ids.repeat(len(conds) * repeat * embeds.shape[0], 1),
            },
        }
