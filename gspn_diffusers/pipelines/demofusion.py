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
the crop is the window's offset in pixels for a window and (0, 0) otherwise; given ``original_size``,
``target_size`` or ``crops_coords_top_left`` (and their negatives) replace those in every call, a window's
offset being added to the given crop.

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

This module holds what differs between SD-1.5 and SD-XL; ``__call__`` (Diffusers' numbered sections) is
:mod:`.hires`'s, the checks and the stage plan :mod:`.planning`'s, one stage's denoising :mod:`.denoising`'s,
decoding :mod:`.vae_io`'s and the ControlNet's control images :mod:`.control`'s.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .denoising import TextConditioning
from .hires import DemoFusionMixin, DemoFusionPipelineOutput
from .stages import LOCAL_MODES

__all__ = ["LOCAL_MODES", "DemoFusionPipelineOutput", "GSPNDemoFusionPipeline", "GSPNDemoFusionSDXLPipeline"]


SDXL_ONLY = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class GSPNDemoFusionPipeline(DemoFusionMixin, StableDiffusionPipeline):
    """DemoFusion-style high-resolution SD-1.5 (and SD-2) pipeline; build it with ``from_pipe(pipe)``
    (``from_pipe(pipe, controlnet=...)``, or from a ``StableDiffusionControlNetPipeline``, adds a ControlNet).

    The safety checker is not run on the high-resolution images.
    """

    _optional_components = [*StableDiffusionPipeline._optional_components, "controlnet"]
    controlnet_pipeline_class = StableDiffusionControlNetPipeline
    default_guidance_scale = 7.5

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        controlnet: ControlNetModel | None = None,
    ) -> None:
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder,
            requires_safety_checker,
        )
        self._init_control(controlnet)

    def _check_prompt_inputs(self, prompts, height, width, tensor_inputs):
        if prompts["prompt_2"] is not None or prompts["negative_prompt_2"] is not None:
            raise ValueError(
                "prompt_2 and negative_prompt_2 are for SD-XL's second text encoder; this model has one: "
                "use prompt and negative_prompt."
            )
        given = [name for name in SDXL_ONLY if prompts[name] is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)}: SD-XL's arguments; this SD-1.5-style model has no pooled embeddings."
            )
        self.check_inputs(
            prompts["prompt"],
            height,
            width,
            None,
            prompts["negative_prompt"],
            prompts["prompt_embeds"],
            prompts["negative_prompt_embeds"],
            tensor_inputs,
        )

    def _micro_conditioning(self, height, width, given):
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)}: SD-XL's micro-conditioning; this SD-1.5-style model has none.")
        return {}

    def _encode_conditioning(self, prompts, micro, device, num_images_per_prompt, do_cfg, lora_scale):
        embeds, negative = self.encode_prompt(
            prompts["prompt"],
            device,
            num_images_per_prompt,
            do_cfg,
            prompts["negative_prompt"],
            prompt_embeds=prompts["prompt_embeds"],
            negative_prompt_embeds=prompts["negative_prompt_embeds"],
            lora_scale=lora_scale,
        )
        return (TextConditioning(negative) if do_cfg else None), TextConditioning(embeds)

    def _base_kwargs(self, prompts, micro):
        return {}

    def _controlnet_pipeline_kwargs(self):
        return {"requires_safety_checker": False}

    def _unet_kwargs(self, conds, crops, final_size):
        return {"encoder_hidden_states": torch.cat([c.embeds.repeat(len(crops), 1, 1) for c in conds])}


