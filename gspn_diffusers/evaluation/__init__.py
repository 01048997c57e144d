"""FID and CLIP-T evaluation of a (GSPN or original) text-to-image pipeline, with named protocols.

from gspn_diffusers.evaluation import EvaluationConfig, evaluate
config = EvaluationConfig.from_protocol("gspn-paper", None, "coco/val2014", "runs/gspn", captions_file="captions.txt")
results = evaluate(pipe, config)
"""

from __future__ import annotations

from .clip_t import ClipModel, ClipTScore, clip_checkpoint, load_clip
from .coco import CaptionRecord, load_coco_captions, read_captions_file, select_captions
from .fid import FidBackend, GaussianStats, fid_weights, frechet_distance, load_fid_backend
from .generate import generate_images, read_manifest
from .protocols import PROTOCOLS, resolve_protocol
from .report import format_comparison, format_table, load_results
from .runner import EvaluationConfig, evaluate

__all__ = [
    "PROTOCOLS",
    "CaptionRecord",
    "ClipModel",
    "ClipTScore",
    "EvaluationConfig",
    "FidBackend",
    "GaussianStats",
    "clip_checkpoint",
    "evaluate",
    "fid_weights",
    "format_comparison",
    "format_table",
    "frechet_distance",
    "generate_images",
    "load_clip",
    "load_coco_captions",
    "load_fid_backend",
    "load_results",
    "read_captions_file",
    "read_manifest",
    "resolve_protocol",
    "select_captions",
]
