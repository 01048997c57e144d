"""``gspn-diffusers distill``: the trainer of :mod:`gspn_diffusers.distill.train` as a subcommand.

It takes the same flags as ``accelerate launch -m gspn_diffusers.distill.train`` and runs in the
current process (one device); use ``accelerate launch`` for several GPUs or nodes.
"""

from __future__ import annotations

import argparse

from .args import add_distill_args


def run_distill(args: argparse.Namespace) -> None:
    from .train import main  # torch, Accelerate and Diffusers load only to run, not for --help

    main(args)


def add_distill_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="Distill the GSPN modules from the original UNet on an image/caption set (Accelerate).",
        description=(
            "Train the GSPN modules of a converted UNet against the frozen original. For several GPUs or nodes run "
            "`accelerate launch -m gspn_diffusers.distill.train` with the same flags."
        ),
    )
    add_distill_args(parser)
    # cli.main fills a default --device for every subcommand; Accelerate picks the device here.
    parser.set_defaults(func=run_distill, device=None)
