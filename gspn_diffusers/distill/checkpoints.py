"""Checkpoints that survive an interrupted save, and an output folder that is never silently reused.

A checkpoint is written by every process into ``.incomplete-checkpoint-<step>``; when all have
finished the main process adds ``checkpoint_complete.json`` and renames the folder to
``checkpoint-<step>`` (a rename is atomic), and only then deletes checkpoints beyond
``--checkpoints_total_limit``. A Ctrl-C at any moment leaves the previous checkpoints intact, and
``--resume_from_checkpoint latest`` only considers folders with the completion marker.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..serialization import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
INCOMPLETE_PREFIX = ".incomplete-"
COMPLETE_MARKER = "checkpoint_complete.json"


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


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest ``limit`` complete checkpoints (called after a new one is complete)."""
    if limit is None:
        return
    existing = checkpoints(output_dir)
    for old in existing[: max(0, len(existing) - limit)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", old, limit)
        shutil.rmtree(old)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    """Write the Accelerate state to a temporary folder, mark it complete, rename it, then prune."""
    final = output_dir / f"{PREFIX}{step}"
    temporary = output_dir / f"{INCOMPLETE_PREFIX}{final.name}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)  # left by an interrupted save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")
        if final.exists():  # the same step saved by an earlier, resumed-from run: replace it
            replaced = output_dir / f"{INCOMPLETE_PREFIX}replaced-{final.name}"
            final.rename(replaced)
            temporary.rename(final)
            shutil.rmtree(replaced)
        else:
            temporary.rename(final)
        prune_checkpoints(output_dir, limit)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names; ``latest`` is the newest complete one."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        unfinished = [p for p in checkpoints(output_dir, complete_only=False) if not is_complete(p)]
        if unfinished:
            logger.warning(
                "Ignoring incomplete checkpoints (interrupted saves): %s", ", ".join(p.name for p in unfinished)
            )
        found = checkpoints(output_dir)
        if not found:
            logger.warning("No complete checkpoint in %s to resume from; starting a new run.", output_dir)
            return None
        return found[-1]
    path = Path(resume_from_checkpoint).expanduser()
    if not path.exists() and (output_dir / path).exists():
        path = output_dir / path
    if not path.is_dir() or _step(path) is None:
        raise FileNotFoundError(
            f"Checkpoint {resume_from_checkpoint!r} not found; pass a {PREFIX}<step> folder written by this "
            "trainer, or `latest` to pick the newest in --output_dir."
        )
    if not is_complete(path):
        raise ValueError(
            f"Checkpoint {path} is incomplete (no {COMPLETE_MARKER}: its save was interrupted); resume from an "
            "earlier one or from `latest`, which skips incomplete checkpoints."
        )
    return path


def previous_run(output_dir: Path) -> list[Path]:
    """What another run left in ``output_dir``: checkpoints (finished or not) and final GSPN weights."""
    if not output_dir.is_dir():
        return []
    found = checkpoints(output_dir, complete_only=False)
    return found + [output_dir / name for name in (WEIGHTS_NAME, CONFIG_NAME) if (output_dir / name).is_file()]


def check_output_dir(output_dir: Path, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Refuse to start a new run on top of another run's checkpoints or weights without being told what to do."""
    if overwrite and resume_from_checkpoint is not None:
        raise ValueError(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint resumes; pass one."
        )
    leftovers = previous_run(output_dir)
    if leftovers and resume_from_checkpoint is None and not overwrite:
        names = ", ".join(p.name for p in leftovers[:5]) + (" ..." if len(leftovers) > 5 else "")
        raise ValueError(
            f"--output_dir {str(output_dir)!r} holds another run's results ({names}). Pass --resume_from_checkpoint "
            "latest to continue that run, --overwrite_output_dir to delete them and start over, or another "
            "--output_dir."
        )


def clear_output_dir(output_dir: Path) -> None:
    """``--overwrite_output_dir``: delete the previous run's checkpoints and weights (logs are kept)."""
    for path in previous_run(output_dir):
        logger.warning("--overwrite_output_dir: deleting %s", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
