"""``evaluate``: the whole protocol (check the settings, pick captions, load the metric models, generate, score).

Everything that can fail cheaply fails before the pipeline loads: the settings, the captions, the
reference images and the metric weights (loaded and run once on the CPU, kept there during
generation, moved to the device after it).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from torch import nn

from ..convert import get_unet, gspn_config_of, is_converted
from ..loading import native_size
from .clip_t import CLIP_T_DEFINITION, ClipModel, load_clip
from .coco import CaptionRecord, read_captions_file, select_captions
from .fid import FidBackend, custom_fid_backend, frechet_distance, load_fid_backend
from .fingerprint import gspn_weights_sha256
from .generate import check_manifest, check_settings, generate_images, write_manifest
from .reference import default_cache_dir, reference_files, reference_statistics, verify_reference_images
from .report import RESULTS_FORMAT, RESULTS_VERSION, library_versions, write_results
from .scoring import score_generated
from .settings import EvaluationConfig

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
COCO_DEFAULT_CAPTIONS = 30000


def _captions(config: EvaluationConfig) -> list[CaptionRecord]:
    if config.captions_file is not None:
        return read_captions_file(config.captions_file, config.num_captions)
    return select_captions(config.annotation_file, config.num_captions or COCO_DEFAULT_CAPTIONS, config.seed)


@contextlib.contextmanager
def _safety_checker(pipe: DiffusionPipeline, keep: bool) -> Iterator[bool]:
    """Turn the pipeline's safety checker off (unless ``keep``) for the block; yields whether it runs.

    SD-1.5's checker blacks out flagged images, which moves FID and CLIP-T; evaluations are run without it.
    """
    checker = getattr(pipe, "safety_checker", None)
    if checker is None or keep:
        yield checker is not None
        return
    pipe.safety_checker = None
    try:
        yield False
    finally:
        pipe.safety_checker = checker


def _generation_settings(
    pipe: DiffusionPipeline, config: EvaluationConfig, model_name: str | None, safety_checker: bool
) -> dict[str, Any]:
    """Everything that determines the generated pixels: a resumed run must match it exactly.

    The GSPN weights enter by the sha256 of their content, not their path: weights re-distilled
    into the same folder are refused, the same weights under another path are accepted.
    """
    unet = get_unet(pipe)
    native = native_size(pipe)
    height, width = config.height or native, config.width or native
    if height % 8 or width % 8:
        raise ValueError(f"Height and width must be multiples of 8, got {height}x{width}.")
    gspn = is_converted(unet)
    if safety_checker:
        logger.warning("The pipeline's safety checker is on (--safety-checker): flagged images are blacked out.")
    source = config.captions_file if config.captions_file is not None else config.annotation_file
    return {
        "model": model_name or pipe.name_or_path or type(pipe).__name__,
        "pipeline": type(pipe).__name__,
        "dtype": str(unet.dtype).removeprefix("torch."),
        "original": not gspn,
        "gspn_weights_sha256": gspn_weights_sha256(unet),
        "gspn_config": gspn_config_of(unet).to_dict() if gspn else None,
        "captions_file": Path(source).name,
        "seed": config.seed,
        "height": height,
        "width": width,
        "steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "negative_prompt": config.negative_prompt,
        "safety_checker": safety_checker,
    }


def _load_metric_models(
    config: EvaluationConfig, fid_feature_extractor: nn.Module | None, clip: ClipModel | None, state: PartialState
) -> tuple[FidBackend, ClipModel]:
    """The FID backend and the CLIP model, loaded (and checked) on the CPU before any generation."""
    with state.main_process_first():  # one process downloads (when online), the others find the cache
        backend = (
            custom_fid_backend(fid_feature_extractor)
            if fid_feature_extractor is not None
            else load_fid_backend(config.fid_backend, config.fid_weights)
        )
        clip = clip or load_clip(config.clip_model, config.clip_pretrained, "cpu")
    return backend, clip


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
    """Run the FID / CLIP-T protocol and write ``<output_dir>/results.json``; returns the results.

    ``pipe`` is a pipeline or a function that loads one: with a function the settings, inputs and
    metric weights are checked before the (expensive) load. ``gspn_weights`` (where the weights came
    from) is recorded only; resuming compares the weights' content. ``fid_feature_extractor`` and
    ``clip`` replace Inception and the open_clip model (tests, smoke runs). Call it on every process
    of an ``accelerate launch``: generation and metrics are split across them; the main process
    writes and returns the results (the others get ``None``).
    """
    config.check()
    state = state or PartialState()
    started = datetime.now(timezone.utc)
    records = _captions(config)
    references = reference_files(config.fid_reference, config.image_dir, records)
    cache_dir = config.fid_cache if config.fid_cache is not None else default_cache_dir()
    verify_reference_images(references, cache_dir, config.num_workers or None)
    backend, clip_model = _load_metric_models(config, fid_feature_extractor, clip, state)
    if not isinstance(pipe, DiffusionPipeline):
        pipe = pipe()
    image_dir = Path(config.output_dir) / IMAGES_DIR
    start = time.perf_counter()
    with _safety_checker(pipe, config.safety_checker) as checker_on:
        settings = _generation_settings(pipe, config, model_name, checker_on)
        height, width = settings["height"], settings["width"]
        image_dir.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        check_settings(image_dir, settings, write=state.is_main_process)
        check_manifest(image_dir, records)
        state.wait_for_everyone()
        if state.is_main_process:
            write_manifest(image_dir, records)
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
    mu_real, sigma_real, num_real, reference = reference_statistics(
        references,
        backend,
        config.fid_size,
        config.fid_resize,
        cache_dir,
        state,
        config.metric_batch_size,
        config.num_workers,
    )
    with state.split_between_processes(records) as share:
        share = list(share)
    fake, clip_t = score_generated(
        share, image_dir, height, width, backend, clip_model, config, state.device, state.is_local_main_process
    )
    mu_fake, sigma_fake, num_fake = fake.mean_cov()
    fid = frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
    if not state.is_main_process:
        return None
    results = {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_VERSION,
        "protocol": {"name": config.protocol, "overrides": config.protocol_overrides},
        "metrics": {
            "fid": {
                "value": fid,
                "backend": backend.name,
                "model": backend.description,
                "weights": str(backend.weights) if backend.weights else None,
                "preprocessing": f"center square crop, {config.fid_resize} resize to {config.fid_size}x"
                f"{config.fid_size}, then the backend's own",
                "reference": {"set": config.fid_reference, "folder": config.image_dir, **reference},
                "num_real": num_real,
                "num_generated": num_fake,
            },
            "clip_t": {
                "value": clip_t,
                "scale": "cosine",
                "model": f"{clip_model.name}/{clip_model.pretrained}",
                "caption_prefix": config.clip_prefix,
                "image_preprocessing": "as generated"
                if config.clip_image_size is None
                else f"center square crop, {config.fid_resize} resize to {config.clip_image_size}",
                "definition": CLIP_T_DEFINITION,
            },
        },
        "settings": {**asdict(config), **settings, "gspn_weights": gspn_weights, "num_captions": len(records)},
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
