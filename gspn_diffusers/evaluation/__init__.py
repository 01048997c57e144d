"""COCO FID and CLIP-T evaluation of a (GSPN or original) text-to-image pipeline, the GSPN paper's protocol.

from gspn_diffusers.evaluation import EvaluationConfig, evaluate
results = evaluate(pipe, EvaluationConfig("captions_val2014.json", "val2014/", "runs/gspn", num_captions=5000,
                                          height=1024, width=1024))
"""

from __future__ import annotations

from .coco import CaptionRecord, load_coco_captions, select_captions
from .generate import generate_images, read_manifest
from .metrics import ClipModel, ClipTScore, build_fid, clip_checkpoint, inception_weights, load_clip
from .report import format_comparison, format_table, load_results
from .runner import EvaluationConfig, compute_metrics, evaluate

__all__ = [
    "CaptionRecord",
    "ClipModel",
    "ClipTScore",
    "EvaluationConfig",
    "build_fid",
    "clip_checkpoint",
    "compute_metrics",
    "evaluate",
    "format_comparison",
    "format_table",
    "generate_images",
    "inception_weights",
    "load_clip",
    "load_coco_captions",
    "load_results",
    "read_manifest",
    "select_captions",
]
