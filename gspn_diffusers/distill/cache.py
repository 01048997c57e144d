"""``--cache_latents``: VAE latents and text embeddings computed once, written to disk, read every epoch.

Encoding is most of a distillation step's cost besides the two UNets (SD-XL: a 1024 px VAE encode
and two text encoders per image). With the cache each image is encoded once: the VAE posterior
(mean and standard deviation, so every epoch still draws a fresh latent sample), the prompt
embeddings (and SD-XL's pooled embedding), the original size and the crop corner, one
safetensors file per image. The augmentation is therefore fixed per image: the crop, the flip and
the caption choice of the first epoch (``--random_flip`` flips a fixed half of the images rather
than a new half every epoch). Caption dropout still happens every step, on the embeddings.

The folder is keyed by everything its content depends on (model, resolution, crop and flip flags,
seed, dtype, and every image's source file with its size and modification time, and its caption)
under ``--cache_dir`` or ``output_dir/latent_cache``; each process encodes its share of the images,
files are renamed into place when written, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .conditioning import encode_text, latent_moments
from .data import ImageCaptionDataset, UnreadableReport, collate
from .failures import writing
from .records import ImageRecord, TarMember

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "cache_complete.json"
CACHE_VERSION = 2  # 2: keyed by every source file's version


def _source_identity(record: ImageRecord, stats: dict[Path, list[int]]) -> list[Any]:
    """Where an image's bytes come from and the version of the file that holds them (size, mtime)."""
    source = record.source

    def stat(path: Path) -> list[int]:
        if path not in stats:
            info = path.stat()
            stats[path] = [info.st_size, info.st_mtime_ns]
        return stats[path]

    if isinstance(source, Path):
        return [str(source), *stat(source)]
    if isinstance(source, TarMember):
        return [str(source.shard), source.offset, source.size, *stat(source.shard)]
    return [record.where, getattr(source.dataset, "_fingerprint", None)]  # a Hugging Face dataset row


def cache_key(model: str, dataset: ImageCaptionDataset, dtype: torch.dtype) -> str:
    """A digest of everything the cached tensors depend on: settings, and every image's source file version
    (path, size, modification time) and caption, so a replaced or edited image is never served stale."""
    digest = hashlib.sha256()
    settings = {
        "version": CACHE_VERSION,
        "model": model,
        "resolution": dataset.resolution,
        "center_crop": dataset.center_crop,
        "random_flip": dataset.random_flip,
        "seed": dataset.seed,
        "dtype": str(dtype),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    stats: dict[Path, list[int]] = {}  # one stat per file: a shard holds thousands of images
    for record in dataset.records:
        digest.update(json.dumps([_source_identity(record, stats), record.caption]).encode())
    return digest.hexdigest()[:16]


def _item_path(directory: Path, index: int) -> Path:
    return directory / f"{index:08d}.safetensors"


@torch.no_grad()
def build_latent_cache(
    pipe: DiffusionPipeline,
    dataset: ImageCaptionDataset,
    directory: Path,
    accelerator: Accelerator,
    batch_size: int,
    num_workers: int,
    report: UnreadableReport,
) -> None:
    """Encode every image not yet in ``directory`` (each process its share), then mark the cache complete."""
    if (directory / COMPLETE_MARKER).is_file():
        logger.info("Reusing the latent cache in %s", directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    dataset.set_epoch(0)
    rank, world = accelerator.process_index, accelerator.num_processes
    todo = [i for i in range(rank, len(dataset), world) if not _item_path(directory, i).is_file()]
    loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    device = accelerator.device
    done = 0
    for batch in tqdm(loader, desc="Caching latents", disable=not accelerator.is_local_main_process):
        report.update(batch["unreadable"])
        mean, std = latent_moments(pipe, batch["pixel_values"])
        embeddings = encode_text(pipe, batch["captions"], device)
        for j in range(len(mean)):
            tensors = {"latent_mean": mean[j], "latent_std": std[j], **{k: v[j] for k, v in embeddings.items()}}
            tensors["original_size"] = batch["original_sizes"][j]
            tensors["crop_top_left"] = batch["crops_top_left"][j]
            path = _item_path(directory, todo[done + j])
            temporary = path.with_suffix(".tmp")
            # Serialised here and written with open(): safetensors' save_file creates its files 0600, and a shared
            # cache must be readable by the group (the umask's mode, as for any file a user writes).
            temporary.write_bytes(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
            temporary.rename(path)
        done += len(mean)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (directory / COMPLETE_MARKER).write_text(json.dumps({"images": len(dataset)}) + "\n")
        logger.info("Cached the latents and text embeddings of %d images in %s", len(dataset), directory)
    accelerator.wait_for_everyone()


class CachedLatents(Dataset):
    """The cached items; the same keys every epoch (augmentation was fixed when the cache was built)."""

    def __init__(self, directory: Path, length: int) -> None:
        self.directory, self.length = directory, length

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Nothing to redraw: kept so the training loop treats both datasets alike."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(_item_path(self.directory, index))


def collate_cached(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    batch: dict[str, Any] = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    batch["original_sizes"] = batch.pop("original_size")
    batch["crops_top_left"] = batch.pop("crop_top_left")
    batch["unreadable"] = []
    return batch


def training_data(
    args: argparse.Namespace,
    pipe: DiffusionPipeline,
    dataset: ImageCaptionDataset,
    accelerator: Accelerator,
    weight_dtype: torch.dtype,
    report: UnreadableReport,
) -> tuple[torch.utils.data.Dataset, Any]:
    """The dataset the loop reads and its collate function: images, or their cached encodings."""
    if not args.cache_latents:
        return dataset, collate
    base = Path(args.cache_dir) / "gspn_latents" if args.cache_dir else Path(args.output_dir) / "latent_cache"
    directory = base / cache_key(args.model or f"tiny-{args.tiny}", dataset, weight_dtype)
    with writing(base, "the latent cache"):  # what is written stays: an interrupted build continues
        build_latent_cache(
            pipe, dataset, directory, accelerator, args.train_batch_size, args.dataloader_num_workers, report
        )
    return CachedLatents(directory, len(dataset)), collate_cached
