"""The FID reference set (the COCO images of the selected captions, or every image of a folder) and its cache.

Reference statistics of 40k val2014 images take long to compute and never change, so they are
cached on disk (``--fid-cache``, default ``~/.cache/gspn_diffusers/fid_reference``) under a key
made of the image set (file names, sizes, mtimes) and every preprocessing choice (FID size, resize
filter, crop, backend and a hash of its feature model): change any of them and the key changes.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import GSPNFileNotFoundError, GSPNUserError
from .coco import CaptionRecord, check_reference_images
from .fid import FidBackend, GaussianStats, feature_dim, fid_image
from .files import save_npz_atomically, write_text_atomically
from .fingerprint import file_set_key, module_sha256
from .protocols import REFERENCE_SETS

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def default_cache_dir() -> Path:
    """``$GSPN_DIFFUSERS_CACHE/fid_reference``, else ``${XDG_CACHE_HOME:-~/.cache}/gspn_diffusers/fid_reference``."""
    base = os.environ.get("GSPN_DIFFUSERS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "gspn_diffusers"
    )
    return Path(base).expanduser() / "fid_reference"


def reference_files(reference: str, image_dir: str | Path | None, records: list[CaptionRecord]) -> list[Path]:
    """The reference images, checked before any generation.

    ``selected``: the COCO images of the selected captions (each used once); ``folder``: every
    image file directly in ``image_dir`` (e.g. all of val2014/, as LinFusion does).
    """
    if reference not in REFERENCE_SETS:
        raise ValueError(f"Unknown FID reference {reference!r}; expected one of {', '.join(REFERENCE_SETS)}.")
    if image_dir is None:
        raise GSPNUserError("FID needs reference images: pass --coco-images FOLDER (e.g. val2014/).")
    if reference == "selected":
        if any(record.file_name is None for record in records):
            raise GSPNUserError(
                "--fid-reference selected needs COCO annotations (--annotations); with a captions file, use "
                "--fid-reference folder and pass the reference images with --coco-images."
            )
        folder = check_reference_images(records, image_dir)
        return [folder / record.file_name for record in records]
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise GSPNFileNotFoundError(
            f"--coco-images {str(folder)!r}: no such folder; pass the folder of the FID reference images (e.g. "
            "val2014/)."
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(files) < 2:
        raise GSPNUserError(
            f"--coco-images {folder} holds {len(files)} images ({', '.join(IMAGE_EXTENSIONS)}); FID needs at least 2."
        )
    return files


VERIFIED_PREFIX = "decoded-"


def verify_reference_images(files: list[Path], cache_dir: str | Path | None, workers: int | None = None) -> None:
    """Decode every reference image now, before any generation, and name the first one that fails.

    Opening a file reads only its header: a truncated or damaged JPEG in val2014/ would otherwise stop the FID
    after hours of generation. JPEGs decode at 1/8 scale (``draft``), which still reads every byte of the image
    data. A file set that decoded (same names, sizes, modification times) is remembered in ``cache_dir``, so a
    rerun or a second model on the same reference set does not decode 40k images again.
    """
    if not files:
        return
    root = Path(os.path.commonpath([str(path.parent) for path in files]))
    marker = None
    if cache_dir is not None:
        marker = Path(cache_dir).expanduser() / f"{VERIFIED_PREFIX}{file_set_key(files, root, {'check': 'decode'})}"
        if marker.is_file():
            return
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_decode_problem, files))
    bad = [(path, problem) for path, problem in zip(files, problems, strict=True) if problem]
    if bad:
        path, problem = bad[0]
        more = f" ({len(bad) - 1} more cannot be decoded either)" if len(bad) > 1 else ""
        raise GSPNUserError(
            f"FID reference image {path} cannot be decoded ({problem}){more}; replace it with an intact copy (the "
            "original archive) or remove it from --coco-images. Nothing was generated yet."
        )
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(marker, json.dumps({"folder": str(root), "num_images": len(files)}) + "\n")


def _decode_problem(path: Path) -> str:
    """'' when ``path`` decodes completely, else what went wrong."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


class _ReferenceImages(Dataset):
    def __init__(self, files: list[Path], size: int, resize: str, backend: FidBackend) -> None:
        self.files, self.size, self.resize, self.prepare = files, size, resize, backend.prepare

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            return self.prepare(fid_image(image, self.size, self.resize))


def reference_statistics(
    files: list[Path],
    backend: FidBackend,
    size: int,
    resize: str,
    cache_dir: str | Path | None,
    state: PartialState,
    batch_size: int = 32,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """Mean, covariance and count of the reference features, from the cache or computed (and then cached).

    Call it on every process: each computes its share, the sums are all-reduced, the main process
    writes the cache. Returns the statistics and a record (key, cache file, whether it was a hit).
    """
    root = Path(os.path.commonpath([str(path.parent) for path in files]))
    settings = {
        "fid_size": size,
        "fid_resize": resize,
        "crop": "center square",
        "backend": backend.name,
        "feature_model_sha256": module_sha256(backend.model),
    }
    key = file_set_key(files, root, settings)
    cache = None if cache_dir is None else Path(cache_dir).expanduser() / f"{key}.npz"
    info = {"key": key, "cache_file": str(cache) if cache else None, "settings": settings, "num_images": len(files)}
    state.wait_for_everyone()
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            logger.info("FID reference statistics from the cache %s", cache)
            return stored["mu"], stored["sigma"], int(stored["count"]), {**info, "cached": True}
    with state.split_between_processes(files) as share:
        share = list(share)
    loader = DataLoader(_ReferenceImages(share, size, resize, backend), batch_size=batch_size, num_workers=num_workers)
    backend.model.to(state.device)
    stats = GaussianStats(feature_dim(backend, size, state.device), state.device)
    with torch.no_grad():
        for batch in tqdm(loader, desc="FID reference", unit="batch", disable=not state.is_local_main_process):
            stats.update(backend.model(batch.to(state.device)))
    stats.all_reduce()
    mu, sigma, count = stats.mean_cov()
    if cache is not None and state.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomically(cache, mu=mu, sigma=sigma, count=np.array(count), settings=np.array(json.dumps(info)))
        logger.info("Cached the FID reference statistics in %s", cache)
    return mu, sigma, count, {**info, "cached": False}
