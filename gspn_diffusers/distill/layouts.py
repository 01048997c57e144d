"""Where the images and captions of a dataset are: the layouts people keep LAION-style subsets in.

- img2dataset ``webdataset`` output: ``.tar`` shards holding ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json``);
- img2dataset ``files`` output (or any folder tree): images with a same-named ``.txt`` caption beside them;
- a folder of images with ``metadata.jsonl`` / ``captions.jsonl`` / ``metadata.csv`` (``file_name`` and
  the caption column, the Hugging Face ``imagefolder`` convention);
- a Hugging Face dataset with an image and a caption column (a ``save_to_disk`` folder or a hub name).

Every layout is indexed once at start (captions and where each image lives; image bytes are read
lazily by :mod:`.data`), so an empty or wrongly laid out dataset fails before any model is loaded,
with a message that says which layouts are understood. Images without a caption are left out and
counted (one warning per dataset); a ``metadata.jsonl`` / ``.csv`` row without the caption column,
or naming a file outside the dataset folder (``../``, an absolute path), is an error naming the file
and line, and so is a text file that is not UTF-8. The shards are indexed by :mod:`.shards`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
from pathlib import Path
from typing import Any

from .records import (
    FILE_COLUMN,
    HF_DISK_MARKERS,
    IMAGE_EXTENSIONS,
    METADATA_FILES,
    DatasetLayoutError,
    HFImage,
    ImageRecord,
    Records,
    UnsafePathError,
    decode_text,
    has_caption,
    warn_missing_captions,
)
from .shards import webdataset_records

logger = logging.getLogger(__name__)


def caption_file_records(root: Path) -> list[ImageRecord]:
    """Images anywhere under ``root`` with a same-named ``.txt`` caption (img2dataset's ``files`` format)."""
    records = []
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    for image in images:
        caption_path = image.with_suffix(".txt")
        caption = decode_text(caption_path.read_bytes(), str(caption_path)).strip() if caption_path.is_file() else ""
        if has_caption(caption):
            records.append(ImageRecord(caption, str(image), image))
    if not records:
        found = f"{len(images)} images but no .txt caption beside them" if images else "no images"
        raise DatasetLayoutError(
            f"Found {found} in {str(root)!r}, and no metadata file ({', '.join(METADATA_FILES)})."
        )
    warn_missing_captions(len(images) - len(records), len(images), str(root))
    return records


def _metadata_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a metadata file with their line numbers (for error messages)."""
    text = decode_text(path.read_bytes(), str(path))
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, row) for row in reader]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetLayoutError(f"{path} line {number} is not valid JSON ({error}).") from error
        if not isinstance(row, dict):
            raise DatasetLayoutError(f"{path} line {number} is not a JSON object with '{FILE_COLUMN}' and a caption.")
        rows.append((number, row))
    return rows


def _check_inside(root: Path, metadata: Path, number: int, name: Any) -> None:
    """A metadata row may only name a file inside the dataset folder: ``../`` or an absolute path would read
    whatever the metadata points at (another user's files, a system file) as training data."""
    if name is None:
        return
    relative = Path(str(name))
    if relative.is_absolute() or ".." in relative.parts:
        raise UnsafePathError(
            f"{metadata} line {number}: {FILE_COLUMN} {str(name)!r} leaves the dataset folder {str(root)!r}; "
            "metadata paths must be relative paths inside it (copy or link the image into the folder)."
        )


def metadata_records(root: Path, metadata: Path, caption_column: str = "text") -> list[ImageRecord]:
    rows = _metadata_rows(metadata)
    if not rows:
        raise DatasetLayoutError(f"{metadata} has no rows.")
    for number, row in rows:
        missing_columns = [c for c in (FILE_COLUMN, caption_column) if c not in row]
        if missing_columns:
            raise DatasetLayoutError(
                f"{metadata} line {number} has no {' or '.join(repr(c) for c in missing_columns)} (columns: "
                f"{sorted(row)}); every row needs '{FILE_COLUMN}' (the image path relative to {str(root)!r}) and "
                f"'{caption_column}' (the caption, null or empty for none; choose the column with --caption_column)."
            )
    records, missing, no_caption = [], 0, 0
    for number, row in rows:
        _check_inside(root, metadata, number, row[FILE_COLUMN])
        image = root / str(row[FILE_COLUMN] or "")
        if row[FILE_COLUMN] is None or not image.is_file():
            missing += 1
        elif not has_caption(row[caption_column]):
            no_caption += 1
        else:
            records.append(ImageRecord(row[caption_column], str(image), image))
    if missing:
        logger.warning("%d of the %d images listed in %s do not exist and are left out.", missing, len(rows), metadata)
    warn_missing_captions(no_caption, len(rows) - missing, str(metadata))
    if not records:
        raise DatasetLayoutError(
            f"None of the {len(rows)} images listed in {metadata} exist under {str(root)!r} with a caption."
        )
    return records


def hf_records(
    name_or_path: str,
    image_column: str,
    caption_column: str,
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> list[ImageRecord]:
    """A Hugging Face dataset: a ``save_to_disk`` folder or a hub name (needs the ``datasets`` package)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            'Hugging Face datasets need the `datasets` package: pip install "gspn-diffusers[distill]" (or datasets).'
        ) from error
    try:
        if Path(name_or_path).exists():
            dataset = datasets.load_from_disk(name_or_path)
        else:
            dataset = datasets.load_dataset(name_or_path, config_name, cache_dir=cache_dir)
    except (OSError, ValueError, ConnectionError) as error:
        raise OSError(
            f"Could not load the Hugging Face dataset {name_or_path!r}: {error}\nPass a folder written by "
            "Dataset.save_to_disk, or a hub dataset that is cached or can be downloaded."
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DatasetLayoutError(f"Dataset {name_or_path!r} has splits {sorted(dataset)}, not {split!r}.")
        dataset = dataset[split]
    missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise DatasetLayoutError(
            f"Dataset {name_or_path!r} has columns {dataset.column_names}; the columns {missing} are missing "
            "(choose them with --image_column / --caption_column)."
        )
    if len(dataset) == 0:
        raise DatasetLayoutError(f"Dataset {name_or_path!r} (split {split!r}) is empty.")
    if isinstance(dataset.features[image_column], datasets.Image):
        # Decode ourselves so that a broken image is skipped rather than raised inside `datasets`.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    records = [
        ImageRecord(caption, f"{name_or_path}[{i}]", HFImage(dataset, i, image_column))
        for i, caption in enumerate(dataset[caption_column])
        if has_caption(caption)
    ]
    warn_missing_captions(len(dataset) - len(records), len(dataset), repr(name_or_path))
    if not records:
        raise DatasetLayoutError(f"No row of dataset {name_or_path!r} has a caption in {caption_column!r}.")
    return records


def find_records(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    dataset_split: str = "train",
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
) -> Records:
    """Index a dataset, detecting its layout; raises :class:`DatasetLayoutError` when it is empty or unknown."""
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Pass exactly one of --train_data_dir (a local folder / shards) or --dataset_name.")
    if dataset_name is not None:
        return Records(
            hf_records(dataset_name, image_column, caption_column, dataset_split, dataset_config_name, cache_dir)
        )
    root = Path(train_data_dir).expanduser()
    if not root.exists() and not glob.glob(train_data_dir):
        raise FileNotFoundError(f"Training data {train_data_dir!r} does not exist.")
    if root.is_file() or not root.exists() or any(root.glob("*.tar")):
        return webdataset_records(train_data_dir, caption_column)
    for name in METADATA_FILES:
        if (root / name).is_file():
            return Records(metadata_records(root, root / name, caption_column))
    if any((root / marker).is_file() for marker in HF_DISK_MARKERS):
        return Records(hf_records(str(root), image_column, caption_column, dataset_split))
    return Records(caption_file_records(root))
