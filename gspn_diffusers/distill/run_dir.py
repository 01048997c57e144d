"""The output folder of a run: what another run left there, and what this one may do with it.

Nothing a user owns is lost (DESIGN.md section 9):

- a folder holding an input of the run (``--gspn_weights``, the training data, the model) is refused
  as ``--output_dir``, whatever the other flags say;
- a new run on top of another run's results is refused unless ``--overwrite_output_dir``; then the
  old results are moved into a hidden ``.replaced-<time>`` folder once everything has loaded, and
  removed only when the new run's first checkpoint (or its final weights) is complete;
- ``--resume_from_checkpoint`` resumes or refuses: ``latest`` in a folder with results but no usable
  checkpoint says what to pass instead of starting over;
- resuming from an older checkpoint makes the later checkpoints (and final weights) of the old
  timeline stale: they are moved into ``.stale-<time>`` (kept, said in one line), so pruning,
  ``latest`` after a crash and the final weights all follow the current timeline;
- a finished run resumed with the same target does nothing: its final weights carry their step
  (``training_complete.json``).
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from ..errors import GSPNUserError
from ..serialization import CONFIG_NAME, WEIGHTS_NAME
from .checkpoints import checkpoint_step, checkpoints, is_complete, resolve_resume

logger = logging.getLogger(__name__)

FINISHED_MARKER = "training_complete.json"
MODEL_CARD = "README.md"
VALIDATION_FOLDER = "validation"
REPLACED_PREFIX = ".replaced-"
STALE_PREFIX = ".stale-"


def final_weights(output_dir: Path) -> list[Path]:
    """The final weights of a run in ``output_dir``: save_gspn's files, its model card, the finished marker."""
    names = (WEIGHTS_NAME, CONFIG_NAME, FINISHED_MARKER)
    found = [output_dir / name for name in names if (output_dir / name).is_file()]
    card = output_dir / MODEL_CARD
    if found and card.is_file() and "library_name: gspn-diffusers" in card.read_text(errors="replace"):
        found.append(card)  # the weights' own card; a README of the user's is not a result of the run
    return found


def previous_run(output_dir: Path) -> list[Path]:
    """What another run left in ``output_dir``: checkpoints (finished or not), final weights, validation images."""
    if not output_dir.is_dir():
        return []
    found = checkpoints(output_dir, complete_only=False) + final_weights(output_dir)
    return found + ([output_dir / VALIDATION_FOLDER] if (output_dir / VALIDATION_FOLDER).is_dir() else [])


