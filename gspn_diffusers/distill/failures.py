"""The trainer's failures as one line that says what to do: out of memory, a full disk, Ctrl-C.

Each becomes a :class:`~gspn_diffusers.errors.GSPNUserError` (printed without a traceback by the
command lines; ``-v`` shows it) or, for Ctrl-C, one logged line and exit status 130. What was
written stays consistent: checkpoints are atomic (:mod:`.checkpoints`), and a half-written
checkpoint folder is removed when the disk fills, to give the space back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import GSPNUserError, is_disk_full, is_out_of_memory

logger = logging.getLogger(__name__)

INTERRUPTED_STATUS = 130  # what a shell reports for a process ended by SIGINT


@contextlib.contextmanager
def writing(folder: Path, what: str, cleanup: Path | None = None) -> Iterator[None]:
    """A full disk (or quota) while writing ``what`` into ``folder`` becomes one line naming the folder.

    ``cleanup``: a temporary folder of this write, removed on that failure (it would only hold the space).
    """
    try:
        yield
    except Exception as error:  # OSError, or a library's wrapper of one (safetensors' SafetensorError)
        if not is_disk_full(error):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        free = shutil.disk_usage(folder).free if folder.exists() else None
        left = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        raise GSPNUserError(
            f"No space left on the disk of {folder}{left} while writing {what}: free space there or pass another "
            "--output_dir / --cache_dir. What was written before is intact (checkpoints are only renamed into place "
            "when complete); resume with --resume_from_checkpoint latest."
        ) from error


@contextlib.contextmanager
def out_of_memory_hint(args: argparse.Namespace, resolution: Sequence[int | None]) -> Iterator[None]:
    """Out of memory (CUDA or host) becomes one line that names the flags that lower the memory.

    ``resolution``: a one-item list the trainer fills in once the model's native size is known.
    """
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host"
        lower = [f"--resolution (now {resolution[0]})", f"--train_batch_size (now {args.train_batch_size} per device)"]
        if not args.gradient_checkpointing:
            lower.append("add --gradient_checkpointing")
        if args.mixed_precision in (None, "no"):
            lower.append("add --mixed_precision bf16 (or fp16)")
        raise GSPNUserError(
            f"Out of {where} memory ({str(error).splitlines()[0][:200]}). Lower "
            + ", ".join(lower)
            + " (raise --gradient_accumulation_steps to keep the effective batch)."
        ) from error


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line that continues this run: the same one, with ``--resume_from_checkpoint latest``.

    Built from ``sys.argv`` (the real command in every launcher); ``--overwrite_output_dir`` is dropped, since it
    would start over instead. Under ``accelerate launch`` / ``torchrun`` the launcher's options are the user's.
    """
    argv = list(sys.argv if argv is None else argv)
    program, flags = argv[0], argv[1:]
    kept: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
            continue
        name = flag.split("=", 1)[0].replace("-", "_")
        if name == "__resume_from_checkpoint":
            skip = "=" not in flag
            continue
        if name == "__overwrite_output_dir":
            continue
        kept.append(flag)
    kept += ["--resume_from_checkpoint", "latest"]
    if Path(program).name == "gspn-diffusers":
        prefix = ["gspn-diffusers"]
    elif Path(program).parts[-3:] == ("gspn_diffusers", "distill", "train.py"):  # python -m: a module, not a script
        prefix = ["python", "-m", "gspn_diffusers.distill.train"]
    elif "LOCAL_RANK" in os.environ:  # started by accelerate launch or torchrun
        prefix = ["accelerate", "launch", "[your launch options]", program]
    else:
        prefix = ["python", program]
    return shlex.join(prefix + kept).replace("'[your launch options]'", "[your launch options]")


def report_interrupt(saved: Path | None) -> None:
    """Ctrl-C: one line with what is saved (``saved``: the newest complete checkpoint) and the command that
    continues from it."""
    what = f"the newest complete checkpoint is {saved}" if saved else "no checkpoint was saved yet"
    logger.error("Interrupted: %s. Resume with: %s", what, resume_command())
