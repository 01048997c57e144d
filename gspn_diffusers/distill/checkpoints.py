"""Checkpoints that survive an interrupted save, and that are checked before a resume trusts them.

A checkpoint is written by every process into ``.incomplete-checkpoint-<step>``; when all have
finished the main process adds ``checkpoint_complete.json`` (with the size of every file in the
folder) and renames the folder to ``checkpoint-<step>`` (a rename is atomic), and only then deletes
checkpoints beyond ``--checkpoints_total_limit``. A Ctrl-C at any moment leaves the previous
checkpoints intact, and ``--resume_from_checkpoint latest`` only considers folders with the
completion marker whose files are all there, whole: a file truncated later (a copy cut off, a
disk error) is found from its size and its header, without loading anything, so a corrupt newest
checkpoint costs a warning and a fallback, not a traceback after the models have loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zipfile
from pathlib import Path

from accelerate import Accelerator

from ..errors import GSPNFileNotFoundError, GSPNUserError
from ..safe_write import new_file_mode
from ..serialization import CONFIG_NAME, WEIGHTS_NAME
from .failures import writing
from .state import EMA_SUBFOLDER, GSPN_SUBFOLDER

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
INCOMPLETE_PREFIX = ".incomplete-"
COMPLETE_MARKER = "checkpoint_complete.json"
# Written by the save hooks on every backend (DDP, FSDP, DeepSpeed): a checkpoint without them is not ours.
REQUIRED_FILES = (f"{GSPN_SUBFOLDER}/{WEIGHTS_NAME}", f"{GSPN_SUBFOLDER}/{CONFIG_NAME}")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (optimizer, scheduler, RNG states, EMA)


def _step(path: Path) -> int | None:
    number = path.name.removeprefix(INCOMPLETE_PREFIX).removeprefix(PREFIX)
    return int(number) if path.name.removeprefix(INCOMPLETE_PREFIX).startswith(PREFIX) and number.isdigit() else None


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / COMPLETE_MARKER).is_file()


def checkpoints(output_dir: Path, complete_only: bool = True) -> list[Path]:
    """``checkpoint-<step>`` folders by step (with ``complete_only=False`` also unfinished ones)."""
    found = [p for p in output_dir.glob(f"*{PREFIX}*") if p.is_dir() and _step(p) is not None]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=lambda p: (_step(p), p.name))


def checkpoint_step(path: Path) -> int:
    step = _step(path)
    if step is None:
        raise ValueError(f"{path} is not a {PREFIX}<step> folder.")
    return step


def uses_ema(checkpoint: Path) -> bool:
    """Whether the run that wrote ``checkpoint`` kept an EMA (``--use_ema``): its save hook wrote the EMA weights."""
    return (checkpoint / EMA_SUBFOLDER).is_dir()


def share_like_umask(paths: list[Path]) -> None:
    """Give files the mode a user's new files get (0644 under umask 022): safetensors' ``save_file`` creates its
    files 0600, which makes weights and checkpoints in a shared folder unreadable to the rest of the group."""
    mode = new_file_mode()
    for path in paths:
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data its offsets end at."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return f"its header says {8 + length} bytes, the file has {size}"
            header = json.loads(f.read(length))
        end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as error:
        return f"its header cannot be read ({error})"
    return None if 8 + length + end == size else f"it should hold {8 + length + end} bytes, it has {size}"


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder (naming the file), or None when it can be resumed from.

    Cheap: sizes against the completion marker's list, the headers of safetensors files, the
    central directory of torch.save files; nothing is loaded.
    """
    if not is_complete(checkpoint):
        return f"no {COMPLETE_MARKER} (its save was interrupted)"
    try:
        expected = json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("files")
    except (ValueError, OSError, AttributeError) as error:
        return f"{COMPLETE_MARKER} cannot be read ({error})"
    if expected is None:  # a marker from before the file list: at least what the load hook reads must be there
        expected = {}
        missing = [name for name in REQUIRED_FILES if not (checkpoint / name).is_file()]
        if missing:
            return f"{missing[0]} is missing"
    for name in expected:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    for name, size in expected.items():
        actual = (checkpoint / name).stat().st_size
        if actual != size:
            return f"{name} is truncated or changed ({actual} bytes; {size} were written)"
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.is_file() and _starts_with(path, ZIP_MAGIC) and not zipfile.is_zipfile(path):
            problem = "it is cut off (no zip directory at its end)"
        else:
            continue
        if problem:
            return f"{path.relative_to(checkpoint)} is corrupt: {problem}"
    return None


