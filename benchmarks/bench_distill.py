"""Images/s of the distillation training loop on the tiny model, with and without ``--cache_latents``.

    python benchmarks/bench_distill.py --out benchmarks/results            # tiny SD-1.5, CPU or GPU
    python benchmarks/bench_distill.py --kind sdxl --images 64 --steps 32 --repeats 5

Writes a folder of JPEG images with captions (``--image_size`` px, so decoding and resizing cost
what they cost on real data), then runs the trainer (``gspn_diffusers.distill.train.main``) for
``--steps`` optimizer steps, ``--repeats`` times per mode, and reports the median images/s of the
training loop (the trainer's own measure: checkpointing and validation excluded; with the cache,
the run that builds it is not counted; its wall time is ``cache_build_run_wall_s``). Writes ``distill.json``
under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image, ImageDraw

from gspn_diffusers.distill.train import main, parse_args
from gspn_diffusers.tiny import TINY_KINDS


def write_images(root: Path, count: int, size: int) -> Path:
    """``count`` JPEGs (gradients with a shape, 4:3) and same-named .txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size * 4 // 3, size
    y, x = np.mgrid[0:height, 0:width]
    for i in range(count):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 7 * i % 256)], -1).astype(np.uint8)
        image = Image.fromarray(pixels)
        ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=color)
        image.save(root / f"{i:06d}.jpg", quality=90)
        (root / f"{i:06d}.txt").write_text(f"a shape of colour {color} on a gradient, image {i}")
    return root


def run_once(
    args: argparse.Namespace, data: Path, output_dir: Path, cache_dir: Path, cached: bool
) -> tuple[float, float]:
    """(images/s of the loop, wall seconds of the whole run) for one training run."""
    argv = [
        "--tiny", args.kind, "--train_data_dir", str(data), "--output_dir", str(output_dir),
        "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--logging_steps", str(args.steps), "--checkpointing_steps", "1000000",
        "--validation_prompts", "--report_to", "none", "--lr_warmup_steps", "0", "--gate-rank", "2",
        "--cache_dir", str(cache_dir), "--dataloader_num_workers", str(args.workers),
    ]  # fmt: skip
    if cached:
        argv.append("--cache_latents")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    start = time.perf_counter()
    result = main(parse_args(argv))
    return result.images_per_second, time.perf_counter() - start


def main_bench(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=TINY_KINDS, default="sd15")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=384, help="Short side of the written JPEGs.")
    parser.add_argument("--resolution", type=int, default=64, help="Training resolution.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers (0: in the main process; the trainer's own default is min(4, CPUs)).",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict = {"device": device, "torch_threads": torch.get_num_threads(), **vars(args), "out": str(args.out)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_images(root / "data", args.images, args.image_size)
        build_start = time.perf_counter()
        for mode in ("no_cache", "cache"):
            cached = mode == "cache"
            rates = []
            for repeat in range(args.repeats + (1 if cached else 0)):
                rate, wall = run_once(args, data, root / f"{mode}-{repeat}", root / "cache", cached)
                if cached and repeat == 0:  # the run that builds the cache: its loop is timed, its build reported
                    results["cache_build_run_wall_s"] = round(wall, 3)
                    continue
                rates.append(rate)
            results[mode] = {"images_per_second": statistics.median(rates), "repeats": rates}
            print(f"{mode:>9}: {statistics.median(rates):8.2f} images/s (median of {len(rates)}: {rates})")
        results["total_s"] = round(time.perf_counter() - build_start, 1)
    results["speedup"] = results["cache"]["images_per_second"] / results["no_cache"]["images_per_second"]
    print(f"  speedup: {results['speedup']:.2f}x  ({device})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main_bench()
