"""What ``gspn-diffusers generate`` needs to switch to the high-resolution pipeline above the native size, to say
what the run will cost before it starts, and to write its images (the flags are in
:func:`gspn_diffusers.cli_args.add_hires_args`)."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..convert import gspn_config_of, is_converted
from ..errors import GSPNUserError, format_size, is_out_of_memory
from ..loading import native_size
from ..safe_write import atomic_path
from .budget import gspn_backend_for, memory_budget
from .demofusion import DemoFusionMixin, GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline
from .memory import estimate_stage_peak
from .stages import dilation_factor, kept_steps, view_starts

logger = logging.getLogger(__name__)

CLI_ARGUMENT_NAMES = {"steps": "--steps", "skip_ratio": "--skip-ratio"}


def hires_pipeline_for(pipe: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The pipeline to call for ``args.height x args.width`` and its extra keyword arguments.

    Above the native size the loaded pipeline is wrapped (``from_pipe``: same UNet, converted or
    not) in the DemoFusion-style pipeline of its family; otherwise it is returned unchanged.
    """
    native = native_size(pipe)
    if max(args.height or native, args.width or native) <= native:
        return pipe, {}
    if isinstance(pipe, StableDiffusionXLPipeline):
        hires_class = GSPNDemoFusionSDXLPipeline
    elif isinstance(pipe, StableDiffusionPipeline):
        hires_class = GSPNDemoFusionPipeline
    else:
        raise GSPNUserError(
            f"High-resolution generation supports SD-1.5/SD-2 and SD-XL text-to-image pipelines, not "
            f"{type(pipe).__name__}; pass --height and --width of at most {native} with this --model."
        )
    hires = hires_class.from_pipe(pipe)
    hires.argument_names = CLI_ARGUMENT_NAMES  # its messages name the flags, not the API arguments
    logger.info("Target above the native %d px: using %s", native, hires_class.__name__)
    kwargs = {
        "skip_ratio": args.skip_ratio,
        "local_denoising": args.local_denoising,
        "return_stages": args.save_stages,
    }
    return hires, kwargs