class GSPNDemoFusionSDXLPipeline(DemoFusionMixin, StableDiffusionXLPipeline):
    """DemoFusion-style high-resolution SD-XL pipeline; build it with ``from_pipe(pipe)``
    (``from_pipe(pipe, controlnet=...)``, or from a ``StableDiffusionXLControlNetPipeline``, adds a ControlNet).

    SD-XL's size conditioning (``time_ids``) follows DemoFusion: original and target size are the
    final image's size in every UNet call, the base's included; the crop is a window's top-left
    offset in pixels, (0, 0) for the whole latent and the dilated sub-latents. Given sizes and crops
    (and their negatives) replace these, a window adding its offset to the given crop.
    """

    _optional_components = [*StableDiffusionXLPipeline._optional_components, "controlnet"]
    controlnet_pipeline_class = StableDiffusionXLControlNetPipeline
    default_guidance_scale = 5.0

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        controlnet: ControlNetModel | None = None,
    ) -> None:
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self._init_control(controlnet)

    def _check_prompt_inputs(self, prompts, height, width, tensor_inputs):
        self.check_inputs(
            prompts["prompt"],
            prompts["prompt_2"],
            height,
            width,
            None,
            prompts["negative_prompt"],
            prompts["negative_prompt_2"],
            prompts["prompt_embeds"],
            prompts["negative_prompt_embeds"],
            prompts["pooled_prompt_embeds"],
            prompts["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )

    def _micro_conditioning(self, height, width, given):
        for name, value in given.items():
            if value is not None and (len(value) != 2 or not all(isinstance(v, int) for v in value)):
                raise ValueError(f"{name} must be a pair of integers (height, width) in pixels; got {value!r}.")
        original = tuple(given["original_size"] or (height, width))
        crop = tuple(given["crops_coords_top_left"] or (0, 0))
        target = tuple(given["target_size"] or (height, width))
        return {
            "original_size": original,
            "crops_coords_top_left": crop,
            "target_size": target,
            "negative_original_size": tuple(given["negative_original_size"] or original),
            "negative_crops_coords_top_left": tuple(given["negative_crops_coords_top_left"] or crop),
            "negative_target_size": tuple(given["negative_target_size"] or target),
        }

    def _encode_conditioning(self, prompts, micro, device, num_images_per_prompt, do_cfg, lora_scale):
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts["prompt"],
            prompt_2=prompts["prompt_2"],
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=prompts["negative_prompt"],
            negative_prompt_2=prompts["negative_prompt_2"],
            prompt_embeds=prompts["prompt_embeds"],
            negative_prompt_embeds=prompts["negative_prompt_embeds"],
            pooled_prompt_embeds=prompts["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=prompts["negative_pooled_prompt_embeds"],
            lora_scale=lora_scale,
        )
        cond = TextConditioning(
            embeds, pooled, micro["original_size"], micro["crops_coords_top_left"], micro["target_size"]
        )
        if not do_cfg:
            return None, cond
        uncond = TextConditioning(
            negative,
            negative_pooled,
            micro["negative_original_size"],
            micro["negative_crops_coords_top_left"],
            micro["negative_target_size"],
        )
        return uncond, cond

    def _base_kwargs(self, prompts, micro):
        return {
            "prompt_2": prompts["prompt_2"],
            "negative_prompt_2": prompts["negative_prompt_2"],
            "pooled_prompt_embeds": prompts["pooled_prompt_embeds"],
            "negative_pooled_prompt_embeds": prompts["negative_pooled_prompt_embeds"],
            **micro,
        }

    def _controlnet_pipeline_kwargs(self):
        return {"force_zeros_for_empty_prompt": self.config.force_zeros_for_empty_prompt, "add_watermarker": False}

    def _unet_kwargs(self, conds, crops, final_size):
        embeds = conds[0].embeds
        if self.text_encoder_2 is None:
            projection_dim = int(conds[0].pooled.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim

        def time_ids(cond: TextConditioning, offset: tuple[int, int]) -> torch.Tensor:
            top, left = cond.crops_coords_top_left
            ids = self._get_add_time_ids(
                cond.original_size or final_size,
                (top + offset[0], left + offset[1]),
                cond.target_size or final_size,
                embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
            return ids.repeat(cond.embeds.shape[0], 1)

        return {
            "encoder_hidden_states": torch.cat([c.embeds.repeat(len(crops), 1, 1) for c in conds]),
            "added_cond_kwargs": {
                "text_embeds": torch.cat([c.pooled.repeat(len(crops), 1) for c in conds]),
                "time_ids": torch.cat([time_ids(c, crop) for c in conds for crop in crops]).to(embeds.device),
            },
        }
