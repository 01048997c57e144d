"""``gspn-diffusers evaluate``: FID / CLIP-T of a pipeline under a named protocol, or ``--compare`` of two runs."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from .protocols import FID_BACKENDS, FID_RESIZE_FILTERS, PROTOCOLS, REFERENCE_SETS

if TYPE_CHECKING:  # torch, diffusers and the metrics load only when a command runs, not for --help
    from .settings import EvaluationConfig

logger = logging.getLogger(__name__)


# Flags whose default comes from the protocol (or EvaluationConfig): None here means "not given".
_SETTINGS = {
    "num_captions": "num_captions",
    "height": "height",
    "width": "width",
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "clip_model": "clip_model",
    "clip_pretrained": "clip_pretrained",
    "clip_prefix": "clip_prefix",
    "clip_image_size": "clip_image_size",
    "fid_backend": "fid_backend",
    "fid_size": "fid_size",
    "fid_resize": "fid_resize",
    "fid_reference": "fid_reference",
}


def _config(args: argparse.Namespace) -> EvaluationConfig:
    """The run's settings: the protocol's, then the flags given explicitly (recorded as overrides)."""
    from .settings import EvaluationConfig

    explicit = {key: getattr(args, flag) for flag, key in _SETTINGS.items() if getattr(args, flag) is not None}
    return EvaluationConfig.from_protocol(
        args.protocol,
        args.annotations,
        args.coco_images,
        args.output_dir,
        captions_file=args.captions,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        safety_checker=args.safety_checker,
        batch_size=args.batch_size,
        metric_batch_size=args.metric_batch_size,
        num_workers=args.num_workers,
        fid_weights=args.fid_weights,
        fid_cache=args.fid_cache,
        **explicit,
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from ..errors import GSPNUserError
    from .report import format_comparison, format_table, load_results

    if args.compare:
        a, b = (load_results(run) for run in args.compare)
        print(format_comparison(a, b, names=tuple(args.compare)))
        return
    missing = [flag for flag, value in (("--output-dir", args.output_dir),) if value is None]
    if args.annotations is None and args.captions is None:
        missing.append("--annotations (COCO) or --captions FILE")
    if args.model is None and args.tiny is None:
        missing.insert(0, "--model (or --tiny)")
    if missing:
        raise GSPNUserError(f"evaluate needs {', '.join(missing)} (or --compare RUN_A RUN_B to compare two runs).")
    if args.gspn_weights is None and not args.original:
        raise GSPNUserError("Pass --gspn-weights FOLDER to evaluate a GSPN model, or --original for the original one.")
    # (--device was checked by cli.main, as for every subcommand with a --device flag.)
    config = _config(args)
    config.check()
    from ..errors import probe_writable
    from .reference import default_cache_dir

    # Both are written at the end (images and results; the reference statistics): proven writable now.
    probe_writable(args.output_dir, "--output-dir")
    probe_writable(args.fid_cache if args.fid_cache is not None else default_cache_dir(), "--fid-cache")

    from accelerate import PartialState

    from ..loading import check_model_source, load_pipeline
    from ..serialization import check_gspn, load_gspn
    from .runner import evaluate

    # The model's folder (or cached hub name) and the GSPN config and weights header now, not after the metric
    # models (ViT-g-14: minutes) have loaded.
    if args.model is not None:
        check_model_source(args.model)
    weights = check_gspn(args.gspn_weights) if args.gspn_weights is not None else None
    state = PartialState(cpu=args.device == "cpu")

    def load():
        pipe = load_pipeline(args.model, args.tiny, str(state.device), args.dtype)
        return pipe if weights is None else load_gspn(pipe, weights)

    extractor = clip = None
    if args.tiny_metrics:
        from .tiny_metrics import TinyFeatureExtractor, tiny_clip

        logger.warning("--tiny-metrics: random metric models, the numbers are meaningless (smoke test only).")
        extractor, clip = TinyFeatureExtractor(), tiny_clip()
    results = evaluate(
        load,
        config,
        model_name=args.model or f"tiny-{args.tiny}",
        gspn_weights=args.gspn_weights,
        fid_feature_extractor=extractor,
        clip=clip,
        state=state,
    )
    if results is not None:
        print(format_table(results))


def interrupted_message(args: argparse.Namespace, command: str) -> str:
    """After Ctrl-C: how many images are on disk (complete ones: each is written aside and renamed) and the
    command that resumes (the same one: a rerun generates only the missing images)."""
    from pathlib import Path

    images = Path(args.output_dir or ".") / "images"
    saved = sum(not p.name.startswith(".") for p in images.glob("*.png")) if images.is_dir() else 0
    manifest = images / "manifest.jsonl"
    total = f" of {sum(1 for line in manifest.open() if line.strip())}" if manifest.is_file() else ""
    return (
        f"Interrupted: {saved}{total} generated images are saved in {images}; to resume (only the missing ones are "
        f"generated), run the same command again: {command}"
    )


def add_evaluate_parser(subparsers) -> None:
    from ..cli_args import add_model_args, finite_float, seed

    parser = subparsers.add_parser(
        "evaluate",
        help="FID and CLIP-T of a GSPN (or the original) pipeline; run under `accelerate launch` for many GPUs.",
    )
    add_model_args(parser, required=False)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--gspn-weights", default=None, help="GSPN weights folder (from convert or distill).")
    weights.add_argument("--original", action="store_true", help="Evaluate the original attention.")
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=None,
        help="Set every metric choice as a paper did (flags given explicitly override it, recorded).",
    )
    captions = parser.add_mutually_exclusive_group()
    captions.add_argument("--annotations", default=None, help="COCO captions file (captions_val2014.json).")
    captions.add_argument(
        "--captions", default=None, help="Text file, one caption a line (caption i gets seed i), e.g. LinFusion's."
    )
    parser.add_argument(
        "--coco-images", default=None, help="FID reference images: the COCO folder (val2014/) of the annotations."
    )
    parser.add_argument("--output-dir", default=None, help="Run folder: images/ (PNGs + manifest), results.json.")
    parser.add_argument(
        "--num-captions", type=int, default=None, help="Captions to use (default 30000 COCO; all lines of --captions)."
    )
    parser.add_argument("--seed", type=seed, default=0, help="Picks the COCO captions and their seeds (0..2**64-1).")
    parser.add_argument("--height", type=int, default=None, help="Pixels (default: model's native size).")
    parser.add_argument("--width", type=int, default=None, help="Pixels (default: model's native size).")
    parser.add_argument("--steps", type=int, default=None, help="Denoising steps (default 50).")
    parser.add_argument(
        "--guidance-scale", type=finite_float, default=None, help="Classifier-free guidance (default 7.5)."
    )
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--safety-checker", action="store_true", help="Keep SD-1.5's safety checker on (off by default; recorded)."
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Images per pipeline call on each process.")
    parser.add_argument("--metric-batch-size", type=int, default=32, help="Images per metric batch.")
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="Image loading workers for the metrics."
    )
    parser.add_argument("--fid-backend", choices=FID_BACKENDS, default=None, help="FID library (torchmetrics).")
    parser.add_argument("--fid-size", type=int, default=None, help="Square size both image sets are resized to (299).")
    parser.add_argument("--fid-resize", choices=FID_RESIZE_FILTERS, default=None, help="Resize filter (bicubic).")
    parser.add_argument(
        "--fid-reference",
        choices=REFERENCE_SETS,
        default=None,
        help="selected: the COCO images of the captions (default with --annotations); folder: every image in "
        "--coco-images (default with --captions).",
    )
    parser.add_argument("--fid-weights", default=None, help="Inception weights file of the FID backend.")
    parser.add_argument(
        "--fid-cache", default=None, help="Folder of cached reference statistics (~/.cache/gspn_diffusers/...)."
    )
    parser.add_argument("--clip-model", default=None, help="open_clip model name (default ViT-g-14).")
    parser.add_argument(
        "--clip-pretrained", default=None, help="open_clip tag or local weights file (default laion2b_s12b_b42k)."
    )
    parser.add_argument("--clip-prefix", default=None, help="Text put before each caption for CLIP-T (default none).")
    parser.add_argument(
        "--clip-image-size", type=int, default=None, help="Square crop + resize before CLIP (default: image as is)."
    )
    parser.add_argument(
        "--tiny-metrics", action="store_true", help="Random tiny FID/CLIP models: offline smoke test, no real numbers."
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None, help="Print two finished runs side by side."
    )
    parser.set_defaults(func=run_evaluate, interrupted=interrupted_message)
