"""Time the pure-PyTorch reference scan against the latent size, to show it is linear in H*W.

    python benchmarks/bench_reference_scan.py --sizes 32 64 128 --channels 64 --out benchmarks/results

Writes ``reference_scan.json`` (median seconds per call, and seconds per million pixel-channels)
and, where matplotlib is installed, ``reference_scan.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from gspn_diffusers.ops import gspn_scan_fused_reference, gspn_scan_reference


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(sizes: list[int], channels: int, batch: int, repeats: int, device: str) -> list[dict]:
    rows = []
    for size in sizes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, size, size, channels, generator=gen).to(device)
        lam = torch.rand(batch, size, size, channels, generator=gen).to(device)
        gates = torch.randn(batch, size, size, 4, 3, channels, generator=gen).to(device)
        u = torch.rand_like(x)
        merge = torch.full((4, channels), 0.25, device=device)
        with torch.no_grad():
            single_call = partial(gspn_scan_reference, x, lam, gates[:, :, :, 0], "left_to_right")
            fused_call = partial(gspn_scan_fused_reference, x, lam, gates, u, merge, normalize=True)
            single = median_seconds(single_call, repeats)
            fused = median_seconds(fused_call, repeats)
        elements = batch * size * size * channels
        rows.append(
            {
                "latent": f"{size}x{size}",
                "pixels": size * size,
                "channels": channels,
                "batch": batch,
                "single_direction_s": single,
                "fused_4dir_normalized_s": fused,
                "fused_s_per_million_elements": fused / elements * 1e6,
            }
        )
        print(
            f"{size:>4}x{size:<4} C={channels} single {single * 1e3:8.2f} ms   fused(4 dir) {fused * 1e3:8.2f} ms   "
            f"{rows[-1]['fused_s_per_million_elements'] * 1e3:.2f} ms/M elements"
        )
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pixels = [r["pixels"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(pixels, [r["single_direction_s"] for r in rows], "o-", label="one direction")
    ax.loglog(pixels, [r["fused_4dir_normalized_s"] for r in rows], "s-", label="fused, 4 directions")
    ax.loglog(pixels, [rows[0]["fused_4dir_normalized_s"] * p / pixels[0] for p in pixels], "k--", label="linear")
    ax.set_xlabel("latent pixels (H*W)")
    ax.set_ylabel("median seconds per call")
    ax.set_title(f"GSPN reference scan, C={rows[0]['channels']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = run(args.sizes, args.channels, args.batch, args.repeats, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    (args.out / "reference_scan.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if plot(rows, args.out / "reference_scan.png"):
        print(f"wrote {args.out / 'reference_scan.png'}")
    print(f"wrote {args.out / 'reference_scan.json'}")


if __name__ == "__main__":
    main()
