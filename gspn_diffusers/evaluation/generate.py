"""Sharded, resumable generation of the evaluation images.

Each process of an ``accelerate launch`` (or the single process of a plain run) takes an even share
of the images that are not written yet; an image is written to a hidden temporary file and renamed,
so a killed run never leaves a truncated PNG and the next run picks up where it stopped (and a PNG that is
there but does not decode, left by anything else, is generated again). Every image
has its own seed (its own generator), so the pixels do not depend on the batch size or the number of
processes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..errors import GSPNUserError
from .coco import CaptionRecord
from .files import readable_image, save_png_atomically, write_text_atomically

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SETTINGS_NAME = "generation.json"


def write_manifest(image_dir: Path, records: Sequence[CaptionRecord]) -> Path:
    """One JSON line per image: index (the PNG name), COCO image id, caption id, file name, caption, seed."""
    path = image_dir / MANIFEST_NAME
    write_text_atomically(path, "".join(json.dumps(record.to_dict()) + "\n" for record in records))
    return path


def read_manifest(image_dir: str | Path) -> list[CaptionRecord]:
    path = Path(image_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; it is written by the generation step of `evaluate`.")
    return [CaptionRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def check_manifest(image_dir: Path, records: Sequence[CaptionRecord]) -> None:
    """Refuse a folder whose images were made for other captions or seeds (an edited captions file, say).

    Only the indices both lists have are compared: more captions with the same source extend a run.
    """
    if not (image_dir / MANIFEST_NAME).is_file():
        return
    for old, new in zip(read_manifest(image_dir), records, strict=False):
        if (old.caption, old.seed) != (new.caption, new.seed):
            raise GSPNUserError(
                f"{image_dir} holds image {old.png_name} made for caption {old.caption!r} (seed {old.seed}), not "
                f"{new.caption!r} (seed {new.seed}); pass another --output-dir (or move that folder away to start "
                "over)."
            )


def check_settings(image_dir: Path, settings: dict[str, Any], write: bool = True) -> None:
    """Refuse to resume into a folder whose images were made with other settings (mixing them is silent garbage).

    The first run records ``settings`` in ``generation.json`` (when ``write``: the main process);
    later runs must match it.
    """
    path = image_dir / SETTINGS_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        settings = json.loads(json.dumps(settings))  # compare as stored (tuples become lists)
        changed = {key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key)}
        if changed:
            details = ", ".join(f"{key}: {previous.get(key)!r} -> {settings.get(key)!r}" for key in sorted(changed))
            raise GSPNUserError(
                f"{image_dir} holds images generated with other settings ({details}); pass another --output-dir "
                "(or move that folder away to start over)."
            )
    elif write:
        write_text_atomically(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def pending_records(records: Sequence[CaptionRecord], image_dir: Path) -> list[CaptionRecord]:
    return [record for record in records if not (image_dir / record.png_name).is_file()]


def remove_stale_temporaries(image_dir: Path) -> list[Path]:
    """Delete the hidden temporary files a killed run left (``.000001.tmp-*.png``; ``.000001.png.tmp`` of older
    versions): each image is written under a unique temporary name, so a rerun never overwrites them. Called
    before this run's processes write anything."""
    stale = [p for p in image_dir.glob(".*") if p.is_file() and ".tmp" in p.name] if image_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def remove_damaged_images(
    records: Sequence[CaptionRecord], image_dir: Path, size: tuple[int, int], workers: int | None = None
) -> list[Path]:
    """Delete (and return) the images of ``records`` in ``image_dir`` that do not decode completely at ``size``
    (width, height), so a resumed run regenerates them: a file that is present but truncated (a crash, a copy
    interrupted, a full disk) would otherwise be scored, or stop the scoring after hours of generation.

    Every PNG is decoded, on ``workers`` threads (PIL decodes without the GIL): about a millisecond per 512 px
    image on one core.
    """
    present = [image_dir / record.png_name for record in records if (image_dir / record.png_name).is_file()]
    if not present:
        return []
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        readable = list(pool.map(lambda path: readable_image(path, size), present))
    damaged = [path for path, ok in zip(present, readable, strict=True) if not ok]
    for path in damaged:
        path.unlink(missing_ok=True)
    if damaged:
        logger.warning(
            "%d image(s) in %s did not decode as %dx%d PNGs (truncated by an interrupted run?): removed, they are "
            "generated again (%s%s)",
            len(damaged),
            image_dir,
            *size,
            ", ".join(path.name for path in damaged[:5]),
            ", ..." if len(damaged) > 5 else "",
        )
    return damaged


def generate_images(
    pipe: Any,
    records: Sequence[CaptionRecord],
    image_dir: str | Path,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 1,
    negative_prompt: str | None = None,
    state: PartialState | None = None,
) -> int:
    """Generate the PNGs of ``records`` that ``image_dir`` lacks, this process's share of them; returns the count.

    Call it on every process of a distributed run (``accelerate launch``): the processes list the
    missing images, wait for each other, then split that list evenly. Initial noise comes from a CPU
    generator seeded with the record's seed, so an image is the same (up to float rounding) on any
    device and in any batch. The pipeline's per-step progress bar is turned off (one bar over the
    images instead).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    state = state or PartialState()
    image_dir = Path(image_dir)
    if state.is_main_process:  # one process checks what earlier runs left; the others wait for its verdict
        remove_stale_temporaries(image_dir)
        remove_damaged_images(records, image_dir, (width, height))
    state.wait_for_everyone()
    todo = pending_records(records, image_dir)
    state.wait_for_everyone()  # nobody writes before every process has listed what is missing
    with state.split_between_processes(todo) as share:
        share = list(share)
    if state.is_main_process:
        logger.info(
            "%d of %d images to generate (%d already written), split over %d processes",
            len(todo),
            len(records),
            len(records) - len(todo),
            state.num_processes,
        )
    pipe.set_progress_bar_config(disable=True)
    progress = tqdm(total=len(share), desc="generating", unit="img", disable=not state.is_local_main_process)
    for start in range(0, len(share), batch_size):
        batch = share[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(record.seed) for record in batch]
        images = pipe(
            prompt=[record.caption for record in batch],
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        ).images
        for record, image in zip(batch, images, strict=True):
            save_png_atomically(image, image_dir / record.png_name)
        progress.update(len(batch))
    progress.close()
    state.wait_for_everyone()
    return len(share)
