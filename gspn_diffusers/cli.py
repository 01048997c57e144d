"""``gspn-diffusers``: convert a checkpoint to GSPN and generate images, from the command line.

Each subcommand lives in a function ``add_<name>_parser`` that registers its flags and the
function that runs it, so new jobs (distill, evaluate) plug in without touching the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import PRESETS, GSPNConfig
from .convert import convert, detect_preset, get_unet, gspn_parameters
from .distill.cli import add_distill_parser
from .evaluation.cli import add_evaluate_parser
from .loading import DTYPES, default_device, load_pipeline
from .pipelines.cli_support import add_hires_args, hires_pipeline_for, save_stage_images
from .serialization import load_gspn, save_gspn
from .tiny import TINY_KINDS

logger = logging.getLogger("gspn_diffusers")


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "global") else int(value)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that say which pipeline to load, shared by every subcommand (optional where it has other modes)."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", help="Hub name or local Diffusers folder (SD-1.5, SD-2 or SD-XL family).")
    source.add_argument("--tiny", choices=TINY_KINDS, help="A built-in tiny random model: runs offline in seconds.")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp16 on GPU, fp32 on CPU.")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None, help="GSPN preset (default: from the UNet).")
    parser.add_argument("--gate-rank", type=int, default=None, help="Gate projection rank divisor (C -> C/r).")
    parser.add_argument("--gate-channels", type=int, default=None, help="Gate channels per direction (default C).")
    parser.add_argument(
        "--chunk-size", type=_optional_int, default=None, help="Local GSPN chunk for every layer (overrides preset)."
    )


def config_from_args(args: argparse.Namespace, unet) -> GSPNConfig:
    overrides = {}
    if args.gate_rank is not None:
        overrides["gate_rank"] = args.gate_rank
    if args.gate_channels is not None:
        overrides["gate_channels"] = args.gate_channels
    if args.chunk_size is not None:
        overrides.update(chunk_size=args.chunk_size, layer_chunk_sizes={})
    return GSPNConfig.from_preset(args.preset or detect_preset(unet), **overrides)


def run_convert(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.model, args.tiny, args.device, args.dtype)
    config = config_from_args(args, get_unet(pipe))
    convert(pipe, config)
    params = gspn_parameters(pipe)
    count = sum(p.numel() for p in params.values())
    out = save_gspn(pipe, args.output)
    logger.info(
        "Converted %d self-attention layers (%s preset), %.2fM GSPN parameters -> %s",
        len({k.split(".processor.")[0] for k in params}),
        config.preset,
        count / 1e6,
        out,
    )


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="Replace every UNet self-attention with GSPN (initialised from Q/K/V) and save the weights."
    )
    add_model_args(parser)
    add_config_args(parser)
    parser.add_argument("--output", required=True, help="Folder for gspn_config.json + gspn_weights.safetensors.")
    parser.set_defaults(func=run_convert)


def run_generate(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.model, args.tiny, args.device, args.dtype)
    if args.gspn_weights is not None:
        load_gspn(pipe, args.gspn_weights)
    elif not args.original:
        logger.warning("No --gspn-weights given: GSPN modules are freshly converted from Q/K/V, not distilled.")
        convert(pipe, config_from_args(args, get_unet(pipe)))
    pipe, hires_kwargs = hires_pipeline_for(pipe, args)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    result = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
        **hires_kwargs,
    )
    image = result.images[0]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    save_stage_images(result, output)
    logger.info("Saved %dx%d image to %s", image.width, image.height, output)


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate an image with a GSPN (or the original) pipeline.")
    add_model_args(parser)
    add_config_args(parser)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--gspn-weights", default=None, help="Folder written by `convert` or the distill trainer.")
    weights.add_argument("--original", action="store_true", help="Keep the original attention (for comparison).")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None, help="Pixels, multiple of 8 (default: model's native).")
    parser.add_argument("--width", type=int, default=None, help="Pixels, multiple of 8 (default: model's native).")
    parser.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="gspn_outputs/image.png", help="PNG path to write.")
    add_hires_args(parser)
    parser.set_defaults(func=run_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gspn-diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    add_generate_parser(subparsers)
    add_distill_parser(subparsers)
    add_evaluate_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.device is None:
        args.device = default_device()
    try:
        args.func(args)
    except (ValueError, TypeError, OSError) as error:
        if args.verbose:
            raise
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
