"""``evaluate``: the whole protocol (select captions, check inputs and weights, generate, FID + CLIP-T, results)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..convert import get_unet, gspn_config_of, is_converted
from ..loading import native_size
from .coco import CaptionRecord, check_reference_images, load_reference_image, select_captions
from .generate import check_settings, generate_images, write_manifest
from .metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    INCEPTION_NAME,
    ClipModel,
    ClipTScore,
    build_fid,
    clip_checkpoint,
    inception_weights,
    load_clip,
)
from .report import RESULTS_FORMAT, library_versions, write_results

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"


@dataclass
class EvaluationConfig:
    """What defines an evaluation run; everything here is recorded in ``results.json``.

    ``height``/``width`` default to the model's native size (the paper evaluates SD-1.5 at 1024).
    ``num_captions``: 30000 or 5000 in the literature, any number up to the images in the file.
    """

    annotation_file: str
    image_dir: str
    output_dir: str
    num_captions: int = 30000
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    batch_size: int = 1
    metric_batch_size: int = 32
    num_workers: int = 0
    fid_weights: str | None = None
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class _MetricImages(Dataset):
    """Generated image, its reference COCO image (cropped and resized alike), CLIP pixels and caption."""

    def __init__(self, records, generated: Path, reference: Path, height: int, width: int, clip_preprocess) -> None:
        self.records, self.generated, self.reference = records, generated, reference
        self.height, self.width, self.clip_preprocess = height, width, clip_preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record: CaptionRecord = self.records[i]
        with Image.open(self.generated / record.png_name) as image:
            fake = image.convert("RGB")
        if fake.size != (self.width, self.height):
            raise ValueError(
                f"{self.generated / record.png_name} is {fake.size[0]}x{fake.size[1]}, expected "
                f"{self.width}x{self.height}; delete it to regenerate."
            )
        real = load_reference_image(self.reference, record, self.height, self.width)
        return _uint8(fake), _uint8(real), self.clip_preprocess(fake), record.caption


def compute_metrics(
    records: list[CaptionRecord],
    generated: Path,
    reference: Path,
    height: int,
    width: int,
    fid_metric,
    clip: ClipModel,
    device: str | torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, float]:
    """One pass over the images: FID (generated vs the selected COCO images) and CLIP-T (generated vs captions).

    In a distributed run each process passes its share of ``records``; both metrics sum their
    statistics over the processes when they compute, so every process gets the values of all images.
    """
    fid_metric = fid_metric.to(device)
    clip_t = ClipTScore(clip, device)
    loader = DataLoader(
        _MetricImages(records, generated, reference, height, width, clip.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    with torch.no_grad():
        for fake, real, pixels, captions in tqdm(loader, desc="metrics", unit="batch", disable=not show_progress):
            fid_metric.update(real.to(device), real=True)
            fid_metric.update(fake.to(device), real=False)
            clip_t.update(pixels, captions)
    return {"fid": float(fid_metric.compute()), "clip_t": clip_t.compute()}


def _generation_settings(
    pipe: DiffusionPipeline, config: EvaluationConfig, model_name: str | None, gspn_weights: str | None
) -> dict[str, Any]:
    """Everything that determines the generated pixels: a resumed run must match it exactly."""
    unet = get_unet(pipe)
    native = native_size(pipe)
    height, width = config.height or native, config.width or native
    if height % 8 or width % 8:
        raise ValueError(f"Height and width must be multiples of 8, got {height}x{width}.")
    gspn = is_converted(unet)
    safety_checker = getattr(pipe, "safety_checker", None) is not None
    if safety_checker:
        logger.warning(
            "The pipeline's safety checker is on: it blacks out flagged images, which shifts FID and CLIP-T. Set "
            "pipe.safety_checker = None (--disable-safety-checker) to turn it off."
        )
    return {
        "model": model_name or pipe.name_or_path or type(pipe).__name__,
        "pipeline": type(pipe).__name__,
        "dtype": str(unet.dtype).removeprefix("torch."),
        "gspn_weights": gspn_weights,
        "original": not gspn,
        "gspn_config": gspn_config_of(unet).to_dict() if gspn else None,
        "captions_file": Path(config.annotation_file).name,
        "seed": config.seed,
        "height": height,
        "width": width,
        "steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "negative_prompt": config.negative_prompt,
        "safety_checker": safety_checker,
    }


def evaluate(
    pipe: DiffusionPipeline | Callable[[], DiffusionPipeline],
    config: EvaluationConfig,
    *,
    model_name: str | None = None,
    gspn_weights: str | None = None,
    fid_feature_extractor: nn.Module | None = None,
    clip: ClipModel | None = None,
    state: PartialState | None = None,
) -> dict[str, Any] | None:
    """Run the COCO FID / CLIP-T protocol and write ``<output_dir>/results.json``; returns the results.

    ``pipe`` is a pipeline or a function that loads one: with a function the inputs and the metric
    weights are checked before the (expensive) load. ``fid_feature_extractor`` and ``clip`` replace
    Inception and the open_clip model (tests, smoke runs). Call it on every process of an ``accelerate
    launch``: generation and metrics are split across them; the main process writes and returns the
    results (the others get ``None``).
    """
    state = state or PartialState()
    started = datetime.now(timezone.utc)
    records = select_captions(config.annotation_file, config.num_captions, config.seed)
    reference = check_reference_images(records, config.image_dir)
    with state.main_process_first():  # one process downloads (when online), the others find the cache
        fid_weights = inception_weights(config.fid_weights) if fid_feature_extractor is None else None
        clip_file = clip_checkpoint(config.clip_model, config.clip_pretrained) if clip is None else None
    if not isinstance(pipe, DiffusionPipeline):
        pipe = pipe()
    settings = _generation_settings(pipe, config, model_name, gspn_weights)
    height, width = settings["height"], settings["width"]
    image_dir = Path(config.output_dir) / IMAGES_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    check_settings(image_dir, settings, write=state.is_main_process)
    if state.is_main_process:
        write_manifest(image_dir, records)

    start = time.perf_counter()
    generated = generate_images(
        pipe,
        records,
        image_dir,
        height=height,
        width=width,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        batch_size=config.batch_size,
        negative_prompt=config.negative_prompt,
        state=state,
    )
    generation_s = time.perf_counter() - start
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    start = time.perf_counter()
    clip_model = clip or load_clip(config.clip_model, config.clip_pretrained, state.device, clip_file)
    fid_metric = build_fid(fid_feature_extractor, fid_weights)
    with state.split_between_processes(records) as share:
        share = list(share)
    values = compute_metrics(
        share,
        image_dir,
        reference,
        height,
        width,
        fid_metric,
        clip_model,
        state.device,
        config.metric_batch_size,
        config.num_workers,
        show_progress=state.is_local_main_process,
    )
    if not state.is_main_process:
        return None
    results = {
        "format": RESULTS_FORMAT,
        "metrics": {
            "fid": {
                "value": values["fid"],
                "model": INCEPTION_NAME if fid_feature_extractor is None else type(fid_feature_extractor).__name__,
                "weights": str(fid_weights) if fid_weights else None,
                "library": "torchmetrics FrechetInceptionDistance",
                "reference": f"the {len(records)} COCO images of the selected captions, center-cropped and "
                f"resized (bicubic) to {width}x{height}",
                "num_real": len(records),
                "num_generated": len(records),
            },
            "clip_t": {
                "value": values["clip_t"],
                "model": f"{clip_model.name}/{clip_model.pretrained}",
                "definition": "100 x mean cosine similarity of open_clip image and caption embeddings",
            },
        },
        "settings": {**asdict(config), **settings, "num_captions": len(records)},
        "run": {
            "num_processes": state.num_processes,
            "device": str(state.device),
            "images_generated_by_main_process": generated,
            "generation_s": round(generation_s, 3),
            "metrics_s": round(time.perf_counter() - start, 3),
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": library_versions(),
    }
    path = write_results(results, config.output_dir)
    logger.info("Wrote %s", path)
    return results
