"""The ``__call__`` shared by the high-resolution pipelines of :mod:`.demofusion`, in Diffusers' numbered sections.

See :mod:`.demofusion` for the method. The mixin here runs the base image (the parent pipeline's own loop, or
Diffusers' ControlNet pipeline of the family with a control image), then every upscaling stage: plan
(:mod:`.planning`), upsample and decode (:mod:`.vae_io`), denoise (:mod:`.denoising`), with the ControlNet's
control images (:mod:`.control`). What differs between SD-1.5 and SD-XL (prompt encoding, micro-conditioning,
the UNet's conditioning arguments) is the families' in :mod:`.demofusion`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import empty_device_cache

from ..convert import is_converted
from ..models import gspn_components
from .budget import gspn_backend_for, memory_budget
from .chunking import kept_feed_forward_chunking
from .control import ControlNetStagesMixin
from .denoising import StageDenoisingMixin, StageSettings, TextConditioning
from .planning import StagePlanningMixin
from .stages import kept_steps, match_statistics
from .vae_io import DecodeOptions, StageDecodingMixin, show_stage_images

logger = logging.getLogger(__name__)

# SD-XL's micro-conditioning arguments of __call__, in the order of its time ids, positive then negative.
MICRO_CONDITIONING = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


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


class DemoFusionMixin(StagePlanningMixin, StageDecodingMixin, StageDenoisingMixin, ControlNetStagesMixin):
    """``__call__`` of the SD-1.5 and SD-XL pipelines: the base image, then the upscaling stages.

    Subclasses implement :meth:`_check_prompt_inputs`, :meth:`_micro_conditioning`, :meth:`_encode_conditioning`,
    :meth:`_base_kwargs`, :meth:`_unet_kwargs` and what :class:`~.control.ControlNetStagesMixin` asks for.
    """

    # Stage callbacks get (and may replace) the latents only; the base loop checks the same list.
    _callback_tensor_inputs = ["latents"]
    default_guidance_scale: float

    # ------------------------------------------------------------------ what the families supply
    def _check_prompt_inputs(self, prompts: dict[str, Any], height: int, width: int, tensor_inputs: list[str]) -> None:
        """The parent pipeline's ``check_inputs`` on the prompt arguments (``prompts``: prompts and embeddings)."""
        raise NotImplementedError

    def _micro_conditioning(
        self, height: int, width: int, given: dict[str, tuple[int, int] | None]
    ) -> dict[str, tuple[int, int]]:
        """SD-XL's six size conditions resolved (DemoFusion's defaults: the final size, crop (0, 0))."""
        raise NotImplementedError

    def _encode_conditioning(
        self,
        prompts: dict[str, Any],
        micro: dict[str, tuple[int, int]],
        device: torch.device,
        num_images_per_prompt: int,
        do_cfg: bool,
        lora_scale: float | None,
    ) -> tuple[TextConditioning | None, TextConditioning]:
        """The unconditional (``None`` without CFG) and conditional branches of the upscaling stages."""
        raise NotImplementedError

    def _base_kwargs(self, prompts: dict[str, Any], micro: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """The family's own arguments of the base image's text-to-image call."""
        raise NotImplementedError

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Diffusers' ``from_pipe`` (same components, no copy), keeping the source pipeline's dtype and its GSPN
        models (Diffusers carries over only the exact classes of the signature, not their GSPN subclasses).

        Diffusers casts to float32 unless ``torch_dtype`` is given, which would also upcast the
        shared components of the fp16/bf16 pipeline it was built from. A ControlNet pipeline's ``controlnet``
        comes along; ``controlnet=`` adds one.
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

    # ------------------------------------------------------------------ the base stage
    def _base_latents(self, base_kwargs: dict[str, Any], control: dict[str, Any] | None) -> torch.Tensor:
        """The base image's latents by the parent pipeline's own loop, or by Diffusers' ControlNet pipeline of
        the family when there is a control image."""
        if control is None:
            return super().__call__(**base_kwargs)[0]
        return self.controlled_base_latents(base_kwargs, control)

    # ------------------------------------------------------------------ memory
    @contextlib.contextmanager
    def _parked(self, enabled: bool, names: tuple[str, ...], device: torch.device) -> Iterator[None]:
        """DemoFusion's ``lowvram``: the named models wait on the CPU while they are not needed and come back on
        exit (DemoFusion leaves them there). Nothing moves on the CPU or when model offloading already does it."""
        modules = [getattr(self, name, None) for name in names] if enabled and device.type != "cpu" else []
        modules = [m for m in modules if m is not None and not getattr(self, "_all_hooks", None)]
        places = [m.device for m in modules]
        for module in modules:
            module.to("cpu")
        try:
            yield
        finally:
            for module, place in zip(modules, places, strict=True):
                module.to(place)

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
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        denoising_end: float | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        image: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        multi_decoder: bool = False,
        lowvram: bool = False,
        show_image: bool = False,
    ) -> DemoFusionPipelineOutput | tuple:
        r"""Generate an image at ``height x width`` (any size and aspect ratio from the native size up).

        Args:
            prompt, negative_prompt, num_inference_steps, num_images_per_prompt, generator (one, or a list
            of one per image), output_type, return_dict, guidance_rescale, prompt_embeds, negative_prompt_embeds,
            cross_attention_kwargs, eta: as in the Diffusers text-to-image pipeline, for the base image and
                every stage alike; ``num_inference_steps`` is the length of every stage's schedule before skipping.
            prompt_2, negative_prompt_2, pooled_prompt_embeds, negative_pooled_prompt_embeds: SD-XL's, as in
                its pipeline.
            original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size: SD-XL's micro-conditioning in every UNet call
                (default DemoFusion's: the final size, crop (0, 0); the negatives default to the positives); a
                local window's crop is the given crop plus its offset in pixels.
            height, width: the target in pixels, multiples of the VAE factor (default: 2x native).
            guidance_scale: CFG scale (default: the parent pipeline's, 7.5 for SD-1.5, 5.0 for SD-XL).
            latents: initial noise of the base stage, as in Diffusers.
            denoising_end: stop the last stage at this fraction of the whole schedule (Diffusers' SD-XL rule), for
                a refiner to finish (its ``denoising_start``); that latent is returned noisy and not rescaled.
            image: a picture to upscale instead of generating the base image (the GSPN paper's and LinFusion's
                super-resolution): resized to the base size of the plan (as Diffusers' img2img resizes) and
                encoded; the first stage re-noises it to its ``strength``.
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end: the
                ControlNet's (the ``controlnet`` component's) input and schedule, as in Diffusers' ControlNet
                pipelines; each stage resizes the control image to its size and each view takes its part.
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
                for the original attention (in the UNet or the ControlNet). The choice and its reason are logged.
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
            tiled_vae: decode (and encode) with Diffusers' tiled VAE; ``None``: when the latent is larger than
                the native one.
            multi_decoder: decode large latents with DemoFusion's seam-free tiled decoder
                (:func:`~.vae_io.decode_latents_multi`) instead of Diffusers' tiled VAE.
            lowvram: DemoFusion's: the text encoders wait on the CPU during the upscaling stages and the VAE
                during each stage's denoising (both back afterwards), and the multi-decoder takes smaller tiles.
            show_image: show every stage's image as it is done (in a notebook; DemoFusion's option).
            return_stages: also return every stage's result (base first), in ``output_type``.

        Returns:
            :class:`DemoFusionPipelineOutput`, or ``(images, stage_images)`` when ``return_dict`` is False.
        """
        # 0. Defaults
        height = height or 2 * self.native_size
        width = width or 2 * self.native_size
        stride = stride or self.window // 2
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        prompts = {
            "prompt": prompt,
            "prompt_2": prompt_2,
            "negative_prompt": negative_prompt,
            "negative_prompt_2": negative_prompt_2,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
        }
        given_sizes = dict(
            zip(
                MICRO_CONDITIONING,
                (
                    original_size,
                    crops_coords_top_left,
                    target_size,
                    negative_original_size,
                    negative_crops_coords_top_left,
                    negative_target_size,
                ),
                strict=True,
            )
        )
        decode = DecodeOptions(tiled_vae, multi_decoder, lowvram)
        control_guidance = (control_guidance_start, control_guidance_end)

        # 1. Check inputs
        sizes = self.plan_stages(height, width) if max(height, width) >= self.native_size else [(height, width)]
        strengths = self.stage_strengths(strength, skip_ratio, len(sizes) - 1)
        self.check_hires_inputs(
            height,
            width,
            strengths,
            local_denoising,
            view_batch_size,
            stride,
            upsample,
            output_type,
            image=image,
            latents=latents,
            denoising_end=denoising_end,
            multi_decoder=multi_decoder,
            tiled_vae=tiled_vae,
            control_image=control_image,
            control_guidance=control_guidance,
            guidance_rescale=guidance_rescale,
        )
        self._check_prompt_inputs(prompts, height, width, tensor_inputs)
        micro = self._micro_conditioning(height, width, given_sizes)
        self.warn_few_steps(num_inference_steps, strengths)
        logger.info(
            "Stages (WxH): %s with the %s attention%s",
            " -> ".join(f"{w}x{h}" for h, w in sizes),
            "GSPN" if is_converted(self.unet) else "original",
            ", from the given image" if image is not None else "",
        )

        # 2. Define call parameters
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        do_cfg = guidance_scale > 1
        self._interrupt = False

        # 3. Base image near the model's trained pixel count (or the given image, encoded)
        self.hires_stage = 0
        if image is not None:
            latents = self.encode_start_image(
                image, sizes[0], batch_size * num_images_per_prompt, self.unet.dtype, device, decode
            )
        else:
            base_kwargs = {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "prompt_embeds": prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds,
                "height": sizes[0][0],
                "width": sizes[0][1],
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "num_images_per_prompt": num_images_per_prompt,
                "eta": eta,
                "generator": generator,
                "latents": latents,
                "output_type": "latent",
                "return_dict": False,
                "cross_attention_kwargs": cross_attention_kwargs,
                "guidance_rescale": guidance_rescale,
                "callback_on_step_end": callback_on_step_end,
                "callback_on_step_end_tensor_inputs": tensor_inputs,
                **self._base_kwargs(prompts, micro),
            }
            control = None
            if control_image is not None:
                control = {
                    "image": control_image,
                    "controlnet_conditioning_scale": controlnet_conditioning_scale,
                    "control_guidance_start": control_guidance_start,
                    "control_guidance_end": control_guidance_end,
                }
            latents = self._base_latents(base_kwargs, control)
        anchor = latents
        stage_outputs = [] if return_stages else None
        self._keep_stage(latents, 0, output_type, decode, stage_outputs, show_image)

        # 4. Encode input prompt once for the upscaling stages; the GSPN backend that will run
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        uncond, cond = self._encode_conditioning(prompts, micro, device, num_images_per_prompt, do_cfg, lora_scale)
        native_area = self.window**2
        backend = gspn_backend_for(device) if is_converted(self.unet) else "reference"  # offloaded or not
        common = {
            "stride": stride,
            "cosine_scale_1": cosine_scale_1,
            "cosine_scale_2": cosine_scale_2,
            "cosine_scale_3": cosine_scale_3,
            "sigma": sigma,
            "forward_chunking": forward_chunking,
        }

        # 5. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Denoising loop, per upscaling stage: upsample, re-noise, denoise, rescale to the base's statistics
        text_encoders = ("text_encoder", "text_encoder_2")
        with kept_feed_forward_chunking(self.unet), self._parked(lowvram, text_encoders, device):
            for stage, (stage_h, stage_w) in enumerate(sizes[1:], start=1):
                self.hires_stage = stage
                last = stage == len(sizes) - 1
                latent_size = (stage_h // self.vae_scale_factor, stage_w // self.vae_scale_factor)
                split = split_cfg if split_cfg is not None else latent_size[0] * latent_size[1] > 4 * native_area
                samples = latents.shape[0] * (2 if do_cfg and not split else 1)
                budget = memory_budget(device, max_memory)  # after the previous stage's memory was freed
                mode, reason, views = self.plan_stage_memory(
                    latent_size, local_denoising, view_batch_size, samples, common, budget, backend
                )
                latents = self.upsample_latents(latents, latent_size, upsample, decode)
                strength_k = strengths[stage - 1]
                timesteps = self.stage_timesteps(
                    num_inference_steps, strength_k, device, denoising_end if last else None
                )
                control = None
                if control_image is not None:
                    control = self._stage_control(
                        control_image,
                        (stage_h, stage_w),
                        batch_size * num_images_per_prompt,
                        num_images_per_prompt,
                        cosine_scale_2 is not None,
                        controlnet_conditioning_scale,
                        control_guidance,
                        kept_steps(num_inference_steps, strength_k),
                    )
                settings = StageSettings(
                    guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale,
                    local_denoising=mode,
                    view_batch_size=views,
                    split_cfg=split,
                    final_size=(height, width),
                    cross_attention_kwargs=cross_attention_kwargs,
                    control=control,
                    **common,
                )
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
                with self._parked(lowvram, ("vae",), device):
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
                if not (last and denoising_end is not None):  # a latent left noisy for a refiner keeps its std
                    latents = match_statistics(latents, anchor)
                if not last:
                    self._keep_stage(latents, stage, output_type, decode, stage_outputs, show_image)
                _free_memory(device)

        # 7. Decode
        images = self.to_output(latents, output_type, decode)
        if len(sizes) > 1:
            self._keep_stage(latents, len(sizes) - 1, output_type, decode, stage_outputs, show_image, images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, stage_outputs
        return DemoFusionPipelineOutput(images=images, stage_images=stage_outputs)

    def _keep_stage(
        self,
        latents: torch.Tensor,
        stage: int,
        output_type: str,
        decode: DecodeOptions,
        stage_outputs: list[Any] | None,
        show_image: bool,
        output: Any = None,
    ) -> None:
        """A finished stage's result into ``stage_outputs`` (when the caller asked for the stages) and onto the
        screen (``show_image``), decoded once for both; ``output`` is the stage's already decoded result."""
        if stage_outputs is None and not show_image:
            return
        if output is None:
            output = self.to_output(latents, output_type, decode)
        if stage_outputs is not None:
            stage_outputs.append(output)
        if show_image:
            show_stage_images(output if output_type == "pil" else self.to_output(latents, "pil", decode), stage)


def _free_memory(device: torch.device) -> None:
    """Release what a finished stage left in the accelerator's cache before the next, larger, stage."""
    if device.type != "cpu":
        gc.collect()
        empty_device_cache(device.type)
