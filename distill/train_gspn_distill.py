#!/usr/bin/env python
"""Distill GSPN into SD-1.5 / SD-XL, in the style of Diffusers' example trainers.

    accelerate launch --config_file distill/configs/8_gpus.yaml distill/train_gspn_distill.py \\
        --model stabilityai/stable-diffusion-xl-base-1.0 --train_data_dir laion_subset/ --output_dir sdxl-gspn ...

Thin entry script: the trainer is :mod:`gspn_diffusers.distill.train` (every flag: ``--help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from gspn_diffusers.distill.train import cli
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gspn_diffusers.distill.train import cli

if __name__ == "__main__":
    sys.exit(cli())
