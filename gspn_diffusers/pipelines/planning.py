"""Input checks and stage planning of the high-resolution pipelines: everything ``__call__`` decides before a step.

A mixin of :mod:`.demofusion`'s pipelines, kept apart from the denoising loop (:mod:`.denoising`) and decoding
(:mod:`.vae_io`): the checks raise before any model runs (a 16K render must not fail after its base image), and
the plan (stage sizes, strengths, timesteps, local denoising and windows per call by memory) is what the
command line and the benchmarks reuse.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..convert import gspn_config_of, is_converted
from ..loading import native_size
from .budget import largest_view_batch
from .memory import estimate_stage_peak
from .stages import LOCAL_MODES, choose_local_denoising, kept_steps, plan_stage_sizes

logger = logging.getLogger(__name__)

UPSAMPLE_MODES = ("latent", "pixel")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# How messages name the step count and the skip ratio; the command line swaps in its flags.
API_ARGUMENT_NAMES = {"steps": "num_inference_steps", "skip_ratio": "skip_ratio"}


def named(name: str, value: Any) -> str:
    """``num_inference_steps=5`` for an API argument, ``--steps 5`` for a command-line flag."""
    return f"{name} {value}" if name.startswith("--") else f"{name}={value}"


class StagePlanningMixin:
    """Sizes, checks, schedules and the memory plan of the stages; needs ``self.unet``, ``self.scheduler``,
    ``self.vae_scale_factor`` and, for the ControlNet checks, ``self.controlnet``."""

    argument_names = API_ARGUMENT_NAMES

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

    # ------------------------------------------------------------------ checks
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
        *,
        image: Any = None,
        latents: torch.Tensor | None = None,
        denoising_end: float | None = None,
        multi_decoder: bool = False,
        tiled_vae: bool | None = None,
        control_image: Any = None,
        control_guidance: tuple[float, float] = (0.0, 1.0),
        guidance_rescale: float = 0.0,
    ) -> None:
        """The high-resolution arguments, each refused with what to pass instead (the prompt arguments are the
        parent pipeline's ``check_inputs``)."""
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
        if image is not None and latents is not None:
            raise ValueError("Give image (an image to upscale) or latents (the base stage's noise), not both.")
        if image is not None and not strengths:
            raise ValueError(
                f"image= is upscaled by the stages, but the target {width}x{height} has none (it is the base size); "
                "ask for a larger image or use an img2img pipeline."
            )
        if denoising_end is not None:
            if not 0 < denoising_end < 1:
                raise ValueError(f"denoising_end must be in (0, 1) (a fraction of the schedule); got {denoising_end}.")
            if not strengths:
                raise ValueError(
                    "denoising_end stops the last upscaling stage early, but this target has no upscaling stage."
                )
            if denoising_end <= 1 - strengths[-1]:
                raise ValueError(
                    f"denoising_end={denoising_end} ends before the last stage starts (it skips the first "
                    f"{1 - strengths[-1]:.2f} of the schedule); give a denoising_end above {1 - strengths[-1]:.2f}."
                )
        if multi_decoder and tiled_vae:
            raise ValueError(
                "multi_decoder (DemoFusion's tiled decode) and tiled_vae (Diffusers' tiled VAE) are two ways to "
                "decode a large latent; choose one."
            )
        self._check_control_inputs(control_image, control_guidance, guidance_rescale)

    def _check_control_inputs(
        self, control_image: Any, control_guidance: tuple[float, float], guidance_rescale: float
    ) -> None:
        controlnet = getattr(self, "controlnet", None)
        if control_image is not None and controlnet is None:
            raise ValueError(
                "control_image needs a ControlNet: build the pipeline with from_pipe(pipe, controlnet=...) or from a "
                "StableDiffusion(XL)ControlNetPipeline."
            )
        if controlnet is not None and control_image is None:
            raise ValueError(
                "This pipeline has a ControlNet: give its control_image (or from_pipe(..., controlnet=None))."
            )
        if controlnet is None:
            return
        start, end = control_guidance
        if not 0 <= start < end <= 1:
            raise ValueError(
                "control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1; "
                f"got {start}, {end}."
            )
        if guidance_rescale > 0:
            raise ValueError(
                "guidance_rescale is not available with a ControlNet (Diffusers' ControlNet pipelines, which run the "
                "base image, have none); leave it at 0."
            )

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
            named(steps, num_inference_steps),
            named(skip, round(1 - strength, 6)),
            steps,
            skip,
        )

    # ------------------------------------------------------------------ schedules
    def stage_timesteps(
        self, num_inference_steps: int, strength: float, device: torch.device, denoising_end: float | None = None
    ) -> torch.Tensor:
        """The timesteps left after skipping the first ``1 - strength`` of the schedule (as Diffusers' img2img),
        cut at ``denoising_end`` as Diffusers' SD-XL does (the steps with ``t >= round(T (1 - denoising_end))``)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        kept = kept_steps(num_inference_steps, strength)
        start = (num_inference_steps - kept) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        timesteps = self.scheduler.timesteps[start:]
        if denoising_end is not None:
            num_train = self.scheduler.config.num_train_timesteps
            cutoff = int(round(num_train - denoising_end * num_train))
            timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        return timesteps

    # ------------------------------------------------------------------ memory
    def attention_is_linear(self) -> bool:
        """Whether every model that sees the whole latent runs GSPN: the UNet, and the ControlNet if there is one
        (a ControlNet with the original attention is quadratic in tokens, as the original UNet)."""
        if not is_converted(self.unet):
            return False
        controlnet = getattr(self, "controlnet", None)
        if controlnet is None:
            return True
        try:
            return is_converted(controlnet)
        except TypeError:  # convert does not know this ControlNet: it runs the original attention
            return False

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
        (:func:`~.memory.estimate_stage_peak`, the UNet's; a ControlNet's activations are not in it) is only
        traced when a budget makes it matter.
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
            local_denoising, self.attention_is_linear(), lambda: stage_bytes("whole", view_batch_size or 1), budget
        )
        if view_batch_size is None:
            view_batch_size = largest_view_batch(lambda views: stage_bytes(mode, views), budget)
        return mode, reason, view_batch_size
