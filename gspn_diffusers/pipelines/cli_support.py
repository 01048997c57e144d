"""What ``gspn-diffusers generate`` needs to switch to the high-resolution pipeline above the native size."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..loading import native_size
from .demofusion import LOCAL_MODES, GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline

logger = logging.getLogger(__name__)

CLI_ARGUMENT_NAMES = {"steps": "--steps", "skip_ratio": "--skip-ratio"}


def add_hires_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the high-resolution path; they only matter when the target is larger than the native size."""
    group = parser.add_argument_group("high resolution (used when --height/--width exceed the native size)")
    group.add_argument(
        "--skip-ratio", type=float, default=0.6, help="Fraction of each upscaling stage's steps skipped, in [0, 1)."
    )
    group.add_argument(
        "--local-denoising",
        choices=LOCAL_MODES,
        default="auto",
        help="whole: the whole latent (GSPN); windows: overlapping native windows (DemoFusion); auto: whole with "
        "GSPN where the memory estimate fits the device, else windows.",
    )
    group.add_argument(
        "--save-stages", action="store_true", help="Also save every stage's image next to --output (name_stageK.png)."
    )


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
        raise ValueError(
            f"High-resolution generation supports SD-1.5/SD-2 and SD-XL text-to-image pipelines, not "
            f"{type(pipe).__name__}; generate at most {native} px with it."
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


def save_stage_images(result: Any, output: str | Path) -> list[Path]:
    """Write the stage images of a high-resolution result as ``<output stem>_stage<K>.png``; none otherwise."""
    stages = getattr(result, "stage_images", None) or []
    output = Path(output)
    paths = []
    for k, images in enumerate(stages):
        path = output.with_name(f"{output.stem}_stage{k}{output.suffix or '.png'}")
        images[0].save(path)
        paths.append(path)
    if paths:
        logger.info("Saved %d stage images next to %s", len(paths), output)
    return paths
