"""Atomic writes: a reader (another process, or a rerun after a kill) sees the old file or the new one, never half.

All of them go through :func:`gspn_diffusers.safe_write.atomic_path`: a unique temporary name beside the file (two
evaluations sharing the FID cache never write into one temporary file), the permissions of a new file (0644
under the usual umask), and a full disk reported with the folder's name. :func:`readable_image` is the other
side: what a resumed run accepts as an image already written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..safe_write import atomic_path


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_png_atomically(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        np.savez(file, **arrays)


def readable_image(path: Path, size: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` is an image that decodes completely (and is ``size`` = (width, height), when given).

    Presence is not enough: a crash of a writer that did not write aside (an older version, a copy interrupted
    by the user, a disk that filled) leaves a truncated PNG whose header opens fine; decoding it fails.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return size is None or image.size == tuple(size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
