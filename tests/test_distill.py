"""The distillation trainer on tiny models and tiny datasets written here in every supported layout."""

from __future__ import annotations

import copy
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

from gspn_diffusers import GSPNConfig, convert, load_gspn
from gspn_diffusers.distill.conditioning import prepare_inputs
from gspn_diffusers.distill.data import ImageCaptionDataset, collate
from gspn_diffusers.distill.losses import Attn1Recorder, LossWeights, distillation_losses
from gspn_diffusers.tiny import tiny_pipeline

RESOLUTION = 64
SIZES = [(96, 64), (64, 80), (72, 72), (128, 64), (64, 64), (80, 112)]  # (width, height): several aspect ratios
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; its process-wide singletons must not leak between tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def sample_images() -> list[tuple[Image.Image, str]]:
    """Real images: colour gradients with a shape drawn on them, at several aspect ratios."""
    samples = []
    for i, ((width, height), color) in enumerate(zip(SIZES, COLORS, strict=True)):
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        shape = draw.ellipse if i % 2 else draw.rectangle
        shape((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=color)
        samples.append((image, f"a {color} {'circle' if i % 2 else 'square'} on a gradient"))
    return samples


def _encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


CORRUPT = {"truncated": None, "garbage": b"this is not an image"}


def write_webdataset(root: Path, corrupt: bool = False) -> Path:
    """img2dataset's webdataset output: two shards of KEY.jpg / KEY.txt / KEY.json."""
    root.mkdir(parents=True)
    samples = sample_images()
    entries = [(f"{i:09d}", _encoded(image), caption) for i, (image, caption) in enumerate(samples)]
    if corrupt:  # one broken file in each shard, never adjacent to another
        entries.insert(1, ("900000000", _encoded(samples[0][0])[:200], "truncated jpeg"))
        entries.insert(5, ("900000001", CORRUPT["garbage"], "not an image"))
    half = len(entries) // 2
    for shard, part in enumerate([entries[:half], entries[half:]]):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for key, data, caption in part:
                meta = json.dumps({"caption": caption, "key": key}).encode()
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (root / f"{shard:05d}_stats.json").write_text("{}")
    return root


def write_files(root: Path) -> Path:
    """img2dataset's files output: 00000/000000000.jpg + .txt."""
    for i, (image, caption) in enumerate(sample_images()):
        folder = root / f"{i // 4:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:09d}.jpg")
        (folder / f"{i:09d}.txt").write_text(caption)
    return root


def write_metadata(root: Path, kind: str) -> Path:
    """A folder of PNG images with metadata.jsonl or metadata.csv (file_name, text)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (image, caption) in enumerate(sample_images()):
        image.save(root / "images" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "text": caption})
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def write_hf(root: Path) -> Path:
    import datasets

    samples = sample_images()
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"picture": [image for image, _ in samples], "caption": [c for _, c in samples]}, features=features
    )
    dataset.save_to_disk(str(root))
    return root


def data_flags(fmt: str, root: Path) -> list[str]:
    if fmt == "webdataset":
        return ["--train_data_dir", str(write_webdataset(root, corrupt=True))]
    if fmt == "files":
        return ["--train_data_dir", str(write_files(root))]
    if fmt in ("jsonl", "csv"):
        return ["--train_data_dir", str(write_metadata(root, fmt))]
    return ["--dataset_name", str(write_hf(root)), "--image_column", "picture", "--caption_column", "caption"]


def train_argv(output_dir: Path, kind: str = "sd15", *extra: str) -> list[str]:
    return [
        "--tiny", kind, "--output_dir", str(output_dir), "--resolution", str(RESOLUTION),
        "--train_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "3e-3", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "100", "--validation_prompts", "--report_to", "none", "--caption_dropout", "0",
        "--gate-rank", "2", *extra,
    ]  # fmt: skip


def fixed_batch_losses(kind: str, records, weights_dir: Path | None) -> dict[str, float]:
    """The distillation loss of a fresh student (or one loaded from ``weights_dir``) on a fixed batch and noise."""
    pipe = tiny_pipeline(kind)
    teacher = copy.deepcopy(pipe.unet)
    if weights_dir is None:
        convert(pipe, GSPNConfig.from_preset(kind, gate_rank=2))
    else:
        load_gspn(pipe, weights_dir)
    batch = collate([ImageCaptionDataset(records, RESOLUTION, center_crop=True)[i] for i in range(4)])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    inputs = prepare_inputs(
        pipe, scheduler, batch, RESOLUTION, torch.float32, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        losses = distillation_losses(
            pipe.unet, teacher, Attn1Recorder(pipe.unet), Attn1Recorder(teacher), inputs.noisy_latents,
            inputs.timesteps, inputs.target, inputs.unet_kwargs, LossWeights(),
        )  # fmt: skip
    return {term: value.item() for term, value in losses.items()}
