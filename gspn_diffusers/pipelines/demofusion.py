"""High-resolution generation, DemoFusion-style, for SD-1.5 and SD-XL with GSPN or the original attention.

A base image is generated near the model's trained pixel count, at the target's aspect ratio
(:func:`~.stages.base_size`), by the pipeline's own text-to-image loop; then each stage upsamples
the previous latent (bicubic in latent space, or decode, resize and encode with ``upsample="pixel"``),
re-noises it to the stage's ``strength`` (the first ``skip_ratio = 1 - strength`` of the steps are
skipped, as in the GSPN paper; a list gives one strength per stage, as LinFusion lowers it) and
denoises it with DemoFusion's three mechanisms:

- **skip residual**: before each step the latent is pulled towards the re-noised upsampled
  latent, ``latents = (1 - c1) * latents + c1 * add_noise(upsampled, noise, t)`` with
  ``c1 = cos_factor(t) ** cosine_scale_1``;
- **local denoising**: the UNet on the whole latent at once (``"whole"``: GSPN is linear in tokens,
  so this is the paper's point), or on DemoFusion's overlapping native-size windows
  (``"windows"``); ``"auto"`` takes the whole latent with GSPN when the meta-device estimate of
  the stage fits the accelerator's free memory, windows otherwise and for the original attention;
- **dilated sampling**: the UNet on the ``d x d`` dilated sub-latents ``latents[h::d, w::d]``
  of a Gaussian-filtered copy (``sigma * c3``), mixed with weight ``c2 = cos_factor(t) ** cosine_scale_2``.

After a stage's denoising loop, before it is decoded or upsampled again, its latent is rescaled to
the base latent's mean and std, as DemoFusion and LinFusion do. SD-XL's micro-conditioning follows
DemoFusion: original and target size are the final size in every UNet call (the base's included),
the crop is the window's offset in pixels for a window and (0, 0) otherwise.

Unlike DemoFusion, the branches are merged as noise predictions (a per-pixel average) and the
scheduler steps once per timestep on the whole latent. For schedulers whose step is linear in
(sample, prediction), such as DDIM and Euler, this equals DemoFusion's average of per-view steps;
multistep and ancestral schedulers keep a consistent state (one step per timestep, one noise draw).
Jittered windows stay inside the latent and the dilated branch pads by replication, where
DemoFusion feeds zero padding to the UNet. Means and stds (the latent rescaling, the blurred copy)
are per image, where DemoFusion takes them over the batch (the same for one image).

A cosine scale of ``None`` is the limit ``scale -> inf``: its weight is exactly 0 and the term is
off. With ``cosine_scale_1=None``, ``cosine_scale_2=None`` and ``local_denoising="whole"`` a stage
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
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import empty_device_cache

from ..convert import gspn_config_of, is_converted
from ..loading import native_size
from ..models import gspn_components
from .budget import gspn_backend_for, largest_view_batch, memory_budget
from .chunking import kept_feed_forward_chunking
from .denoising import StageDenoisingMixin, StageSettings, TextConditioning
from .memory import estimate_stage_peak
from .stages import (
    LOCAL_MODES,
    choose_local_denoising,
    kept_steps,
    match_statistics,
    plan_stage_sizes,
)
from .vae_io import decode_latents, encode_images

logger = logging.getLogger(__name__)

UPSAMPLE_MODES = ("latent", "pixel")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# How messages name the step count and the skip ratio; the command line swaps in its flags.
API_ARGUMENT_NAMES = {"steps": "num_inference_steps", "skip_ratio": "skip_ratio"}


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


class DemoFusionMixin(StageDenoisingMixin):
    """The stages shared by the SD-1.5 and SD-XL pipelines: planning, checks, upsampling and ``__call__``.

    Subclasses implement :meth:`_encode_conditioning`, :meth:`_base_kwargs` and :meth:`_unet_kwargs`;
    one stage's denoising is :class:`~.denoising.StageDenoisingMixin`'s.
    """

    # Stage callbacks get (and may replace) the latents only; the base loop checks the same list.
    _callback_tensor_inputs = ["latents"]
    argument_names = API_ARGUMENT_NAMES

    def _encode_conditioning(
        self, prompts: dict[str, Any], device: torch.device, num_images_per_prompt: int, do_cfg: bool
    ) -> tuple[TextConditioning | None, TextConditioning]:
        """``prompts``: ``prompt``, ``prompt_2``, ``negative_prompt``, ``negative_prompt_2`` as given."""
        raise NotImplementedError

    def _base_kwargs(self, prompts: dict[str, Any], height: int, width: int) -> dict[str, Any]:
        """Extra arguments of the base image's text-to-image call for a final ``height x width`` image."""
        raise NotImplementedError

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Diffusers' ``from_pipe`` (same components, no copy), keeping the source pipeline's dtype and its GSPN UNet.

        Diffusers casts to float32 unless ``torch_dtype`` is given, which would also upcast the
        shared components of the fp16/bf16 pipeline it was built from.
        """
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype
        kwargs = {**gspn_components(pipeline), **kwargs}
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
        strengths: list[float],
        local_denoising: str,
        view_batch_size: int | None,
        stride: int,
        upsample: str,
        output_type: str,
    ) -> None:
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of the VAE's latent factor {factor}; got {width}x{height}. "
                f"Try {width // factor * factor}x{height // factor * factor}."
            )
        if max(height, width) < self.native_size:
            raise ValueError(
                f"The target {width}x{height} is smaller than the model's native size: its long side must be at "
                f"least {self.native_size} px. Use the plain pipeline for smaller images."
            )
        for strength in strengths:
            if not 0 < strength <= 1:
                raise ValueError(
                    f"strength must be in (0, 1] (skip_ratio = 1 - strength in [0, 1)); got strength={strength:g}."
                )
        if local_denoising not in LOCAL_MODES:
            raise ValueError(f"local_denoising must be one of {', '.join(LOCAL_MODES)}; got {local_denoising!r}.")
        if view_batch_size is not None and view_batch_size < 1:
            raise ValueError(f"view_batch_size must be None (sized by memory) or at least 1; got {view_batch_size}.")
        window = self.window
        if not 0 < stride <= window:
            raise ValueError(f"stride must be in [1, {window}] latent pixels (the native window); got {stride}.")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}; got {upsample!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")

    def stage_strengths(
        self, strength: float | list[float] | None, skip_ratio: float | list[float] | None, num_stages: int
    ) -> list[float]:
        """One strength per upscaling stage from ``strength`` or ``skip_ratio`` (a number, or one per stage)."""
        if skip_ratio is not None and strength is not None:
            raise ValueError("Give skip_ratio or strength (= 1 - skip_ratio), not both.")
        if strength is None:
            skip_ratio = 0.6 if skip_ratio is None else skip_ratio
            strength = [1.0 - s for s in skip_ratio] if isinstance(skip_ratio, list | tuple) else 1.0 - skip_ratio
        if not isinstance(strength, list | tuple):
            return [float(strength)] * num_stages
        if len(strength) != num_stages:
            raise ValueError(
                f"A strength (or skip_ratio) schedule needs one value per upscaling stage: this target has "
                f"{num_stages}, got {len(strength)}. See pipe.plan_stages(height, width)."
            )
        return [float(s) for s in strength]

    def warn_few_steps(self, num_inference_steps: int, strengths: list[float]) -> None:
        """One warning when a stage keeps fewer than 2 steps, in the caller's names (API or command line)."""
        few = [(k, kept_steps(num_inference_steps, s), s) for k, s in enumerate(strengths, start=1)]
        few = [item for item in few if item[1] < 2]
        if not few:
            return
        steps, skip = self.argument_names["steps"], self.argument_names["skip_ratio"]
        stage, kept, strength = few[0]
        logger.warning(
            "Upscaling stage %d keeps only %d of %s denoising steps (%s, %s): a stage needs at least 2 to add detail; "
            "raise %s or lower %s.",
            stage,
            kept,
            num_inference_steps,
            _named(steps, num_inference_steps),
            _named(skip, round(1 - strength, 6)),
            steps,
            skip,
        )

    def stage_timesteps(self, num_inference_steps: int, strength: float, device: torch.device) -> torch.Tensor:
        """The timesteps left after skipping the first ``1 - strength`` of the schedule (as Diffusers' img2img)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        kept = kept_steps(num_inference_steps, strength)
        start = (num_inference_steps - kept) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    # ------------------------------------------------------------------ memory
    def plan_stage_memory(
        self,
        latent_size: tuple[int, int],
        local_denoising: str,
        view_batch_size: int | None,
        samples: int,
        settings: dict[str, Any],
        budget: float | None,
        backend: str,
    ) -> tuple[str, str, int]:
        """The stage's local denoising, the reason, and its windows per UNet call, from the memory estimate.

        ``samples`` is the UNet batch per latent view (CFG branches batched x images); the estimate
        (:func:`~.memory.estimate_stage_peak`) is only traced when a budget makes it matter.
        """
        converted = is_converted(self.unet)

        def stage_bytes(mode: str, views: int) -> int:
            return estimate_stage_peak(
                dict(self.unet.config),
                *latent_size,
                self.unet.dtype,
                backend,
                mode,
                gspn_config=gspn_config_of(self.unet) if converted else None,
                view_batch_size=views,
                stride=settings["stride"],
                cfg_batch=samples,
                dilated=settings["cosine_scale_2"] is not None,
                forward_chunking=settings["forward_chunking"],
            )

        mode, reason = choose_local_denoising(
            local_denoising, converted, lambda: stage_bytes("whole", view_batch_size or 1), budget
        )
        if view_batch_size is None:
            view_batch_size = largest_view_batch(lambda views: stage_bytes(mode, views), budget)
        return mode, reason, view_batch_size

    # ------------------------------------------------------------------ decoding and upsampling
    def decode_latents_tiled(self, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
        """VAE decode to ``[-1, 1]`` images; ``tiled`` uses Diffusers' tiled VAE (constant memory in the size)."""
        return decode_latents(self.vae, latents, tiled)

    def _tiled(self, latent_size: tuple[int, int], tiled_vae: bool | None) -> bool:
        return tiled_vae if tiled_vae is not None else max(latent_size) > self.window

    def _to_output(self, latents: torch.Tensor, output_type: str, tiled_vae: bool | None) -> Any:
        if output_type == "latent":
            return latents
        image = self.decode_latents_tiled(latents, self._tiled(latents.shape[-2:], tiled_vae))
        return self.image_processor.postprocess(image, output_type=output_type)

    def upsample_latents(
        self, latents: torch.Tensor, size: tuple[int, int], upsample: str, tiled_vae: bool | None
    ) -> torch.Tensor:
        """The previous stage's latent at the next stage's latent ``size``: bicubic in latent space (DemoFusion),
        or in pixel space (``"pixel"``: decode, bicubic resize, encode), which avoids interpolating latents."""
        if upsample == "latent":
            return F.interpolate(latents, size=size, mode="bicubic", align_corners=False)
        factor = self.vae_scale_factor
        image = self.decode_latents_tiled(latents, self._tiled(latents.shape[-2:], tiled_vae))
        image = F.interpolate(image.float(), size=(size[0] * factor, size[1] * factor), mode="bicubic")
        return encode_images(self.vae, image.clamp(-1, 1), self._tiled(size, tiled_vae), latents.dtype)

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
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        guidance_rescale: float = 0.0,
        skip_ratio: float | list[float] | None = None,
        strength: float | list[float] | None = None,
        local_denoising: str = "auto",
        max_memory: int | None = None,
        view_batch_size: int | None = None,
        stride: int | None = None,
        upsample: str = "latent",
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
            prompt, negative_prompt, num_inference_steps, num_images_per_prompt, generator (one, or a list
            of one per image), output_type, return_dict, guidance_rescale: as in the Diffusers text-to-image
                pipeline; ``num_inference_steps`` is the length of every stage's schedule before skipping.
            prompt_2, negative_prompt_2: SD-XL's prompts for its second text encoder (default: the first's).
            height, width: the target in pixels, multiples of the VAE factor (default: 2x native).
            guidance_scale: CFG scale (default: the parent pipeline's, 7.5 for SD-1.5, 5.0 for SD-XL).
            latents: initial noise of the base stage, as in Diffusers.
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after every step of every
                stage (``pipe.hires_stage`` tells which, 0 is the base); only ``"latents"`` can be requested.
            skip_ratio: fraction of each upscaling stage's steps skipped, in [0, 1) (default 0.6), or a list
                of one per upscaling stage. A stage keeps ``max(1, int(steps * (1 - skip_ratio)))`` steps.
            strength: ``1 - skip_ratio``, in (0, 1], or a list of one per upscaling stage (LinFusion lowers
                it stage by stage); give one of the two. ``pipe.plan_stages(height, width)`` lists the stages.
            local_denoising: ``"whole"`` (the UNet on the whole latent: affordable with GSPN, linear in
                tokens), ``"windows"`` (DemoFusion's overlapping native-size windows), or ``"auto"``: the
                whole latent with GSPN when the stage's estimated peak memory (for the GSPN backend in
                use, :func:`~.memory.estimate_stage_peak`) fits the memory budget, else windows; windows
                for the original attention. The choice and its reason are logged per stage.
            max_memory: bytes a stage may use beyond the loaded models (default: 85 % of the free CUDA
                memory; no limit on the CPU).
            view_batch_size: windows (and dilated sub-latents) per UNet call; ``None``: the most, up to
                DemoFusion's 16, that fit the memory budget.
            stride: step between local windows in latent pixels (default: half the native window,
                DemoFusion's 64 for SD-XL).
            upsample: ``"latent"`` (bicubic on the latent, DemoFusion) or ``"pixel"`` (decode, bicubic
                resize of the image, encode) between stages.
            cosine_scale_1, cosine_scale_2, cosine_scale_3: DemoFusion's cosine scales of the skip
                residual (3), of the local/dilated mix (1) and of the Gaussian filter's sigma (1);
                ``None`` switches the term off exactly (the limit of an infinite scale: c1 = 0 means no
                residual, c2 = 0 means no dilated sampling, c3 = 0.01 leaves almost no blur).
            sigma: Gaussian sigma of the dilated branch (DemoFusion's 0.8).
            split_cfg: run the unconditional and conditional batches as two UNet calls (less memory).
                ``None``: at stages with more than 4x the native latent area.
            forward_chunking: chunk the transformer feed-forwards over tokens at the upscaling stages.
            tiled_vae: decode (and encode) with the tiled VAE; ``None``: when the latent is larger than the
                native one.
            return_stages: also return every stage's result (base first), in ``output_type``.

        Returns:
            :class:`DemoFusionPipelineOutput`, or ``(images, stage_images)`` when ``return_dict`` is False.
        """
        # 0. Defaults
        height = height or 2 * self.native_size
        width = width or 2 * self.native_size
        stride = stride or self.window // 2
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        prompts = {
            "prompt": prompt,
            "prompt_2": prompt_2,
            "negative_prompt": negative_prompt,
            "negative_prompt_2": negative_prompt_2,
        }

        # 1. Check inputs
        sizes = self.plan_stages(height, width) if max(height, width) >= self.native_size else [(height, width)]
        strengths = self.stage_strengths(strength, skip_ratio, len(sizes) - 1)
        self.check_hires_inputs(
            height, width, strengths, local_denoising, view_batch_size, stride, upsample, output_type
        )
        self.warn_few_steps(num_inference_steps, strengths)
        converted = is_converted(self.unet)
        logger.info(
            "Stages (WxH): %s with the %s attention",
            " -> ".join(f"{w}x{h}" for h, w in sizes),
            "GSPN" if converted else "original",
        )

        # 2. Base image near the model's trained pixel count, by the parent pipeline's own loop
        self.hires_stage = 0
        base_kwargs = self._base_kwargs(prompts, height, width)
        if guidance_scale is not None:
            base_kwargs["guidance_scale"] = guidance_scale
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
            guidance_rescale=guidance_rescale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            **base_kwargs,
        )[0]
        anchor = latents
        stage_outputs = [self._to_output(latents, output_type, tiled_vae)] if return_stages else None

        # 3. Encode the prompt once for the upscaling stages; the GSPN backend that will run
        device = self._execution_device
        guidance_scale = self.guidance_scale
        do_cfg = guidance_scale > 1
        uncond, cond = self._encode_conditioning(prompts, device, num_images_per_prompt, do_cfg)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        native_area = self.window**2
        backend = gspn_backend_for(device) if converted else "reference"  # where the UNet runs, offloaded or not
        common = {
            "stride": stride,
            "cosine_scale_1": cosine_scale_1,
            "cosine_scale_2": cosine_scale_2,
            "cosine_scale_3": cosine_scale_3,
            "sigma": sigma,
            "forward_chunking": forward_chunking,
        }

        # 4. Upscaling stages: upsample, re-noise, denoise, rescale to the base's statistics
        with kept_feed_forward_chunking(self.unet):
            for stage, (stage_h, stage_w) in enumerate(sizes[1:], start=1):
                self.hires_stage = stage
                latent_size = (stage_h // self.vae_scale_factor, stage_w // self.vae_scale_factor)
                split = split_cfg if split_cfg is not None else latent_size[0] * latent_size[1] > 4 * native_area
                samples = latents.shape[0] * (2 if do_cfg and not split else 1)
                budget = memory_budget(device, max_memory)  # after the previous stage's memory was freed
                mode, reason, views = self.plan_stage_memory(
                    latent_size, local_denoising, view_batch_size, samples, common, budget, backend
                )
                settings = StageSettings(
                    guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale,
                    local_denoising=mode,
                    view_batch_size=views,
                    split_cfg=split,
                    final_size=(height, width),
                    **common,
                )
                latents = self.upsample_latents(latents, latent_size, upsample, tiled_vae)
                timesteps = self.stage_timesteps(num_inference_steps, strengths[stage - 1], device)
                logger.info(
                    "Stage %d/%d %dx%d: %d of %d steps, %s (%s), up to %d views (windows, dilated sub-latents) "
                    "per UNet call, CFG %s",
                    stage,
                    len(sizes) - 1,
                    stage_w,
                    stage_h,
                    len(timesteps),
                    num_inference_steps,
                    "whole latent" if mode == "whole" else "windows",
                    reason,
                    views,
                    "in two calls" if split else "batched",
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
                latents = match_statistics(latents, anchor)
                if return_stages and stage < len(sizes) - 1:
                    stage_outputs.append(self._to_output(latents, output_type, tiled_vae))
                _free_memory(device)

        # 5. Decode
        images = self._to_output(latents, output_type, tiled_vae)
        if return_stages and len(sizes) > 1:
            stage_outputs.append(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, stage_outputs
        return DemoFusionPipelineOutput(images=images, stage_images=stage_outputs)


def _named(name: str, value: Any) -> str:
    """``num_inference_steps=5`` for an API argument, ``--steps 5`` for a command-line flag."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value}"


def _free_memory(device: torch.device) -> None:
    """Release what a finished stage left in the accelerator's cache before the next, larger, stage."""
    if device.type != "cpu":
        gc.collect()
        empty_device_cache(device.type)


class GSPNDemoFusionPipeline(DemoFusionMixin, StableDiffusionPipeline):
    """DemoFusion-style high-resolution SD-1.5 (and SD-2) pipeline; build it with ``from_pipe(pipe)``.

    The safety checker is not run on the high-resolution images.
    """

    def _encode_conditioning(self, prompts, device, num_images_per_prompt, do_cfg):
        embeds, negative = self.encode_prompt(
            prompts["prompt"], device, num_images_per_prompt, do_cfg, prompts["negative_prompt"]
        )
        return (TextConditioning(negative) if do_cfg else None), TextConditioning(embeds)

    def _base_kwargs(self, prompts, height, width):
        if prompts["prompt_2"] is not None or prompts["negative_prompt_2"] is not None:
            raise ValueError(
                "prompt_2 and negative_prompt_2 are for SD-XL's second text encoder; this model has one: "
                "use prompt and negative_prompt."
            )
        return {}

    def _unet_kwargs(self, conds, crops, final_size):
        return {"encoder_hidden_states": torch.cat([c.embeds.repeat(len(crops), 1, 1) for c in conds])}


class GSPNDemoFusionSDXLPipeline(DemoFusionMixin, StableDiffusionXLPipeline):
    """DemoFusion-style high-resolution SD-XL pipeline; build it with ``from_pipe(pipe)``.

    SD-XL's size conditioning (``time_ids``) follows DemoFusion: original and target size are the
    final image's size in every UNet call, the base's included; the crop is a window's top-left
    offset in pixels, (0, 0) for the whole latent and the dilated sub-latents.
    """

    def _encode_conditioning(self, prompts, device, num_images_per_prompt, do_cfg):
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts["prompt"],
            prompt_2=prompts["prompt_2"],
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=prompts["negative_prompt"],
            negative_prompt_2=prompts["negative_prompt_2"],
        )
        return (TextConditioning(negative, negative_pooled) if do_cfg else None), TextConditioning(embeds, pooled)

    def _base_kwargs(self, prompts, height, width):
        return {
            "prompt_2": prompts["prompt_2"],
            "negative_prompt_2": prompts["negative_prompt_2"],
            "original_size": (height, width),
            "target_size": (height, width),
        }

    def _unet_kwargs(self, conds, crops, final_size):
        embeds = conds[0].embeds
        if self.text_encoder_2 is None:
            projection_dim = int(conds[0].pooled.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = torch.cat(
            [
                self._get_add_time_ids(
                    final_size, crop, final_size, embeds.dtype, text_encoder_projection_dim=projection_dim
                ).repeat(embeds.shape[0], 1)
                for crop in crops
            ]
        ).to(embeds.device)
        return {
            "encoder_hidden_states": torch.cat([c.embeds.repeat(len(crops), 1, 1) for c in conds]),
            "added_cond_kwargs": {
                "text_embeds": torch.cat([c.pooled.repeat(len(crops), 1) for c in conds]),
                "time_ids": time_ids.repeat(len(conds), 1),
            },
        }
