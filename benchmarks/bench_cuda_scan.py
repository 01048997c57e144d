"""Benchmark the GSPN CUDA kernel at SD-XL shapes (GPU only): time, bandwidth, baselines.

    python benchmarks/bench_cuda_scan.py --out benchmarks/results            # H100/H200/A100: peak from the table
    python benchmarks/bench_cuda_scan.py --peak-gbps 3350 --shapes 640:64x64 # override the peak, pick shapes

For each shape (batch B, channels C, latent HxW; bf16 by default) it measures, with CUDA events after warm-up
(median of --repeats):
- the fused four-direction kernel as the GSPN processor calls it (shared u, per-channel merge, skip,
  normalised, global scan, G = C gate channels): forward, and forward + backward;
- its achieved bandwidth: the bytes that must be read and written (each input once, each output once)
  divided by the time, and that as a % of the device's peak HBM bandwidth;
- (a) the PyTorch reference op (skipped above --reference-max-elements: it materialises large temporaries);
- (b) BASELINE: the paper kernel's strategy, one launch per scan line with the state in global memory
  (csrc/gspn_baseline.cu), 4 directions x (scan of lam*x + scan of lam for the normaliser) + the merge in PyTorch;
- (c) torch scaled_dot_product_attention with the flash backend on the same tokens (B, C/64 heads, H*W, 64).
It also counts the CUDA kernels launched by one fused forward call (torch.profiler).

Writes ``cuda_scan.json`` and ``cuda_scan.png`` under --out. Fails with a clear message without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

# Peak HBM bandwidth in GB/s by a substring of torch.cuda.get_device_name(); the first match wins.
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (reported as "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB SXM4 / PCIe
    ("L40S", 864.0),
    ("RTX 4090", 1008.0),
)
DEFAULT_SHAPES = ("640:64x64", "640:1024x512", "1280:32x32", "1280:512x256")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        channels, size = text.split(":")
        height, width = size.lower().split("x")
        return int(channels), int(height), int(width)
    except ValueError as error:
        raise SystemExit(f"--shapes entries look like C:HxW (e.g. 640:1024x512); got {text!r}") from error


def peak_bandwidth(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs timed with CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def adaptive_time(fn, warmup: int, repeats: int) -> float:
    """Like cuda_time, but a call slower than a second is repeated only three times (flash attention at 16K)."""
    first = cuda_time(fn, 1, 1)
    if first > 1000.0:
        return statistics.median([first, cuda_time(fn, 0, 1), cuda_time(fn, 0, 1)])
    return cuda_time(fn, warmup, repeats)


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def make_inputs(batch: int, channels: int, height: int, width: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, low=-1.0, high=1.0):
        return (torch.rand(*shape, generator=gen, device="cuda") * (high - low) + low).to(dtype)

    x = rand(batch, height, width, channels)
    lam = rand(batch, height, width, channels, low=0.1, high=1.0)
    gates = rand(batch, height, width, 4, 3, channels, low=-2.0, high=2.0)
    u = rand(batch, height, width, channels, low=0.0, high=1.0)
    merge = rand(4, channels)
    skip = rand(channels)
    return x, lam, gates, u, merge, skip


def bytes_moved(batch: int, channels: int, height: int, width: int, element: int) -> dict[str, int]:
    """What must be read and written, each tensor once (the bandwidth definition of the issue)."""
    plane = batch * height * width * channels * element  # one (B, H, W, C) tensor
    forward = plane * (1 + 1 + 12 + 1) + plane  # read x, lam, gates (4 x 3 x C), u; write y
    backward = plane * (1 + 1 + 12 + 1 + 1) + plane * (1 + 1 + 12 + 1)  # read x, lam, gates, u, dy; write grads
    # What this kernel actually moves in the forward (see csrc/gspn_scan_kernel.cuh): per direction x, lam and its
    # 3 gate planes; u once; the fp32 running sum written, read-modify-written twice, read once; y written once.
    fp32_plane = batch * height * width * channels * 4
    kernel_forward = plane * (4 * (2 + 3) + 1 + 1) + fp32_plane * (1 + 2 + 2 + 1)
    return {"forward": forward, "forward_backward": forward + backward, "kernel_forward_traffic": kernel_forward}


def baseline_fused(ext, x, lam, gates, u, merge, skip):
    """BASELINE (paper strategy): per direction, a line-by-line scan of lam*x and of lam, then the merge in PyTorch."""
    from gspn_diffusers.ops import DIRECTIONS

    ones = torch.ones_like(x)
    out = skip * x
    for d in range(len(DIRECTIONS)):
        g = gates[:, :, :, d]
        h = ext.baseline_scan(x, lam, g, d, 0)
        z = ext.baseline_scan(ones, lam, g, d, 0)
        out = out + merge[d] * u * (h / z.clamp_min(1e-6))
    return out


def run_shape(ext, batch, channels, height, width, dtype, args) -> dict:
    from gspn_diffusers.ops import gspn_scan_fused_reference
    from gspn_diffusers.ops.cuda import kernel_scan_fused

    x, lam, gates, u, merge, skip = make_inputs(batch, channels, height, width, dtype)
    row: dict = {"batch": batch, "channels": channels, "latent": f"{height}x{width}", "tokens": height * width}
    sizes = bytes_moved(batch, channels, height, width, x.element_size())
    row.update({f"bytes_{k}": v for k, v in sizes.items()})

    def forward():
        return kernel_scan_fused(x, lam, gates, u, merge, skip, None, True)

    leaves = [t.detach().clone().requires_grad_() for t in (x, lam, gates, u, merge, skip)]
    grad_y = torch.randn_like(x)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        kernel_scan_fused(*leaves, None, True).backward(grad_y)

    with torch.no_grad():
        row["kernel_forward_ms"] = cuda_time(forward, args.warmup, args.repeats)
        row["kernels_per_forward_call"] = kernels_per_call(forward)
    row["kernel_forward_backward_ms"] = cuda_time(forward_backward, args.warmup, args.repeats)
    row["kernel_forward_gbps"] = sizes["forward"] / row["kernel_forward_ms"] / 1e6
    row["kernel_forward_backward_gbps"] = sizes["forward_backward"] / row["kernel_forward_backward_ms"] / 1e6
    if args.peak is not None:
        row["kernel_forward_pct_peak"] = 100 * row["kernel_forward_gbps"] / args.peak
        row["kernel_forward_backward_pct_peak"] = 100 * row["kernel_forward_backward_gbps"] / args.peak
        row["kernel_forward_traffic_pct_peak"] = (
            100 * sizes["kernel_forward_traffic"] / row["kernel_forward_ms"] / 1e6 / args.peak
        )

    with torch.no_grad():
        row["baseline_forward_ms"] = adaptive_time(
            lambda: baseline_fused(ext, x, lam, gates, u, merge, skip), 1, max(3, args.repeats // 4)
        )
        if x.numel() <= args.reference_max_elements:
            row["reference_forward_ms"] = adaptive_time(
                lambda: gspn_scan_fused_reference(x, lam, gates, u, merge, skip, None, True), 1, 3
            )
        heads = channels // 64
        q = torch.randn(batch, heads, height * width, 64, device="cuda", dtype=torch.bfloat16)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["sdpa_flash_forward_ms"] = adaptive_time(
                lambda: F.scaled_dot_product_attention(q, q, q), args.warmup, args.repeats
            )
    row["speedup_vs_baseline"] = row["baseline_forward_ms"] / row["kernel_forward_ms"]
    row["speedup_vs_flash"] = row["sdpa_flash_forward_ms"] / row["kernel_forward_ms"]
    if "reference_forward_ms" in row:
        row["speedup_vs_reference"] = row["reference_forward_ms"] / row["kernel_forward_ms"]
    return row


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"C={r['channels']}\n{r['latent']}" for r in rows]
    series = [
        ("GSPN kernel fwd", "kernel_forward_ms"),
        ("GSPN kernel fwd+bwd", "kernel_forward_backward_ms"),
        ("baseline (per-line launches)", "baseline_forward_ms"),
        ("PyTorch reference", "reference_forward_ms"),
        ("SDPA flash fwd", "sdpa_flash_forward_ms"),
    ]
    fig, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + i * width for j, r in enumerate(rows) if key in r]
        ax_time.bar(xs, [r[key] for r in rows if key in r], width, label=name)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("median ms per call")
    ax_time.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels)
    ax_time.legend(fontsize=8)
    pct = [r.get("kernel_forward_pct_peak", 0.0) for r in rows]
    ax_bw.bar(range(len(rows)), pct)
    ax_bw.axhline(80, color="k", linestyle="--", label="80% target")
    ax_bw.set_xticks(range(len(rows)), labels)
    ax_bw.set_ylabel("fused forward, % of peak HBM bandwidth")
    ax_bw.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="C:HxW latent shapes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak HBM bandwidth")
    parser.add_argument(
        "--reference-max-elements", type=int, default=2**26, help="skip the PyTorch reference above B*H*W*C"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_scan.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine).")

    from gspn_diffusers.ops import cuda

    ext = cuda.load_extension()
    if ext is None:
        raise SystemExit(f"The GSPN CUDA extension is not available: {cuda.load_error()}")
    device = torch.cuda.get_device_name()
    args.peak = peak_bandwidth(device, args.peak_gbps)
    if args.peak is None:
        print(f"No peak bandwidth known for {device!r}; pass --peak-gbps to get % of peak.")
    rows = []
    for text in args.shapes:
        channels, height, width = parse_shape(text)
        row = run_shape(ext, args.batch, channels, height, width, DTYPES[args.dtype], args)
        rows.append(row)
        print(
            f"C={channels:5d} {height}x{width:<5d} fwd {row['kernel_forward_ms']:9.3f} ms "
            f"({row['kernel_forward_gbps']:7.0f} GB/s, {row.get('kernel_forward_pct_peak', float('nan')):5.1f}% peak, "
            f"{row['kernels_per_forward_call']} kernels)  fwd+bwd {row['kernel_forward_backward_ms']:9.3f} ms  "
            f"baseline x{row['speedup_vs_baseline']:7.1f}  flash x{row['speedup_vs_flash']:8.1f}  "
            f"reference x{row.get('speedup_vs_reference', float('nan')):8.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "peak_gbps": args.peak,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "config": "fused 4 directions, shared u, per-channel merge, skip, normalize=True, global scan, G=C",
    }
    (args.out / "cuda_scan.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, f"GSPN CUDA kernel, {device}, {args.dtype}, batch {args.batch}", args.out / "cuda_scan.png")
    print(f"wrote {args.out / 'cuda_scan.json'} and {args.out / 'cuda_scan.png'}")


if __name__ == "__main__":
    main()
