"""Atomic writes: a reader (another process, or a rerun after a kill) sees the old file or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def _temporary(path: Path) -> Path:
    """A hidden name beside ``path``: same filesystem (so the rename is atomic), never mistaken for a result."""
    return path.with_name(f".{path.name}.tmp")


def write_text_atomically(path: Path, text: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def save_png_atomically(image: Image.Image, path: Path) -> None:
    tmp = _temporary(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    tmp = _temporary(path)
    with tmp.open("wb") as file:
        np.savez(file, **arrays)
    os.replace(tmp, path)
