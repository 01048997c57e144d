"""Estimated peak GPU memory per stage of SD-XL high-resolution generation, GSPN vs original attention (no GPU).

    python benchmarks/estimate_hires_memory.py --height 8192 --width 16384 --out benchmarks/results

Traces the real SD-XL UNet and VAE architectures on the ``meta`` device (see
``gspn_diffusers/pipelines/memory.py`` for the method) and writes ``hires_memory_estimate.json``.
Takes a minute or two on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gspn_diffusers.pipelines.memory import as_dicts, estimate_hires_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=8192)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--view-batch-size", type=int, default=16)
    parser.add_argument("--cpu-offload", action="store_true", help="Only the running model on the GPU.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    runs = {
        "gspn_auto": dict(gspn=True, local_denoising="auto"),
        "gspn_full": dict(gspn=True, local_denoising="full"),
        "gspn_views": dict(gspn=True, local_denoising="views"),
        "original_views": dict(gspn=False, local_denoising="views"),
    }
    results = {}
    for name, options in runs.items():
        rows = estimate_hires_memory(
            args.height, args.width, view_batch_size=args.view_batch_size, cpu_offload=args.cpu_offload, **options
        )
        results[name] = as_dicts(rows)
        print(f"\n{name} (SD-XL bf16, {'CPU offload' if args.cpu_offload else 'all models on the GPU'})")
        print(f"{'stage':>5} {'size':>12} {'UNet input':>14} {'weights':>8} {'UNet act':>9} {'decode':>7} {'peak':>7}")
        for r in rows:
            print(
                f"{r.stage:>5} {r.width:>6}x{r.height:<5} {r.unet_input:>14} {r.weights_gib:>7.1f}G "
                f"{r.unet_activations_gib:>8.1f}G {r.decode_gib:>6.1f}G {r.peak_gib:>6.1f}G"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hires_memory_estimate.json"
    path.write_text(json.dumps({"height": args.height, "width": args.width, "runs": results}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
