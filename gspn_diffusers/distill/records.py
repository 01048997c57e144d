"""What a dataset is made of, whatever its layout: records (a caption and where the image bytes are), the
errors that name a bad file, and the text decoding every layout shares.

The layouts themselves are found and indexed by :mod:`.layouts` (folders, metadata files, Hugging Face
datasets) and :mod:`.shards` (webdataset ``.tar`` shards); the images are decoded by :mod:`.data`.
Records are plain picklable data, so DataLoader workers work with any start method.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import GSPNUserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "captions.jsonl", "metadata.csv", "captions.csv")
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
FILE_COLUMN = "file_name"

LAYOUT_HELP = (
    "Expected one of: (1) img2dataset webdataset output, a folder of .tar shards (or one .tar, or a glob) "
    "holding KEY.jpg + KEY.txt pairs; (2) img2dataset files output or any folder tree with images and a "
    "same-named .txt caption beside each; (3) a folder of images with metadata.jsonl / captions.jsonl / "
    f"metadata.csv whose rows have '{FILE_COLUMN}' and the caption column; (4) a Hugging Face dataset "
    "(--dataset_name: a save_to_disk folder or a hub name) with --image_column and --caption_column."
)


class DatasetLayoutError(GSPNUserError):
    """The dataset is empty or not laid out in a way this module reads."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}\n{LAYOUT_HELP}")


class TextEncodingError(GSPNUserError):
    """A caption or metadata file that is not UTF-8."""


class UnsafePathError(GSPNUserError):
    """A metadata row names an image outside the dataset folder."""


class Records(list):
    """The records of a dataset, and what could not be indexed (``lost``: one line per damaged shard)."""

    def __init__(self, records: list[ImageRecord], lost: list[str] | None = None) -> None:
        super().__init__(records)
        self.lost = lost or []


@dataclass(frozen=True)
class TarMember:
    """An image inside an uncompressed .tar shard, read by offset without parsing the archive again."""

    shard: Path
    offset: int
    size: int

    def __call__(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class HFImage:
    """Row ``index`` of a Hugging Face dataset whose image column is not decoded by ``datasets``."""

    dataset: Any
    index: int
    column: str

    def __call__(self) -> bytes | str:
        value = self.dataset[self.index][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            value = buffer.getvalue()
        if not isinstance(value, bytes | str):
            raise ValueError(f"unsupported image value of type {type(value).__name__}")
        return value


@dataclass(frozen=True)
class ImageRecord:
    """One image and its caption(s). ``source`` is a file path or a callable returning bytes or a path.

    Records are plain picklable data, so DataLoader workers work with any start method.
    """

    caption: str | list[str]
    where: str
    source: Path | TarMember | HFImage

    def load(self) -> bytes | str | Path:
        return self.source if isinstance(self.source, Path) else self.source()


def warn_missing_captions(count: int, total: int, where: str) -> None:
    if count:
        logger.warning(
            "%d of the %d images in %s have no caption and are left out (give each a caption to train on it).",
            count,
            total,
            where,
        )


def has_caption(caption: Any) -> bool:
    """A non-empty caption, or a list holding at least one."""
    if isinstance(caption, list | tuple):
        return any(has_caption(c) for c in caption)
    return isinstance(caption, str) and caption.strip() != ""


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text, with or without a byte-order mark; anything else fails naming the file and the line (a caption
    read with replacement characters would train silently on garbage)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TextEncodingError(
            f"{where} line {line} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8."
        ) from None
