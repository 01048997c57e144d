"""Image/caption datasets in the layouts people keep LAION-style subsets in.

- img2dataset ``webdataset`` output: ``.tar`` shards holding ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json``);
- img2dataset ``files`` output (or any folder tree): images with a same-named ``.txt`` caption beside them;
- a folder of images with ``metadata.jsonl`` / ``captions.jsonl`` / ``metadata.csv`` (``file_name`` and
  the caption column, the Hugging Face ``imagefolder`` convention);
- a Hugging Face dataset with an image and a caption column (a ``save_to_disk`` folder or a hub name).

Every layout is indexed once at start (captions and where each image lives; image bytes are read
lazily), so an empty or wrongly laid out dataset fails before any model is loaded, with a message
that says which layouts are understood. Images without a caption are left out and counted (one
warning per dataset); a ``metadata.jsonl`` / ``.csv`` row without the caption column is an error
naming the file and line. An image that cannot be decoded is skipped at training time: the sample
is replaced by the next readable one, and the batch names the skipped files
(``batch["unreadable"]``) so the trainer warns once per file and counts every skip.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "captions.jsonl", "metadata.csv", "captions.csv")
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
FILE_COLUMN = "file_name"
# What decoding a broken file raises in PIL (truncated data, unknown format, decompression bombs).
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

LAYOUT_HELP = (
    "Expected one of: (1) img2dataset webdataset output, a folder of .tar shards (or one .tar, or a glob) "
    "holding KEY.jpg + KEY.txt pairs; (2) img2dataset files output or any folder tree with images and a "
    "same-named .txt caption beside each; (3) a folder of images with metadata.jsonl / captions.jsonl / "
    f"metadata.csv whose rows have '{FILE_COLUMN}' and the caption column; (4) a Hugging Face dataset "
    "(--dataset_name: a save_to_disk folder or a hub name) with --image_column and --caption_column."
)


class DatasetLayoutError(ValueError):
    """The dataset is empty or not laid out in a way this module reads."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}\n{LAYOUT_HELP}")


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


def _warn_missing_captions(count: int, total: int, where: str) -> None:
    if count:
        logger.warning(
            "%d of the %d images in %s have no caption and are left out (give each a caption to train on it).",
            count,
            total,
            where,
        )


def _has_caption(caption: Any) -> bool:
    if isinstance(caption, list | tuple):
        return any(_has_caption(c) for c in caption)
    return isinstance(caption, str) and caption.strip() != ""


def _read_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def _caption_from_json(data: bytes, caption_column: str) -> str | None:
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    for key in (caption_column, "caption", "text"):
        if isinstance(document.get(key), str):
            return document[key]
    return None


def _index_tar_shard(shard: Path, caption_column: str) -> list[ImageRecord]:
    """One pass over the shard headers: image members are located, caption members are read."""
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    json_captions: dict[str, str] = {}
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not dot:
                continue
            key, extension = f"{directory}/{stem}", "." + extension.lower()
            if extension in IMAGE_EXTENSIONS:
                images[key] = member
            elif extension == ".txt":
                captions[key] = _read_text(tar.extractfile(member).read())
            elif extension == ".json":
                caption = _caption_from_json(tar.extractfile(member).read(), caption_column)
                if caption is not None:
                    json_captions[key] = caption
    records = []
    for key, member in images.items():
        caption = captions.get(key, json_captions.get(key))
        if not _has_caption(caption):
            continue
        source = TarMember(shard, member.offset_data, member.size)
        records.append(ImageRecord(caption, f"{shard}:{member.name}", source))
    _warn_missing_captions(len(images) - len(records), len(images), str(shard))
    return records


def _tar_shards(location: str) -> list[Path]:
    path = Path(location)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(location) if p.endswith(".tar"))


def webdataset_records(location: str, caption_column: str = "text") -> list[ImageRecord]:
    shards = _tar_shards(location)
    records: list[ImageRecord] = []
    for shard in tqdm(shards, desc="Indexing shards", disable=len(shards) < 8):
        try:
            records.extend(_index_tar_shard(shard, caption_column))
        except tarfile.TarError as error:
            logger.warning("Skipping unreadable shard %s: %s", shard, error)
    if not records:
        raise DatasetLayoutError(
            f"No image with a caption (.txt, or .json with a '{caption_column}'/'caption' key) found in the "
            f"{len(shards)} .tar shard(s) at {location!r}."
        )
    return records


