#!/usr/bin/env python
"""Filter a LAION parquet (size, aspect ratio, aesthetic score, watermark, NSFW) and download webdataset shards.

    python distill/prepare_laion_subset.py laion_aesthetics_6.5plus/*.parquet --output_dir laion_subset \\
        --min_side 1024 --max_samples 169000

Thin wrapper over :mod:`gspn_diffusers.distill.laion_subset`; see distill/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from gspn_diffusers.distill.laion_subset import cli
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gspn_diffusers.distill.laion_subset import cli

if __name__ == "__main__":
    sys.exit(cli())
