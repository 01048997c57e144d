"""Training samples decoded from the records of :mod:`.records`: pixels, caption, original size and crop.

An image that cannot be decoded is skipped at training time: the sample is replaced by the next
readable one, and the batch names the skipped files (``batch["unreadable"]``) so the trainer warns
once per file and counts every skip.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import GSPNUserError
from .records import DatasetLayoutError, ImageRecord, has_caption

logger = logging.getLogger(__name__)

# What decoding a broken file raises in PIL (truncated data, unknown format, decompression bombs).
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth pixels scaled to 0..255 by their real range (PIL's own conversion clips them at 255).

    16-bit modes (``I;16*``, and ``I`` holding 0..65535: how 16-bit PNGs open) by the 16-bit range; float
    images (``F``) as 0..1 when they lie in it; anything else by its own minimum and maximum.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 65535.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values
    else:
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image for training, from any mode PIL opens.

    High bit depths are scaled, not clipped (:func:`_to_uint8`); transparency (RGBA, LA, PA, a palette
    or greyscale with a transparent colour) is composited over white, as browsers show it, rather than
    dropped (which shows whatever colour the transparent pixels happen to hold); CMYK, YCbCr, LAB, HSV,
    1-bit and greyscale use PIL's conversions.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    transparent_colour = image.mode in ("P", "L", "RGB") and "transparency" in image.info
    if transparent_colour or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def open_image(source: bytes | str | Path) -> Image.Image:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return to_rgb(image)


def check_readable(records: Sequence[ImageRecord]) -> None:
    """Fail at start, in one line, when no image of the dataset decodes (stops at the first one that does)."""
    first_error = None
    for record in records:
        try:
            open_image(record.load())
            return
        except UNREADABLE_ERRORS as error:
            first_error = first_error or f"{record.where}: {error}"
    raise GSPNUserError(
        f"None of the {len(records)} images of the dataset can be decoded (the first: {first_error}); check that "
        "the files are images (open one with PIL) and were copied whole."
    )


def _pick_caption(caption: Any, rng: random.Random) -> str:
    """One caption: a random one of several (COCO-style lists), the empty prompt for a missing one."""
    if isinstance(caption, list | tuple):
        captions = [c for c in caption if has_caption(c)]
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
    """Warns once per unreadable file (workers and epochs see a file again; the log should not) and counts skips.

    ``lost``: what indexing could not read (damaged shards, one line each), repeated in the summary.
    """

    def __init__(self, lost: Sequence[str] = ()) -> None:
        self.warned: set[str] = set()
        self.skipped = 0
        self.lost = list(lost)

    def summary(self, skipped: int) -> None:
        """The skipped data of the whole run (``skipped``: the skips of every process), after training."""
        if skipped:
            logger.warning("Skipped %d unreadable images during training (see the warnings above).", skipped)
        for line in self.lost:
            logger.warning("Not trained on (damaged shard): %s", line)

    def update(self, unreadable: list[tuple[str, str]]) -> None:
        """``unreadable``: (file, error) of every skip in a batch."""
        self.skipped += len(unreadable)
        for where, error in unreadable:
            if where not in self.warned:
                self.warned.add(where)
                logger.warning("Skipping unreadable image %s: %s", where, error)


def make_dataloader(
    args: argparse.Namespace, dataset: torch.utils.data.Dataset, collate_fn: Callable[[list], dict[str, Any]]
) -> torch.utils.data.DataLoader:
    """The training loader: shuffled by its own seeded generator, workers started anew every epoch."""
    workers = args.dataloader_num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # Not persistent: workers hold their own copy of the dataset, so only workers started after
        # set_epoch draw that epoch's crops, flips and captions (persistent ones repeat epoch 0's forever).
        persistent_workers=False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run
        # (whose RNG state Accelerate restores) would see different noise than the uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed or 0),
    )
