"""Benchmark the GSPN CUDA kernel at SD-XL shapes (GPU only): time, bandwidth, baselines, tile sweep.

    python benchmarks/bench_cuda_scan.py --out benchmarks/results            # H100/H200/A100: peak from the table
    python benchmarks/bench_cuda_scan.py --peak-gbps 3350 --shapes 640:64x64 # override the peak, pick shapes
    python benchmarks/bench_cuda_scan.py --tiles 0 1 2 4 8 16                # GSPN_DIFFUSERS_CUDA_TILE sweep (forward)

For each shape C:HxW (batch 2, bf16 by default) and each gate width G = C / divisor (``--gate-divisors``, default
G = C and G = C/8) it measures with CUDA events after warm-up (median of ``--repeats``):
- the fused four-direction kernel as the GSPN processor calls it (shared u, per-channel merge, skip, normalised,
  global scan): forward, and forward + backward;
- bandwidth: the bytes the kernel must move (each input read once, each output written once; the byte model is
  written into the JSON) over the time, as a % of the peak HBM bandwidth (``--peak-gbps``, else the table below,
  else the device-to-device copy bandwidth measured at start, which is recorded either way);
- x reference: the PyTorch reference op, skipped where it is predicted to take more than ``--reference-max-s``
  seconds or more than half the free memory (the JSON says which and why);
- x baseline: the paper kernel's strategy, one launch per scan line with the state in global memory (the
  extension's ``baseline_scan``): 4 directions x (scan of lam*x + scan of lam for the normaliser), merge in PyTorch;
- x SDPA: torch's flash attention on the same tokens (B x C/64 heads x H*W x 64), forward; forward + backward too
  up to ``--sdpa-backward-max-tokens`` tokens;
- the CUDA kernels one fused forward launches (torch.profiler).

Writes ``cuda_scan.json`` + ``cuda_scan.png`` (or ``cuda_tiles.json`` with ``--tiles``) under --out. Without a GPU it
exits with a clear message, unless ``--dry-run``: then every step above runs on the CPU (the kernel's host
emulation, wall-clock times, resident memory, the emulation's single scan standing in for the per-line baseline,
which only the CUDA build has) at the ``--shapes`` given, which should be tiny (``scripts/gpu_check.sh --dry-run``).
Timing and memory go through ``gspn_diffusers.benchmarking``, the same code in both runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from gspn_diffusers.benchmarking import Meter, adaptive_ms, device_events_per_call, median_ms, meter_for

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
DEFAULT_SHAPES = ("1280:32x32", "640:64x64", "640:128x128", "320:256x256", "640:1024x512")
DEFAULT_TILE_SHAPES = ("640:64x64", "640:1024x512")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BYTE_MODEL = {
    "forward": "e*B*H*W*(4*C + 12*G) + e*5*C: read x, lam, u (C each) and the 4x3 gate planes (G each), write y; "
    "merge (4, C) and skip (C) once",
    "backward": "e*B*H*W*(7*C + 24*G): read x, lam, u, dy and the gates, write dx, dlam, du and dgates",
    "forward_backward": "forward + backward",
    "e": "bytes per element of the dtype",
}
COPY_BYTES, COPY_BYTES_DRY_RUN = 2**31, 2**24  # the copy that measures the practical memory bandwidth
# Reference cost model for the skip decision: time grows with the elements (B*H*W*C) or the scan steps (H + W),
# whichever more; its fp32 temporaries take about this many bytes per element (expanded gates, weights, states).
REFERENCE_BYTES_PER_ELEMENT = 4 * 48


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


def bytes_moved(batch: int, channels: int, gates: int, height: int, width: int, element: int) -> dict[str, int]:
    """The bytes the fused op must move (see BYTE_MODEL)."""
    tokens = batch * height * width
    forward = element * (tokens * (4 * channels + 12 * gates) + 5 * channels)
    backward = element * tokens * (7 * channels + 24 * gates)
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}


def predict_reference(
    measured: tuple[int, int, float] | None, elements: int, lines: int, free_bytes: int, limit_s: float
) -> tuple[float | None, str | None]:
    """(predicted seconds, reason to skip or None) for the reference at a shape, from the last measured one.

    ``measured`` is (elements, lines, seconds) of the last reference run, None before the first.
    """
    need = elements * REFERENCE_BYTES_PER_ELEMENT
    if need > free_bytes / 2:
        return None, f"needs about {need / 2**30:.0f} GiB of fp32 temporaries, more than half the free memory"
    if measured is None:
        return None, None
    seconds = measured[2] * max(elements / measured[0], lines / measured[1], 1.0)
    if seconds > limit_s:
        return seconds, f"predicted {seconds:.0f} s > {limit_s:.0f} s (scaled from the last measured shape)"
    return seconds, None


def copy_bandwidth_gbps(meter: Meter, size_bytes: int) -> float:
    """Device-to-device copy, bytes read + written per second (the practical peak of this GPU's memory)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=meter.device)
    dst = torch.empty_like(src)
    ms = median_ms(meter, lambda: dst.copy_(src), 3, 10)
    return 2 * size_bytes / ms / 1e6


def make_inputs(meter: Meter, batch: int, channels: int, gates: int, height: int, width: int, dtype: torch.dtype):
    """Random inputs drawn in place in `dtype` (no fp32 temporary: the gates of 1024x512 are 16 GB in bf16)."""
    gen = meter.generator(0)

    def rand(*shape, low=-1.0, high=1.0):
        return torch.empty(*shape, device=meter.device, dtype=dtype).uniform_(low, high, generator=gen)

    x = rand(batch, height, width, channels)
    lam = rand(batch, height, width, channels, low=0.1, high=1.0)
    gate_logits = rand(batch, height, width, 4, 3, gates, low=-2.0, high=2.0)
    u = rand(batch, height, width, channels, low=0.0, high=1.0)
    return x, lam, gate_logits, u, rand(4, channels), rand(channels)


class EmulatedBaseline:
    """The dry run's stand-in for the CUDA build's ``baseline_scan`` (the emulation has none): the emulated kernel's
    single-direction scan, called with the same arguments, so :func:`baseline_fused` runs unchanged."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def baseline_scan(self, x, lam, gate_logits, direction: int, chunk: int) -> torch.Tensor:
        return self.module.scan_forward(x, lam, gate_logits, direction, chunk)[0]


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


def kernel_forward_ms(meter: Meter, inputs, args) -> float:
    """Median ms of the fused kernel's forward on `inputs` (no autograd graph)."""
    from gspn_diffusers.ops.cuda import kernel_scan_fused

    with torch.no_grad():
        return adaptive_ms(meter, lambda: kernel_scan_fused(*inputs, None, True), args.warmup, args.repeats)


def time_kernel(meter: Meter, inputs, args) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of the fused kernel on `inputs` (made leaves here, no copies)."""
    from gspn_diffusers.ops.cuda import kernel_scan_fused

    leaves = [t.requires_grad_() for t in inputs]
    grad_y = torch.randn_like(inputs[0])

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        kernel_scan_fused(*leaves, None, True).backward(grad_y)

    forward_ms = kernel_forward_ms(meter, leaves, args)
    forward_backward_ms = adaptive_ms(meter, forward_backward, args.warmup, args.repeats)
    for leaf in leaves:
        leaf.grad = None
        leaf.requires_grad_(False)
    return forward_ms, forward_backward_ms


def sdpa_times(meter: Meter, batch: int, channels: int, tokens: int, args) -> dict:
    """Flash attention on the same tokens (head dim 64), forward and, up to a size, forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, channels // 64, tokens, 64, device=meter.device, dtype=torch.bfloat16)
    times = {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            times["sdpa_flash_forward_ms"] = adaptive_ms(
                meter, lambda: F.scaled_dot_product_attention(q, q, q), args.warmup, args.repeats
            )
        if tokens <= args.sdpa_backward_max_tokens:
            leaf = q.detach().requires_grad_()
            grad = torch.randn_like(q)
            times["sdpa_flash_forward_backward_ms"] = adaptive_ms(
                meter,
                lambda: F.scaled_dot_product_attention(leaf, leaf, leaf).backward(grad),
                args.warmup,
                args.repeats,
            )
    return times


def run_shape(meter: Meter, baseline, channels, gates, height, width, dtype, args, state: dict) -> dict:
    from gspn_diffusers.ops import gspn_scan_fused_reference
    from gspn_diffusers.ops.cuda import kernel_scan_fused

    batch = args.batch
    inputs = make_inputs(meter, batch, channels, gates, height, width, dtype)
    x = inputs[0]
    row: dict = {
        "batch": batch,
        "channels": channels,
        "gate_channels": gates,
        "latent": f"{height}x{width}",
        "tokens": height * width,
    }
    sizes = bytes_moved(batch, channels, gates, height, width, x.element_size())
    row.update({f"bytes_{k}": v for k, v in sizes.items()})
    row["kernel_forward_ms"], row["kernel_forward_backward_ms"] = time_kernel(meter, inputs, args)
    with torch.no_grad():
        row["kernels_per_forward_call"] = device_events_per_call(meter, lambda: kernel_scan_fused(*inputs, None, True))
    for mode in ("forward", "forward_backward"):
        gbps = sizes[mode] / row[f"kernel_{mode}_ms"] / 1e6
        row[f"kernel_{mode}_gbps"] = gbps
        row[f"kernel_{mode}_pct_peak"] = 100 * gbps / args.peak
        row[f"kernel_{mode}_pct_copy"] = 100 * gbps / args.copy_gbps

    with torch.no_grad():
        row["baseline_forward_ms"] = adaptive_ms(
            meter, lambda: baseline_fused(baseline, *inputs), 1, max(3, args.repeats // 4)
        )
        elements = x.numel()
        predicted, reason = predict_reference(
            state.get("reference"), elements, height + width, meter.free_bytes(), args.reference_max_s
        )
        if reason is None and args.reference_max_elements is not None and elements > args.reference_max_elements:
            reason = f"{elements} elements > --reference-max-elements {args.reference_max_elements}"
        if reason is None:
            row["reference_forward_ms"] = adaptive_ms(
                meter, lambda: gspn_scan_fused_reference(*inputs, None, True), 1, 3
            )
            state["reference"] = (elements, height + width, row["reference_forward_ms"] / 1e3)
        else:
            row["reference_skipped"] = reason
    key = (batch, channels, height, width)
    if key not in state.setdefault("sdpa", {}):
        state["sdpa"][key] = sdpa_times(meter, batch, channels, height * width, args)
    row.update(state["sdpa"][key])
    row["x_baseline"] = row["baseline_forward_ms"] / row["kernel_forward_ms"]
    row["x_sdpa"] = row["sdpa_flash_forward_ms"] / row["kernel_forward_ms"]
    if "sdpa_flash_forward_backward_ms" in row:
        row["x_sdpa_forward_backward"] = row["sdpa_flash_forward_backward_ms"] / row["kernel_forward_backward_ms"]
    if "reference_forward_ms" in row:
        row["x_reference"] = row["reference_forward_ms"] / row["kernel_forward_ms"]
    return row


def forward_at_tile(ext, inputs, tile: int):
    """One call of the extension's fused forward (normalised, global scan) with the tile forced (0: its choice)."""
    return lambda: ext.fused_forward(*inputs, 0, True, 1e-6, tile)


def tile_sweep(meter: Meter, ext, tiles: list[int], shapes: list[str], dtype: torch.dtype, args, write) -> list[dict]:
    """Fused forward per GSPN_DIFFUSERS_CUDA_TILE value (0 = the kernel's own choice); ``write(rows)`` after each.

    The extension is called directly with the tile (what the op passes from the variable): through the op, a tile
    whose line does not fit in shared memory would run the PyTorch reference and be timed as the kernel.
    """
    rows: list[dict] = []
    for text in shapes:
        channels, height, width = parse_shape(text)
        inputs = make_inputs(meter, args.batch, channels, channels, height, width, dtype)
        sizes = bytes_moved(args.batch, channels, channels, height, width, inputs[0].element_size())
        for tile in tiles:
            row = {"channels": channels, "gate_channels": channels, "latent": f"{height}x{width}", "tile": tile}
            try:
                row["kernel_forward_ms"] = adaptive_ms(
                    meter, forward_at_tile(ext, inputs, tile), args.warmup, args.repeats
                )
                row["kernel_forward_pct_peak"] = 100 * sizes["forward"] / row["kernel_forward_ms"] / 1e6 / args.peak
            except RuntimeError as error:
                row["error"] = str(error).splitlines()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows)
        inputs = None  # free this shape's inputs before the next
        meter.empty_cache()
    return rows


def plot(rows: list[dict], title: str, path: Path) -> bool:
    """Draw the PNG; False where matplotlib is not installed (the JSON has everything)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"C={r['channels']} G={r['gate_channels']}\n{r['latent']}" for r in rows]
    series = [
        ("GSPN kernel fwd", "kernel_forward_ms"),
        ("GSPN kernel fwd+bwd", "kernel_forward_backward_ms"),
        ("baseline (per-line launches)", "baseline_forward_ms"),
        ("PyTorch reference", "reference_forward_ms"),
        ("SDPA flash fwd", "sdpa_flash_forward_ms"),
    ]
    fig, (ax_time, ax_bw) = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(rows)), 8))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + i * width for j, r in enumerate(rows) if key in r]
        ax_time.bar(xs, [r[key] for r in rows if key in r], width, label=name)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("median ms per call")
    ax_time.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    ax_time.legend(fontsize=8)
    ax_bw.bar([j - 0.2 for j in range(len(rows))], [r["kernel_forward_pct_peak"] for r in rows], 0.4, label="fwd")
    ax_bw.bar(
        [j + 0.2 for j in range(len(rows))],
        [r["kernel_forward_backward_pct_peak"] for r in rows],
        0.4,
        label="fwd+bwd",
    )
    ax_bw.axhline(80, color="k", linestyle="--", label="80% target")
    ax_bw.set_xticks(range(len(rows)), labels, fontsize=7)
    ax_bw.set_ylabel("% of peak HBM bandwidth (bytes it must move)")
    ax_bw.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def load_kernel(dry_run: bool) -> tuple[ModuleType, ModuleType | EmulatedBaseline]:
    """(the compiled module the op and the tile sweep call, what provides ``baseline_scan``): the CUDA extension for
    both, or in the dry run the host emulation and :class:`EmulatedBaseline`. Exits where it did not build."""
    from gspn_diffusers.ops import extension

    kind = "emulation" if dry_run else "cuda"
    module = extension.load_emulation() if dry_run else extension.load_extension()
    if module is None:
        raise SystemExit(f"The GSPN {kind} extension is not available: {extension.load_error(kind)}")
    return module, (EmulatedBaseline(module) if dry_run else module)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="C:HxW latent shapes")
    parser.add_argument(
        "--gate-divisors", nargs="+", type=int, default=[1, 8], help="rows with G = C / d gate channels, per d"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak HBM bandwidth")
    parser.add_argument(
        "--reference-max-s", type=float, default=20.0, help="skip the PyTorch reference where predicted slower"
    )
    parser.add_argument(
        "--reference-max-elements", type=int, default=None, help="also skip the reference above B*H*W*C elements"
    )
    parser.add_argument(
        "--sdpa-backward-max-tokens", type=int, default=128 * 128, help="time flash attention's backward up to here"
    )
    parser.add_argument(
        "--tiles", nargs="+", type=int, default=None, help="run the GSPN_DIFFUSERS_CUDA_TILE sweep (0 = heuristic)"
    )
    parser.add_argument("--tile-shapes", nargs="+", default=list(DEFAULT_TILE_SHAPES), help="C:HxW for --tiles")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every step on the CPU through the kernel's host emulation (give tiny --shapes); no GPU needed",
    )
    args = parser.parse_args(argv)
    for text in args.shapes:
        channels = parse_shape(text)[0]
        bad = [d for d in args.gate_divisors if d < 1 or channels % d]
        if bad:
            parser.error(f"--gate-divisors {bad} do not divide C={channels} of {text}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "bench_cuda_scan.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine); --dry-run "
            "runs it on the CPU through the kernel's host emulation."
        )
    meter = meter_for(args.dry_run)
    ext, baseline = load_kernel(args.dry_run)
    device = meter.name
    args.copy_gbps = copy_bandwidth_gbps(meter, COPY_BYTES_DRY_RUN if args.dry_run else COPY_BYTES)
    table = peak_bandwidth(device, args.peak_gbps)
    args.peak = table or args.copy_gbps
    meta = {
        "device": device,
        "peak_gbps": args.peak,
        "peak_source": "--peak-gbps" if args.peak_gbps else ("table" if table else "measured copy"),
        "measured_copy_gbps": args.copy_gbps,
        "dtype": args.dtype,
        "batch": args.batch,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "config": "fused 4 directions, shared u, per-channel merge, skip, normalize=True, global scan",
        "byte_model": BYTE_MODEL,
        "kernel": ext.__name__,
        "baseline": "the emulation's scan_forward (dry run)" if args.dry_run else "the extension's baseline_scan",
    }
    print(f"{device}: peak {args.peak:.0f} GB/s ({meta['peak_source']}), copy {args.copy_gbps:.0f} GB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    if args.tiles is not None:

        def write(rows: list[dict]) -> None:
            (args.out / "cuda_tiles.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

        tile_sweep(meter, ext, args.tiles, args.tile_shapes, dtype, args, write)
        print(f"wrote {args.out / 'cuda_tiles.json'}")
        return
    rows: list[dict] = []
    state: dict = {}
    for text in args.shapes:
        channels, height, width = parse_shape(text)
        for divisor in args.gate_divisors:
            row = run_shape(meter, baseline, channels, channels // divisor, height, width, dtype, args, state)
            rows.append(row)
            meter.empty_cache()  # this shape's inputs are gone: give their memory back before the next
            print(
                f"C={channels:5d} G={row['gate_channels']:5d} {height}x{width:<5d} "
                f"fwd {row['kernel_forward_ms']:9.3f} ms ({row['kernel_forward_gbps']:6.0f} GB/s "
                f"{row['kernel_forward_pct_peak']:5.1f}%) fwd+bwd {row['kernel_forward_backward_ms']:9.3f} ms "
                f"({row['kernel_forward_backward_pct_peak']:5.1f}%) {row['kernels_per_forward_call']} kernels  "
                f"x ref {row.get('x_reference', float('nan')):8.1f}  x baseline {row['x_baseline']:7.1f}  "
                f"x SDPA {row['x_sdpa']:8.2f}",
                flush=True,
            )
            # Partial results survive a timeout of the whole run.
            (args.out / "cuda_scan.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out / 'cuda_scan.json'}")
    if plot(rows, f"GSPN CUDA kernel, {device}, {args.dtype}, batch {args.batch}", args.out / "cuda_scan.png"):
        print(f"wrote {args.out / 'cuda_scan.png'}")


if __name__ == "__main__":
    main()