def finished_step(output_dir: Path) -> int | None:
    """The step of the final weights in ``output_dir`` (None: no finished run there, or one from before the marker)."""
    try:
        return int(json.loads((output_dir / FINISHED_MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_finished(output_dir: Path, step: int) -> None:
    """Record, beside the final weights, the step they are from (written after the weights)."""
    (output_dir / FINISHED_MARKER).write_text(json.dumps({"step": step}) + "\n")


def _local(location: str | None) -> Path | None:
    """The folder a data/model/weights argument names on this machine (None: a hub name, or nothing)."""
    if location is None:
        return None
    path = Path(location).expanduser()
    if not path.exists() and glob.has_magic(location):  # a shard glob: its fixed leading folder
        path = Path(location.split("*")[0].split("?")[0].split("[")[0]).parent
    return path.resolve() if path.exists() else None


def check_inputs_outside(output_dir: Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output folder that is, holds, or (for data) lies inside an input: the run writes and replaces
    files there, and --overwrite_output_dir would move the input away."""
    out = output_dir.expanduser().resolve()
    for flag, location in inputs.items():
        path = _local(location)
        if path is None:
            continue
        if path == out or out in path.parents:
            relation = "is" if path == out else "holds"
        elif path in out.parents and flag in ("--train_data_dir", "--dataset_name"):
            relation = "lies inside"  # checkpoints and validation images would become training data
        else:
            continue
        raise GSPNUserError(
            f"--output_dir {str(output_dir)!r} {relation} {flag} {location!r}, an input of this run; the run writes "
            f"and replaces files in --output_dir. Pass an --output_dir outside {flag}."
        )


@dataclass(frozen=True)
class RunPlan:
    """What a run will do with its output folder, decided before any model loads."""

    resume: Path | None = None  # the checkpoint to resume from
    step: int = 0  # its step (0: a new run)
    replace: list[Path] = field(default_factory=list)  # --overwrite_output_dir: moved aside at the start
    stale: list[Path] = field(default_factory=list)  # later results of the timeline resumed from: moved aside
    final_step: int | None = None  # the step of the final weights already in the folder

    def finished(self, max_train_steps: int) -> str | None:
        """Why there is nothing to train towards ``max_train_steps`` (None: there is)."""
        if self.resume is None:
            return None
        if self.step >= max_train_steps:
            return f"{self.resume.name} is at step {self.step}, the target is --max_train_steps {max_train_steps}"
        if not self.stale and self.final_step is not None and self.final_step >= max_train_steps:
            return f"the run finished at step {self.final_step} (its final weights are in {self.resume.parent})"
        return None


def _later_results(output_dir: Path, step: int) -> list[Path]:
    later = [p for p in checkpoints(output_dir) if checkpoint_step(p) > step]
    return later + (final_weights(output_dir) if later else [])  # final weights after a later checkpoint: stale too


def plan_run(output_dir: Path, resume_from_checkpoint: str | None, overwrite: bool) -> RunPlan:
    """Check ``--output_dir`` against ``--resume_from_checkpoint`` / ``--overwrite_output_dir`` (files only)."""
    if overwrite and resume_from_checkpoint is not None:
        raise GSPNUserError(
            "--overwrite_output_dir starts over, --resume_from_checkpoint continues the run in --output_dir; pass one."
        )
    leftovers = previous_run(output_dir)
    if overwrite:
        return RunPlan(replace=leftovers)
    if resume_from_checkpoint is None:
        if leftovers:
            names = ", ".join(p.name for p in leftovers[:5]) + (" ..." if len(leftovers) > 5 else "")
            raise GSPNUserError(
                f"--output_dir {str(output_dir)!r} holds another run's results ({names}). Pass "
                "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to start over (the old "
                "results are removed once the new run's first checkpoint is saved), or another --output_dir."
            )
        return RunPlan()
    checkpoint = resolve_resume(resume_from_checkpoint, output_dir)
    if checkpoint is None:
        results = [p for p in leftovers if p.name != VALIDATION_FOLDER and not (p.is_dir() and not is_complete(p))]
        if results:
            what = "final GSPN weights" if final_weights(output_dir) else "checkpoints"
            raise GSPNUserError(
                f"--resume_from_checkpoint latest: --output_dir {str(output_dir)!r} holds {what} but no usable "
                "checkpoint to resume from (see the warnings above). To train further from its weights pass "
                f"--gspn_weights {output_dir} with another --output_dir; to start over pass --overwrite_output_dir "
                "instead of --resume_from_checkpoint."
            )
        logger.warning("No checkpoint in %s to resume from; starting a new run.", output_dir)
        return RunPlan()
    step = checkpoint_step(checkpoint)
    stale = _later_results(output_dir, step)  # also when resuming from a checkpoint copied from elsewhere
    return RunPlan(resume=checkpoint, step=step, stale=stale, final_step=finished_step(output_dir))


def move_aside(output_dir: Path, paths: list[Path], prefix: str) -> Path | None:
    """Move ``paths`` into a new hidden ``<prefix><time>`` folder of ``output_dir`` (a rename: nothing is copied)."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = output_dir / f"{prefix}{stamp}", 1
    while aside.exists():
        aside, suffix = output_dir / f"{prefix}{stamp}-{suffix}", suffix + 1
    aside.mkdir()
    for path in paths:
        path.rename(aside / path.name)
    return aside


def remove_replaced(output_dir: Path) -> None:
    """The run in ``output_dir`` has a complete checkpoint (or its final weights): the results of the run it
    replaced (``.replaced-*``, moved aside by --overwrite_output_dir) can go."""
    for aside in sorted(output_dir.glob(f"{REPLACED_PREFIX}*")):
        if aside.is_dir():
            shutil.rmtree(aside)
            logger.info("Removed the replaced run's results (%s): the new run has a complete checkpoint.", aside)


def report_replaced(output_dir: Path) -> None:
    """Say where the results of a run replaced with --overwrite_output_dir are while the new run has no checkpoint."""
    for aside in sorted(output_dir.glob(f"{REPLACED_PREFIX}*")):
        logger.warning(
            "The results of the run this one replaces are kept in %s: move them back into %s to restore it (they "
            "are removed once a new run there saves its first checkpoint).",
            aside,
            output_dir,
        )


def take_over(accelerator: Accelerator, output_dir: Path, plan: RunPlan) -> None:
    """Everything has loaded: move another run's results aside (--overwrite_output_dir), load the checkpoint
    resumed from and move the later results of its old timeline aside."""
    if accelerator.is_main_process and plan.replace:
        aside = move_aside(output_dir, plan.replace, REPLACED_PREFIX)
        logger.warning(
            "--overwrite_output_dir: moved the previous run's results to %s; they are removed once this run saves "
            "its first checkpoint.",
            aside,
        )
    accelerator.wait_for_everyone()
    if plan.resume is None:
        return
    if accelerator.is_main_process:
        logger.info("Resuming from %s", plan.resume)
    accelerator.load_state(str(plan.resume))
    if accelerator.is_main_process and plan.stale:
        aside = move_aside(output_dir, plan.stale, STALE_PREFIX)
        logger.warning(
            "Resuming from %s abandons the later results of its run (%s): moved them to %s (delete it when you no "
            "longer need them).",
            plan.resume.name,
            ", ".join(p.name for p in plan.stale),
            aside,
        )
    accelerator.wait_for_everyone()
