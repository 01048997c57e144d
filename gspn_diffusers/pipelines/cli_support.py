"""What ``gspn-diffusers generate`` needs to switch to the high-resolution pipeline above the native size, and to
write its images (the flags are in :func:`gspn_diffusers.cli_args.add_hires_args`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..loading import native_size
from ..safe_write import atomic_path
from .demofusion import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline

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
