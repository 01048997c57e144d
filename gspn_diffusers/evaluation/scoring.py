"""One pass over the generated images: their FID feature statistics and their CLIP-T against the captions."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .clip_t import ClipModel, ClipTScore
from .coco import CaptionRecord
from .fid import FidBackend, GaussianStats, feature_dim, fid_image
from .settings import EvaluationConfig


class _GeneratedImages(Dataset):
    """A generated PNG prepared for the FID backend and for CLIP, with its caption.

    With ``clip_image_size`` the CLIP input is first center-cropped to a square and resized to it
    (with the FID resize filter), as LinFusion does (256); otherwise CLIP's own preprocessing sees
    the image as generated.
    """

    def __init__(
        self, records, folder: Path, height: int, width: int, backend: FidBackend, clip, config: EvaluationConfig
    ) -> None:
        self.records, self.folder, self.height, self.width = records, folder, height, width
        self.prepare, self.clip_preprocess = backend.prepare, clip.preprocess
        self.fid_size, self.resize, self.clip_size = config.fid_size, config.fid_resize, config.clip_image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record: CaptionRecord = self.records[i]
        with Image.open(self.folder / record.png_name) as image:
            image = image.convert("RGB")
        if image.size != (self.width, self.height):
            raise ValueError(
                f"{self.folder / record.png_name} is {image.size[0]}x{image.size[1]}, expected "
                f"{self.width}x{self.height}; delete it to regenerate."
            )
        fid_input = self.prepare(fid_image(image, self.fid_size, self.resize))
        clip_image = image if self.clip_size is None else fid_image(image, self.clip_size, self.resize)
        return fid_input, self.clip_preprocess(clip_image), record.caption


def score_generated(
    records: list[CaptionRecord],
    folder: Path,
    height: int,
    width: int,
    backend: FidBackend,
    clip: ClipModel,
    config: EvaluationConfig,
    device: str | torch.device,
    show_progress: bool = True,
) -> tuple[GaussianStats, float]:
    """FID statistics and CLIP-T of the generated images of ``records`` (this process's share).

    Both are all-reduced over the processes of a distributed run, so every process gets the
    statistics and the score of all images.
    """
    backend.model.to(device)
    clip_t = ClipTScore(clip, device, config.clip_prefix)
    loader = DataLoader(
        _GeneratedImages(records, folder, height, width, backend, clip, config),
        batch_size=config.metric_batch_size,
        num_workers=config.num_workers,
    )
    stats = GaussianStats(feature_dim(backend, config.fid_size, device), device)
    with torch.no_grad():
        for fid_input, pixels, captions in tqdm(loader, desc="metrics", unit="batch", disable=not show_progress):
            stats.update(backend.model(fid_input.to(device)))
            clip_t.update(pixels, captions)
    stats.all_reduce()
    return stats, clip_t.compute()
