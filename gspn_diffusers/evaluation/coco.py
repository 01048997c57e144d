"""Evaluation captions: from a COCO annotation file (captions and seeds picked by a seed) or a plain captions file.

The protocol: a fixed seed shuffles the COCO images that have captions, takes the first N of them and
one random caption of each, and draws one generation seed per caption. Every reference image is
therefore used once, so the FID reference set is exactly the images of the selected captions. Because
the whole shuffled list is drawn before the first N are taken, a selection of N captions is the prefix
of the selection of any larger N with the same seed (a 5k run is the start of the 30k run).

A captions file (one caption a line, as LinFusion's ``assets/captions.txt``) gives caption ``i``
the seed ``i``, and no reference image of its own.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

SEED_RANGE = 2**31


@dataclass(frozen=True)
class CaptionRecord:
    """One evaluation sample: ``index`` names the generated PNG (``000123.png``); COCO ids are ``None`` for a
    caption from a captions file."""

    index: int
    image_id: int | None
    caption_id: int | None
    file_name: str | None
    caption: str
    seed: int

    @property
    def png_name(self) -> str:
        return f"{self.index:06d}.png"

    def to_dict(self) -> dict:
        return asdict(self)


def load_coco_captions(annotation_file: str | Path) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """``image id -> file name`` and ``image id -> [(caption id, caption), ...]`` of a COCO captions file.

    Raises a message naming the file and what is wrong when it is missing or not COCO captions format
    (``captions_val2014.json`` / ``captions_val2017.json`` from the COCO annotations archive).
    """
    path = Path(annotation_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {str(path)!r} does not exist; pass captions_val2014.json or captions_val2017.json "
            "from https://cocodataset.org (annotations_trainval2014.zip / annotations_trainval2017.zip)."
        )
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON file ({error}); pass a COCO captions annotation file.") from error
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("images"), list)
        or not isinstance(document.get("annotations"), list)
    ):
        raise ValueError(
            f"{path} is not in COCO captions format: expected a JSON object with 'images' (id, file_name) and "
            "'annotations' (id, image_id, caption) lists, as in captions_val2014.json."
        )
    try:
        files = {int(image["id"]): str(image["file_name"]) for image in document["images"]}
        captions: dict[int, list[tuple[int, str]]] = {}
        for annotation in document["annotations"]:
            captions.setdefault(int(annotation["image_id"]), []).append(
                (int(annotation["id"]), str(annotation["caption"]).strip())
            )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path} is not in COCO captions format: an entry lacks {error} (images need id and file_name, "
            "annotations need id, image_id and caption)."
        ) from error
    unknown = sorted(set(captions) - set(files))
    if unknown:
        raise ValueError(f"{path}: captions refer to image id {unknown[0]} that is not listed in 'images'.")
    return files, captions


def select_captions(annotation_file: str | Path, num_captions: int, seed: int = 0) -> list[CaptionRecord]:
    """``num_captions`` captions of distinct images, and a generation seed for each, chosen by ``seed``."""
    files, captions = load_coco_captions(annotation_file)
    image_ids = sorted(captions)
    if not 0 < num_captions <= len(image_ids):
        raise ValueError(
            f"Cannot select {num_captions} captions: {annotation_file} has {len(image_ids)} images with captions "
            f"(one caption per image is used); pass --num-captions between 1 and {len(image_ids)}."
        )
    rng = random.Random(seed)
    rng.shuffle(image_ids)
    chosen = [rng.choice(sorted(captions[image_id])) for image_id in image_ids]
    seeds = [rng.randrange(SEED_RANGE) for _ in image_ids]
    return [
        CaptionRecord(index, image_id, caption_id, files[image_id], caption, image_seed)
        for index, (image_id, (caption_id, caption), image_seed) in enumerate(
            zip(image_ids[:num_captions], chosen[:num_captions], seeds[:num_captions], strict=True)
        )
    ]


def read_captions_file(captions_file: str | Path, num_captions: int | None = None) -> list[CaptionRecord]:
    """The first ``num_captions`` (default: all) non-empty lines of a text file; caption ``i`` gets seed ``i``."""
    path = Path(captions_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Captions file {str(path)!r} does not exist; pass a text file, one caption a line.")
    try:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a UTF-8 text file ({error}); pass one caption a line.") from error
    num_captions = len(captions) if num_captions is None else num_captions
    if not 0 < num_captions <= len(captions):
        raise ValueError(
            f"Cannot take {num_captions} captions: {path} has {len(captions)} non-empty lines; pass --num-captions "
            f"between 1 and {len(captions)}."
        )
    return [CaptionRecord(i, None, None, None, caption, i) for i, caption in enumerate(captions[:num_captions])]


def check_reference_images(records: list[CaptionRecord], image_dir: str | Path) -> Path:
    """Fail before any generation when the COCO image folder or a selected image is missing or not an image.

    Only the file headers are read, so checking 30000 images takes seconds.
    """
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"COCO image folder {str(folder)!r} does not exist; pass the folder of the annotation file's images "
            "(e.g. val2014/ from val2014.zip)."
        )
    missing = [record.file_name for record in records if not (folder / record.file_name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(records)} selected COCO images are missing in {str(folder)!r} (e.g. "
            f"{missing[0]}); pass the image folder that matches the annotation file (val2014/ for "
            "captions_val2014.json, val2017/ for captions_val2017.json)."
        )
    for record in records:
        try:
            with Image.open(folder / record.file_name):
                pass
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"COCO image {folder / record.file_name} cannot be read as an image ({error}); replace it with the "
                "original file from the COCO archive."
            ) from error
    return folder
