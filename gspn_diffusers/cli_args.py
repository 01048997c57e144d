"""Argument helpers shared by every command line: ``gspn-diffusers``, the distill trainer and ``evaluate``.

One module that every CLI imports (and no library module does), so that there is one way in for
arguments and no import circle through ``cli.py``. It imports neither torch nor diffusers at module
level: building a parser and checking arguments take milliseconds, so ``--help`` and every typo
answer at once, before any model loads.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from .config import PRESETS, GSPNConfig
from .errors import GSPNFileExistsError, GSPNUserError, probe_writable
from .hub import CONFIG_NAME, holds_checkpoint

# The names the parsers offer; tests check that they match what the library accepts
# (gspn_diffusers.tiny.TINY_KINDS, loading.DTYPES, pipelines.demofusion.LOCAL_MODES).
TINY_KINDS = ("sd15", "sdxl")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
LOCAL_MODES = ("auto", "whole", "windows")
CONFIG_FLAGS = {"preset": "--preset", "gate_rank": "--gate-rank", "gate_channels": "--gate-channels"}
CHUNK_SIZE_GIVEN = "chunk_size_given"


def optional_chunk(value: str) -> int | None:
    """``--chunk-size``: a positive line count, or ``none``/``global`` for the global scan."""
    if value.lower() in ("none", "global"):
        return None
    return positive_int(value)


class _ChunkSizeAction(argparse.Action):
    """Stores ``--chunk-size`` and remembers that it was given: ``global`` is None, like the flag's absence."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, CHUNK_SIZE_GIVEN, True)


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
DEVICE_PATTERN = re.compile(r"(cpu|mps|cuda(:\d+)?)")


def seed(value: str) -> int:
    """An argparse type: a seed for ``torch.Generator.manual_seed``, an integer in 0..2**64-1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**64-1, got {value!r}") from None
    if not 0 <= number <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..2**64-1 ({MAX_SEED}), got {number}")
    return number


def finite_float(value: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` parse as floats but would make every pixel NaN)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def pixel_size(value: str) -> int:
    """An argparse type: an image side in pixels, positive and a multiple of 8 (the VAE's factor)."""
    number = positive_int(value)
    if number % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the VAE works in 8-pixel cells), got {number}")
    return number


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that say which pipeline to load, shared by every subcommand (optional where it has other modes)."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", help="Hub name or local Diffusers folder (SD-1.5, SD-2 or SD-XL family).")
    source.add_argument("--tiny", choices=TINY_KINDS, help="A built-in tiny random model: runs offline in seconds.")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="auto: fp16 on GPU, fp32 on CPU."
    )


def add_config_args(parser: argparse.ArgumentParser, underscores: bool = False) -> None:
    """The GSPN conversion flags; they build a config, so they conflict with loading a saved one.

    ``underscores`` also accepts ``--gate_rank`` etc., as the distill trainer does for all its flags.
    """

    def names(flag: str) -> list[str]:
        return [flag, flag.replace("-", "_").replace("__", "--", 1)] if underscores else [flag]

    parser.add_argument("--preset", choices=PRESETS, default=None, help="GSPN preset (default: from the UNet).")
    parser.add_argument(
        *names("--gate-rank"), type=positive_int, default=None, help="Gate projection rank divisor (C -> C/r)."
    )
    parser.add_argument(
        *names("--gate-channels"), type=positive_int, default=None, help="Gate channels per direction (default C)."
    )
    parser.add_argument(
        *names("--chunk-size"),
        type=optional_chunk,
        default=None,
        action=_ChunkSizeAction,
        help="Scan every layer locally in chunks of this many lines, or 'global' (overrides the preset).",
    )


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


def check_hires_args(args: argparse.Namespace) -> None:
    """The high-resolution flags, checked before the model loads (the pipeline checks them again, later)."""
    if not 0.0 <= args.skip_ratio < 1.0:
        raise GSPNUserError(
            f"--skip-ratio {args.skip_ratio}: each stage's strength must be in (0, 1] (strength = 1 - skip ratio), "
            "so the skip ratio must be in [0, 1); 0.6 is DemoFusion's choice."
        )


def config_flags_given(args: argparse.Namespace) -> list[str]:
    """The conversion flags the user set (``--chunk-size global`` counts: it is set, to None)."""
    given = [flag for dest, flag in CONFIG_FLAGS.items() if getattr(args, dest, None) is not None]
    return given + (["--chunk-size"] if getattr(args, CHUNK_SIZE_GIVEN, False) else [])


def config_from_args(args: argparse.Namespace, unet: Any) -> GSPNConfig:
    """The GSPN config the conversion flags ask for, on top of the preset (given, or detected from ``unet``)."""
    from .convert import detect_preset  # imports diffusers: only when a model is at hand anyway

    overrides: dict[str, Any] = {}
    if args.gate_rank is not None:
        overrides["gate_rank"] = args.gate_rank
    if args.gate_channels is not None:
        overrides["gate_channels"] = args.gate_channels
    if args.chunk_size is not None or getattr(args, CHUNK_SIZE_GIVEN, False):
        overrides.update(chunk_size=args.chunk_size, layer_chunk_sizes={})
    return GSPNConfig.from_preset(args.preset or detect_preset(unet), **overrides)


def check_device(device: str | None) -> str:
    """The torch device to use (``cuda`` when a GPU is visible, else ``cpu``), or a clear error for one that is
    not there. Imports torch (about a second), still long before any model loads."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE_PATTERN.fullmatch(device):
        # torch.device also takes meta, xpu, "cuda:0 " ...: nothing these pipelines run on, or a typo.
        raise GSPNUserError(f"--device {device!r}: use cpu, cuda, cuda:N (N = 0, 1, ...) or mps.")
    parsed = torch.device(device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise GSPNUserError(
                f"--device {device}: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu, or leave --device out."
            )
        if parsed.index is not None and parsed.index >= count:
            raise GSPNUserError(f"--device {device}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1}).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise GSPNUserError(f"--device {device}: Apple MPS is not available here; use --device cpu.")
    return device


def check_image_output(path: str | Path) -> Path:
    """An image path whose extension PIL can write, in a folder proven writable (created, a probe written and
    removed): checked before generating, so no image is lost to a read-only folder after the work."""
    from PIL import Image

    path = Path(path)
    extensions = Image.registered_extensions()
    if path.suffix.lower() not in extensions:
        raise GSPNUserError(
            f"--output {str(path)!r}: unknown image extension {path.suffix or '(none)'!r}; use .png, .jpg or .webp."
        )
    if extensions[path.suffix.lower()] not in Image.SAVE:  # .psd, .pcd, ...: read-only formats
        raise GSPNUserError(
            f"--output {str(path)!r}: PIL can read {path.suffix.lower()} but not write it; use .png, .jpg or .webp."
        )
    if path.is_dir():
        raise GSPNUserError(f"--output {str(path)!r} is a folder; pass an image file path such as {path}/image.png.")
    probe_writable(path.parent, "--output")  # the image (and the --save-stages images) land in this folder
    return path


def check_checkpoint_output(path: str | Path, overwrite: bool) -> Path:
    """A folder for GSPN weights that does not hold any yet (unless ``--overwrite``), proven writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GSPNUserError(f"--output {str(path)!r} is a file; pass a folder for {CONFIG_NAME} and the weights.")
    if holds_checkpoint(path) and not overwrite:
        raise GSPNFileExistsError(
            f"--output {str(path)!r} already holds GSPN weights; pass --overwrite to replace them, or choose "
            "another folder."
        )
    return probe_writable(path, "--output")
