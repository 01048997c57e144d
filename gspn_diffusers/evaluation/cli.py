"""``gspn-diffusers evaluate``: COCO FID / CLIP-T of a pipeline, or ``--compare`` of two finished runs."""

from __future__ import annotations

import argparse
import logging
import os

from ..loading import load_pipeline
from ..serialization import load_gspn
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from .report import format_comparison, format_table, load_results
from .runner import EvaluationConfig, evaluate

logger = logging.getLogger(__name__)


def run_evaluate(args: argparse.Namespace) -> None:
    if args.compare:
        a, b = (load_results(run) for run in args.compare)
        print(format_comparison(a, b, names=tuple(args.compare)))
        return
    missing = [
        flag
        for flag, value in (
            ("--annotations", args.annotations),
            ("--coco-images", args.coco_images),
            ("--output-dir", args.output_dir),
        )
        if value is None
    ]
    if args.model is None and args.tiny is None:
        missing.insert(0, "--model (or --tiny)")
    if missing:
        raise ValueError(f"evaluate needs {', '.join(missing)} (or --compare RUN_A RUN_B to compare two runs).")
    if args.gspn_weights is None and not args.original:
        raise ValueError("Pass --gspn-weights FOLDER to evaluate a GSPN model, or --original for the original one.")

    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")

    def load():
        pipe = load_pipeline(args.model, args.tiny, str(state.device), args.dtype)
        if args.disable_safety_checker and hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
        return pipe if args.gspn_weights is None else load_gspn(pipe, args.gspn_weights)

    extractor = clip = None
    if args.tiny_metrics:
        from .tiny_metrics import TinyFeatureExtractor, tiny_clip

        logger.warning("--tiny-metrics: random metric models, the numbers are meaningless (smoke test only).")
        extractor, clip = TinyFeatureExtractor(), tiny_clip()
    config = EvaluationConfig(
        annotation_file=args.annotations,
        image_dir=args.coco_images,
        output_dir=args.output_dir,
        num_captions=args.num_captions,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        metric_batch_size=args.metric_batch_size,
        num_workers=args.num_workers,
        fid_weights=args.fid_weights,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
    )
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


def add_evaluate_parser(subparsers) -> None:
    from ..cli_args import add_model_args

    parser = subparsers.add_parser(
        "evaluate",
        help="COCO FID and CLIP-T of a GSPN (or the original) pipeline; run under `accelerate launch` for many GPUs.",
    )
    add_model_args(parser, required=False)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--gspn-weights", default=None, help="GSPN weights folder (from convert or distill).")
    weights.add_argument("--original", action="store_true", help="Evaluate the original attention.")
    parser.add_argument("--annotations", default=None, help="COCO captions file (captions_val2014.json).")
    parser.add_argument("--coco-images", default=None, help="Folder of the annotation file's images (val2014/).")
    parser.add_argument("--output-dir", default=None, help="Run folder: images/ (PNGs + manifest), results.json.")
    parser.add_argument("--num-captions", type=int, default=30000, help="Captions (of distinct images) to use.")
    parser.add_argument("--seed", type=int, default=0, help="Picks the captions and the per-image seeds.")
    parser.add_argument("--height", type=int, default=None, help="Pixels (default: model's native size).")
    parser.add_argument("--width", type=int, default=None, help="Pixels (default: model's native size).")
    parser.add_argument("--steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--disable-safety-checker", action="store_true", help="SD-1.5's checker blacks out flagged images (recorded)."
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Images per pipeline call on each process.")
    parser.add_argument("--metric-batch-size", type=int, default=32, help="Images per metric batch.")
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="Image loading workers for the metrics."
    )
    parser.add_argument("--fid-weights", default=None, help="Inception FID weights file (default: torch hub cache).")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="open_clip model name.")
    parser.add_argument(
        "--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED, help="open_clip pretrained tag or local weights file."
    )
    parser.add_argument(
        "--tiny-metrics", action="store_true", help="Random tiny FID/CLIP models: offline smoke test, no real numbers."
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None, help="Print two finished runs side by side."
    )
    parser.set_defaults(func=run_evaluate)