def caption_file_records(root: Path) -> list[ImageRecord]:
    """Images anywhere under ``root`` with a same-named ``.txt`` caption (img2dataset's ``files`` format)."""
    records = []
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    for image in images:
        caption_path = image.with_suffix(".txt")
        caption = _read_text(caption_path.read_bytes()) if caption_path.is_file() else ""
        if _has_caption(caption):
            records.append(ImageRecord(caption, str(image), image))
    if not records:
        found = f"{len(images)} images but no .txt caption beside them" if images else "no images"
        raise DatasetLayoutError(
            f"Found {found} in {str(root)!r}, and no metadata file ({', '.join(METADATA_FILES)})."
        )
    _warn_missing_captions(len(images) - len(records), len(images), str(root))
    return records


def _metadata_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a metadata file with their line numbers (for error messages)."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
    for _, row in rows:
        image = root / str(row[FILE_COLUMN] or "")
        if row[FILE_COLUMN] is None or not image.is_file():
            missing += 1
        elif not _has_caption(row[caption_column]):
            no_caption += 1
        else:
            records.append(ImageRecord(row[caption_column], str(image), image))
    if missing:
        logger.warning("%d of the %d images listed in %s do not exist and are left out.", missing, len(rows), metadata)
    _warn_missing_captions(no_caption, len(rows) - missing, str(metadata))
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
        if _has_caption(caption)
    ]
    _warn_missing_captions(len(dataset) - len(records), len(dataset), repr(name_or_path))
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
) -> list[ImageRecord]:
    """Index a dataset, detecting its layout; raises :class:`DatasetLayoutError` when it is empty or unknown."""
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Pass exactly one of --train_data_dir (a local folder / shards) or --dataset_name.")
    if dataset_name is not None:
        return hf_records(dataset_name, image_column, caption_column, dataset_split, dataset_config_name, cache_dir)
    root = Path(train_data_dir).expanduser()
    if not root.exists() and not glob.glob(train_data_dir):
        raise FileNotFoundError(f"Training data {train_data_dir!r} does not exist.")
    if root.is_file() or not root.exists() or any(root.glob("*.tar")):
        return webdataset_records(train_data_dir, caption_column)
    for name in METADATA_FILES:
        if (root / name).is_file():
            return metadata_records(root, root / name, caption_column)
    if any((root / marker).is_file() for marker in HF_DISK_MARKERS):
        return hf_records(str(root), image_column, caption_column, dataset_split)
    return caption_file_records(root)


def resize_and_crop(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the short side to ``resolution`` (aspect kept), crop a square, optionally flip.

    Returns the crop, the original ``(height, width)`` and the crop's ``(top, left)`` in the
    resized image, which is what SD-XL's size and crop conditioning is trained on.
    """
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    width = max(resolution, round(image.width * scale))
    height = max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top, left = rng.randint(0, height - resolution), rng.randint(0, width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - left - resolution
    return image, original_size, (top, left)


def open_image(source: bytes | str | Path) -> Image.Image:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return image.convert("RGB")


def _pick_caption(caption: Any, rng: random.Random) -> str:
    """One caption: a random one of several (COCO-style lists), the empty prompt for a missing one."""
    if isinstance(caption, list | tuple):
        captions = [c for c in caption if _has_caption(c)]
        caption = rng.choice(captions) if captions else None
    return "" if caption is None else str(caption)


class ImageCaptionDataset(Dataset):
    """Training samples: pixels in [-1, 1] at ``resolution``, caption, original size and crop.

    Augmentation (random crop, flip, the choice among several captions) is drawn from a generator
    seeded by (seed, epoch, index), so it does not depend on worker processes or on where a
    resumed run picks up.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        if not records:
            raise DatasetLayoutError("The dataset is empty.")
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        unreadable = []
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                image = open_image(record.load())
                break
            except UNREADABLE_ERRORS as error:
                unreadable.append((record.where, str(error)))
        else:
            raise RuntimeError(f"None of the {len(self.records)} images of the dataset can be read.")
        flip = self.random_flip and rng.random() < 0.5
        image, original_size, crop_top_left = resize_and_crop(image, self.resolution, self.center_crop, flip, rng)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        caption = _pick_caption(record.caption, rng)
        return {
            "pixel_values": pixels,
            "caption": caption,
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor(crop_top_left),
            "unreadable": unreadable,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]).contiguous(),
        "captions": [s["caption"] for s in samples],
        "original_sizes": torch.stack([s["original_size"] for s in samples]),
        "crops_top_left": torch.stack([s["crop_top_left"] for s in samples]),
        "unreadable": [where for s in samples for where in s["unreadable"]],
    }


class UnreadableReport:
    """Warns once per unreadable file (workers and epochs see a file again; the log should not) and counts skips."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.skipped = 0

    def update(self, unreadable: list[tuple[str, str]]) -> None:
        """``unreadable``: (file, error) of every skip in a batch."""
        self.skipped += len(unreadable)
        for where, error in unreadable:
            if where not in self.warned:
                self.warned.add(where)
                logger.warning("Skipping unreadable image %s: %s", where, error)