def prune_checkpoints(output_dir: Path, limit: int | None, keep: Path) -> None:
    """Keep the newest ``limit`` complete checkpoints, and always ``keep`` (the one just written).

    The folder holds one timeline only (a resume from an older checkpoint moves the later ones aside,
    see :mod:`.run_dir`), so the newest by step are the newest of the current run.
    """
    if limit is None:
        return
    existing = [p for p in checkpoints(output_dir) if p != keep]
    for old in existing[: max(0, len(existing) - (limit - 1))]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", old, limit)
        shutil.rmtree(old)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    """Write the Accelerate state to a temporary folder, mark it complete, rename it, then prune."""
    final = output_dir / f"{PREFIX}{step}"
    temporary = output_dir / f"{INCOMPLETE_PREFIX}{final.name}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)  # left by an interrupted save
    accelerator.wait_for_everyone()
    with writing(output_dir, f"checkpoint {final.name}", cleanup=temporary if accelerator.is_main_process else None):
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            share_like_umask(list(temporary.rglob("*")))
            marker = {"step": step, "files": _manifest(temporary)}
            (temporary / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    if accelerator.is_main_process:
        if final.exists():  # the same step saved by an earlier, resumed-from run: replace it
            replaced = output_dir / f"{INCOMPLETE_PREFIX}replaced-{final.name}"
            final.rename(replaced)
            temporary.rename(final)
            shutil.rmtree(replaced)
        else:
            temporary.rename(final)
        prune_checkpoints(output_dir, limit, keep=final)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


def _named_checkpoint(resume_from_checkpoint: str, output_dir: Path) -> Path:
    """``--resume_from_checkpoint`` as a path, a folder name in ``output_dir``, or a bare step number."""
    if resume_from_checkpoint.isdigit():
        return output_dir / f"{PREFIX}{int(resume_from_checkpoint)}"
    path = Path(resume_from_checkpoint).expanduser()
    if not path.exists() and (output_dir / path).exists():
        path = output_dir / path
    return path


def resolve_resume(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names, checked; ``latest`` is the newest usable one.

    ``latest`` skips incomplete checkpoints and falls back past corrupt ones with a warning naming the
    bad file; an explicit checkpoint that is incomplete or corrupt is refused with that name. None:
    ``latest`` in a folder with no checkpoint (the caller decides whether that may start a new run).
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        unfinished = [p for p in checkpoints(output_dir, complete_only=False) if not is_complete(p)]
        if unfinished:
            logger.warning(
                "Ignoring incomplete checkpoints (interrupted saves): %s", ", ".join(p.name for p in unfinished)
            )
        for candidate in reversed(checkpoints(output_dir)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            logger.warning("Skipping %s: %s; falling back to the previous checkpoint.", candidate, problem)
        return None
    path = _named_checkpoint(resume_from_checkpoint, output_dir)
    if not path.is_dir() or _step(path) is None:
        raise GSPNFileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint; pass a {PREFIX}<step> folder "
            "written by this trainer (a path, a name in --output_dir, or a step number), or `latest`."
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise GSPNUserError(
            f"--resume_from_checkpoint {path}: {problem}. Resume from an earlier checkpoint, or from `latest`, "
            "which skips incomplete and corrupt checkpoints."
        )
    return path