def save_image(image: Any, path: str | Path) -> Path:
    """Save a PIL image under a temporary name, then rename it: a failed save leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        image.save(temporary)
    return path


def save_stage_images(result: Any, output: str | Path) -> list[Path]:
    """Write the stage images of a high-resolution result as ``<output stem>_stage<K><suffix>``; none otherwise."""
    stages = getattr(result, "stage_images", None) or []
    output = Path(output)
    paths = [
        save_image(images[0], output.with_name(f"{output.stem}_stage{k}{output.suffix or '.png'}"))
        for k, images in enumerate(stages)
    ]
    if paths:
        logger.info("Saved %d stage images next to %s", len(paths), output)
    return paths


# ---------------------------------------------------------------------------------------------- cost estimate
# A run this long gets a warning that says how long and how to stop it.
LONG_RUN_S = 3600.0
# DemoFusion's defaults, as the CLI calls the pipeline (stride: half the native window; dilated sampling on).
_HIRES_DEFAULTS = {
    "cosine_scale_1": 3.0,
    "cosine_scale_2": 1.0,
    "cosine_scale_3": 1.0,
    "sigma": 0.8,
    "forward_chunking": True,
}


@dataclass
class StageCost:
    """What one stage of a generation is expected to cost, for the log line before the first step."""

    stage: int
    height: int
    width: int
    steps: int
    mode: str  # "whole" (the UNet on the whole latent) or "windows" (DemoFusion's native windows)
    unet_tokens_per_step: int  # latent pixels times CFG samples the UNet sees in one step, every branch together
    peak_bytes: int  # resident weights + the stage's estimated peak activations and latent buffers
    seconds: float


def _weight_bytes(pipe: Any) -> int:
    """Bytes of every model of the pipeline (they stay resident on the device while the stages run)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def available_memory(device: torch.device) -> int | None:
    """Bytes a run on ``device`` can still use: free CUDA memory plus what PyTorch's cache holds unused, free RAM on
    the CPU (the models are loaded already, so they are not in it); None where unknown (MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            import psutil  # a dependency of accelerate
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return None


def measure_unet_step(pipe: Any, args: argparse.Namespace, height: int, width: int) -> tuple[float, int]:
    """Seconds of UNet time in one denoising step at ``height x width`` and the latent tokens (pixels x CFG samples)
    it saw, measured on ``pipe`` (the plain text-to-image pipeline) by a one-step call that is not decoded.

    On a GPU the first call pays one-time costs (the kernel's build and self-check, cuDNN's autotuning), so the
    second of two calls is the one measured.
    """
    device = pipe._execution_device
    calls: list[float] = []
    tokens: list[int] = []
    started: list[float] = []

    def before(module, inputs, kwargs) -> None:
        sample = inputs[0] if inputs else kwargs["sample"]
        tokens.append(sample.shape[0] * sample.shape[-2] * sample.shape[-1])
        started.append(time.perf_counter())

    def after(module, inputs, kwargs, output) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        calls.append(time.perf_counter() - started[-1])

    unet = pipe.unet
    hooks = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        for _ in range(2 if device.type == "cuda" else 1):
            calls.clear()
            tokens.clear()
            pipe(
                prompt=args.prompt,
                negative_prompt=args.negative_prompt,
                height=height,
                width=width,
                num_inference_steps=1,
                guidance_scale=args.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(0),
                output_type="latent",
            )
    finally:
        for hook in hooks:
            hook.remove()
        pipe.set_progress_bar_config(**progress_bar_config)
    return sum(calls), sum(tokens)


def plan_costs(base: Any, pipe: Any, args: argparse.Namespace) -> list[StageCost]:
    """The stages ``pipe`` will run for ``args`` (one for a plain pipeline, the base and every upscaling stage for
    the high-resolution one), each with its steps, mode, estimated peak memory and time.

    Memory: the meta-device estimate the high-resolution pipeline plans with
    (:func:`~.memory.estimate_stage_peak`, for the GSPN backend that runs on this device) plus the weights.
    Time: one measured UNet step at the first stage's size (:func:`measure_unet_step`), scaled by the tokens the
    UNet sees per step at each stage (the local branch: the whole latent or every window; DemoFusion's dilated
    branch: the whole latent again in sub-latents). GSPN and convolutions are linear in tokens, so this holds
    for the GSPN UNet; the original attention on a whole latent grows faster (there it is a lower bound).
    """
    device = base._execution_device
    native = native_size(base)
    factor = base.vae_scale_factor
    window = native // factor
    height, width = args.height or native, args.width or native
    hires = isinstance(pipe, DemoFusionMixin)
    sizes = pipe.plan_stages(height, width) if hires else [(height, width)]
    unet = base.unet
    converted = is_converted(unet)
    gspn_config = gspn_config_of(unet) if converted else None
    backend = gspn_backend_for(device) if converted else "reference"
    do_cfg = args.guidance_scale > 1
    samples = 2 if do_cfg else 1
    weights = _weight_bytes(base)
    budget = memory_budget(device, None)
    logger.info("Timing one UNet step at %dx%d for the cost estimate", sizes[0][1], sizes[0][0])
    seconds, tokens = measure_unet_step(base, args, *sizes[0])
    per_token = seconds / max(tokens, 1)
    stride = window // 2
    costs = []
    for k, (stage_h, stage_w) in enumerate(sizes):
        lh, lw = stage_h // factor, stage_w // factor
        # The base runs the parent pipeline's loop (CFG batched); above 4x the native area CFG runs in two calls.
        per_call = 1 if k > 0 and lh * lw > 4 * window * window else samples
        mode, views, steps, dilated = "whole", 1, args.steps, k > 0
        if k > 0:
            steps = kept_steps(args.steps, 1.0 - args.skip_ratio)
            common = {"stride": stride, **_HIRES_DEFAULTS}
            mode, _, views = pipe.plan_stage_memory(
                (lh, lw), args.local_denoising, None, per_call, common, budget, backend
            )
        peak = estimate_stage_peak(
            dict(unet.config),
            lh,
            lw,
            unet.dtype,
            backend,
            mode,
            gspn_config=gspn_config,
            view_batch_size=views,
            stride=stride,
            cfg_batch=per_call,
            dilated=dilated,
            forward_chunking=k > 0,
        )
        if mode == "whole":
            local = lh * lw
        else:
            local = len(view_starts(lh, window, stride)) * len(view_starts(lw, window, stride)) * window * window
        if dilated:  # the sub-latents of the (padded) latent: every pixel once more
            d = dilation_factor(lh, lw, window)
            local += -(-lh // d) * d * -(-lw // d) * d
        step_tokens = samples * local
        seconds_per_stage = steps * step_tokens * per_token
        costs.append(StageCost(k, stage_h, stage_w, steps, mode, step_tokens, weights + peak, seconds_per_stage))
    return costs


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``, ``2.1 days``: one unit, as precise as an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def announce_costs(base: Any, pipe: Any, args: argparse.Namespace) -> list[StageCost]:
    """Log, before the first denoising step, each stage's estimated peak memory on the device in use and its
    time; warn when a stage will not fit the memory that is free (with the flags that lower it) and when the
    whole run will take hours (with how to stop it). Returns the estimates."""
    device = base._execution_device
    try:
        costs = plan_costs(base, pipe, args)
    except Exception as error:  # noqa: BLE001 - an estimate must never stop the generation it describes
        if is_out_of_memory(error):  # the generation itself would run out too: the CLI says what to lower
            raise
        logger.warning("No cost estimate for this run (%s: %s); generating anyway.", type(error).__name__, error)
        return []
    available = available_memory(device)
    weights = _weight_bytes(base)
    for cost in costs:
        logger.info(
            "Stage %d/%d %dx%d: %d steps, %s, peak about %s on %s, about %s",
            cost.stage,
            len(costs) - 1,
            cost.width,
            cost.height,
            cost.steps,
            "whole latent" if cost.mode == "whole" else "windows",
            format_size(cost.peak_bytes),
            device,
            format_duration(cost.seconds),
        )
    total = sum(cost.seconds for cost in costs)
    logger.info(
        "Estimated UNet time: about %s on %s (scaled from one measured step at %dx%d)",
        format_duration(total),
        device,
        costs[0].width,
        costs[0].height,
    )
    largest = max(costs, key=lambda cost: cost.peak_bytes)
    if available is not None and largest.peak_bytes - weights > available:
        logger.warning(
            "Stage %d (%dx%d) needs about %s but only %s are free on %s: it will probably run out of memory; lower "
            "--height/--width%s.",
            largest.stage,
            largest.width,
            largest.height,
            format_size(largest.peak_bytes),
            format_size(available + weights),
            device,
            ", or pass --local-denoising windows" if largest.mode == "whole" and largest.stage > 0 else "",
        )
    if total > LONG_RUN_S:
        megapixels = costs[-1].width * costs[-1].height / 1e6
        logger.warning(
            "This %.0f-megapixel run will take about %s on %s. Ctrl-C stops it (nothing is saved before the end); "
            "a smaller --height/--width or a GPU is faster.",
            megapixels,
            format_duration(total),
            device,
        )
    return costs
