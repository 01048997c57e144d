"""``gspn-diffusers``: convert a checkpoint to GSPN and generate images, from the command line.

Each subcommand lives in a function ``add_<name>_parser`` that registers its flags and the
function that runs it. Only the chosen subcommand's module is imported, and torch and diffusers
only once its arguments are checked, so ``--help`` and argument mistakes answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_args import (
    add_config_args,
    add_hires_args,
    add_model_args,
    check_checkpoint_output,
    check_device,
    check_hires_args,
    check_image_output,
    config_flags_given,
    config_from_args,
    finite_float,
    pixel_size,
    positive_int,
    seed,
)
from .errors import GSPNUserError, failure_message

logger = logging.getLogger("gspn_diffusers")

# Subcommands whose parser lives in another package: imported only when chosen (their modules import torch).
_EXTERNAL_COMMANDS = {
    "distill": (
        "gspn_diffusers.distill.cli",
        "add_distill_parser",
        "Distill the GSPN modules from the original UNet on an image/caption set (Accelerate).",
    ),
    "evaluate": (
        "gspn_diffusers.evaluation.cli",
        "add_evaluate_parser",
        "COCO FID and CLIP-T of a GSPN (or the original) pipeline; run under `accelerate launch` for many GPUs.",
    ),
}


def run_convert(args: argparse.Namespace) -> None:
    output = check_checkpoint_output(args.output, args.overwrite)
    from .convert import convert, get_unet, gspn_parameters
    from .loading import load_pipeline
    from .serialization import save_gspn

    pipe = load_pipeline(args.model, args.tiny, args.device, args.dtype)
    config = config_from_args(args, get_unet(pipe))
    convert(pipe, config)
    params = gspn_parameters(pipe)
    count = sum(p.numel() for p in params.values())
    out = save_gspn(pipe, output, overwrite=args.overwrite, base_model=args.model)
    logger.info(
        "Converted %d self-attention layers (%s preset), %.2fM GSPN parameters -> %s",
        len({k.split(".gspn.")[0] for k in params}),
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
    parser.add_argument("--overwrite", action="store_true", help="Replace GSPN weights already in --output.")
    parser.set_defaults(func=run_convert)


def _check_weight_flags(args: argparse.Namespace) -> None:
    """Conversion flags build a config; saved weights (or --original) bring their own, so both at once is refused."""
    flags = config_flags_given(args)
    if flags and (args.gspn_weights is not None or args.original):
        source = f"--gspn-weights {args.gspn_weights}" if args.gspn_weights is not None else "--original"
        reason = (
            "the weights' gspn_config.json fixes the GSPN config"
            if args.gspn_weights is not None
            else "no GSPN module is installed"
        )
        raise GSPNUserError(
            f"{source} with {' '.join(flags)}: {reason}, so {', '.join(flags)} would be ignored; drop "
            f"{'it' if len(flags) == 1 else 'them'} (or `convert` again with {'it' if len(flags) == 1 else 'them'})."
        )


def run_generate(args: argparse.Namespace) -> None:
    output = check_image_output(args.output)
    _check_weight_flags(args)
    check_hires_args(args)
    import torch

    from .convert import convert, get_unet
    from .loading import load_pipeline
    from .pipelines.cli_support import announce_costs, hires_pipeline_for, save_image, save_stage_images
    from .serialization import check_gspn, load_gspn

    weights = check_gspn(args.gspn_weights) if args.gspn_weights is not None else None
    pipe = load_pipeline(args.model, args.tiny, args.device, args.dtype)
    if weights is not None:
        load_gspn(pipe, weights)
    elif not args.original:
        logger.warning("No --gspn-weights given: GSPN modules are freshly converted from Q/K/V, not distilled.")
        convert(pipe, config_from_args(args, get_unet(pipe)))
    base = pipe
    pipe, hires_kwargs = hires_pipeline_for(base, args)
    announce_costs(base, pipe, args)  # memory and time per stage, before the first step: a 16K render takes long
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
    save_image(image, output)
    save_stage_images(result, output)
    logger.info("Saved %dx%d image to %s", image.width, image.height, output)


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Generate an image with a GSPN (or the original) pipeline.")
    add_model_args(parser)
    add_config_args(parser)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--gspn-weights", default=None, help="Folder written by `convert` or the distill trainer, or a hub repo id."
    )
    weights.add_argument("--original", action="store_true", help="Keep the original attention (for comparison).")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--height", type=pixel_size, default=None, help="Pixels, multiple of 8 (default: model's native)."
    )
    parser.add_argument(
        "--width", type=pixel_size, default=None, help="Pixels, multiple of 8 (default: model's native)."
    )
    parser.add_argument("--steps", type=positive_int, default=30, help="Denoising steps (>= 1).")
    parser.add_argument("--guidance-scale", type=finite_float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--seed", type=seed, default=0, help="Seed of the initial noise, 0..2**64-1.")
    parser.add_argument(
        "--output", default="gspn_outputs/image.png", help="Image path to write (.png, .jpg, .webp, ...)."
    )
    add_hires_args(parser)
    parser.set_defaults(func=run_generate)


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the top level has only flags without values, so it is the first word)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of ``command``; the other external subcommands are listed (for --help) but not imported."""
    parser = argparse.ArgumentParser(prog="gspn-diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging and full tracebacks.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    add_generate_parser(subparsers)
    for name, (module, function, help_text) in _EXTERNAL_COMMANDS.items():
        if name == command:
            getattr(importlib.import_module(module), function)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


# What to lower when a command runs out of memory, in its own flags.
OUT_OF_MEMORY_ADVICE = {
    "generate": "lower --height/--width; above the native size --local-denoising windows keeps every UNet call at "
    "the native size; on a GPU --dtype float16 or bfloat16 halves the activations",
    "convert": "load the model in half precision (--dtype float16 or bfloat16), or convert on a larger machine",
    "evaluate": "lower --batch-size (images per pipeline call) and --metric-batch-size, or --height/--width",
    "distill": "lower --train_batch_size or --resolution, pass --gradient_checkpointing, or --mixed_precision bf16",
}
EXIT_USER_ERROR, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def command_line(argv: Sequence[str]) -> str:
    """The command that reruns this one, as the user would type it (under ``accelerate launch`` for several
    processes: the launcher's own options are not visible here, so they are left as ``...``)."""
    program = "gspn-diffusers"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        program = "accelerate launch ... -m gspn_diffusers.cli"
    elif Path(sys.argv[0]).name not in ("gspn-diffusers", "gspn_diffusers"):
        program = "python -m gspn_diffusers.cli"
    return f"{program} {shlex.join(argv)}"


def _interrupted_message(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """One line after Ctrl-C: what is on disk now and how to go on. A subcommand can say more (``evaluate``
    counts its images) through ``set_defaults(interrupted=function(args, command) -> str)``."""
    command = command_line(argv)
    describe = getattr(args, "interrupted", None)
    if describe is not None:
        return describe(args, command)
    if args.command == "generate":
        return (
            f"Interrupted: nothing was written to {args.output} (an image is saved only once it is complete); "
            f"rerun to start again: {command}"
        )
    if args.command == "convert":
        return (
            f"Interrupted: {args.output} holds no new weights unless the save had begun (every file is written "
            f"aside, then renamed); convert again with --overwrite: {command}"
        )
    if args.command == "distill":
        resume = "" if "--resume_from_checkpoint" in argv else " --resume_from_checkpoint latest"
        return (
            f"Interrupted: the checkpoints written so far are in {getattr(args, 'output_dir', 'the output folder')}; "
            f"resume with: {command}{resume}"
        )
    return f"Interrupted; rerun with: {command}"


def _is_main_process() -> bool:
    """Under ``accelerate launch`` every process gets Ctrl-C: one of them says what happened."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every failure a user can meet is one line, with no traceback unless --verbose: a user
    mistake returns 2, running out of memory or disk 1, Ctrl-C 130 (after saying what was saved and how to
    resume); anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if hasattr(args, "device"):
            args.device = check_device(args.device)
        args.func(args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        if _is_main_process():
            logger.error("%s", _interrupted_message(args, argv))
        return EXIT_INTERRUPTED
    except GSPNUserError as error:
        if args.verbose:
            raise
        logger.error("%s", error)
        return EXIT_USER_ERROR
    except Exception as error:
        if args.verbose:
            raise
        message = failure_message(error, OUT_OF_MEMORY_ADVICE.get(args.command))
        if message is not None:  # out of memory, disk full: the machine's limits, not a mistake or a bug
            logger.error("%s (-v shows the traceback)", message)
            return EXIT_FAILURE
        if isinstance(error, ValueError | TypeError | OSError):  # what the libraries underneath raise for bad input
            logger.error("%s: %s (run with -v for the traceback)", type(error).__name__, error)
            return EXIT_USER_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
