"""FID and CLIP-T evaluation of a (GSPN or original) text-to-image pipeline, with named protocols.

from gspn_diffusers.evaluation import EvaluationConfig, evaluate
config = EvaluationConfig.from_protocol("gspn-paper", None, "coco/val2014", "runs/gspn", captions_file="captions.txt")
results = evaluate(pipe, config)

Names are imported on first use, so that ``gspn-diffusers evaluate --help`` does not load torch and
the metric libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipModel": "clip_t",
    "ClipTScore": "clip_t",
    "clip_checkpoint": "clip_t",
    "load_clip": "clip_t",
    "CaptionRecord": "coco",
    "load_coco_captions": "coco",
    "read_captions_file": "coco",
    "select_captions": "coco",
    "FidBackend": "fid",
    "GaussianStats": "fid",
    "fid_weights": "fid",
    "frechet_distance": "fid",
    "load_fid_backend": "fid",
    "generate_images": "generate",
    "read_manifest": "generate",
    "PROTOCOLS": "protocols",
    "resolve_protocol": "protocols",
    "format_comparison": "report",
    "format_table": "report",
    "load_results": "report",
    "EvaluationConfig": "settings",
    "evaluate": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
