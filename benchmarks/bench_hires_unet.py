"""One SD-XL UNet call per high-resolution stage size: time and peak GPU memory, GSPN whole latent vs original windows.

    python benchmarks/bench_hires_unet.py --out benchmarks/results      # the pipeline's stages up to 16384x8192
    python benchmarks/bench_hires_unet.py --sizes 16384x8192 --attention gspn --budget-s 600

The UNet is SD-XL's architecture with random weights (``UNet2DConditionModel.from_config`` of SD-XL base 1.0's
config, bf16, built on the GPU); speed and memory do not depend on the weights. Per stage size (WxH pixels, latent
1/8) and attention, with one CFG half per call (batch 1, as the pipeline's ``split_cfg`` runs the large stages) and
the pipeline's feed-forward chunking:
- ``gspn``: the converted UNet (default config: line-block inference above 512x512 tokens) on the whole latent,
  one call; ``gspn-whole``: the same with line-block inference off (the whole gate tensor, the fused op);
- ``original``: Diffusers' attention on the whole latent up to the native 128x128 latent; above it DemoFusion's
  windows (128x128, stride 64, ``--view-batch-size`` windows per call): one batched window call is measured and
  ``latent_s`` = that time x the calls needed to cover the latent (every window call has the same shape).
``call_s`` is one UNet call's time (CUDA-synchronised wall clock; median of 3 below a second, else one call after
a warm-up call at the smallest size), ``peak_gib`` is ``torch.cuda.max_memory_allocated`` during it (weights
included, ``activations_gib`` without them). Sizes predicted to overrun ``--budget-s`` (4x the last size's time
per 4x area) or that run out of memory are recorded as skipped with the reason. Writes ``hires_unet.json`` (after
every row) and ``hires_unet.png``. Needs a CUDA GPU; ``estimate_hires_memory.py`` estimates memory without one.

``--dry-run`` (what ``scripts/gpu_check.sh --dry-run`` runs) does all of the above on the CPU with the tiny SD-XL
architecture of ``gspn_diffusers.tiny`` (its native latent is the window), GSPN through the kernel's host emulation,
the wall clock and the process's resident memory (``gspn_diffusers.benchmarking``: the same measuring code as the
GPU run), at the ``--sizes`` given (pick tiny ones, a few past the window, and a small ``--line-block-tokens`` so
line-block inference runs too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from gspn_diffusers.benchmarking import Meter, call_seconds_and_memory, meter_for

# The stages the high-res pipeline plans for SD-XL at 16384x8192 (base near 1 MP, then at most 2x per stage).
DEFAULT_SIZES = ("1408x704", "2608x1304", "4808x2408", "8872x4440", "16384x8192")
WINDOW, STRIDE = 128, 64  # SD-XL's native latent and DemoFusion's default stride (half of it); the UNet's in use
ATTENTIONS = ("gspn", "gspn-whole", "original")


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` in pixels (multiples of 8) -> latent (height, width)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"size must look like 16384x8192 (WxH pixels), got {text!r}") from error
    if width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"size {text} must be a multiple of 8 (the VAE's factor)")
    return height // 8, width // 8


def window_calls(height: int, width: int, view_batch_size: int, window: int = WINDOW, stride: int = STRIDE) -> int:
    """UNet calls DemoFusion's local branch needs to cover a latent once, ``view_batch_size`` windows per call."""
    from gspn_diffusers.pipelines.stages import get_views

    return math.ceil(len(get_views(height, width, window, stride)) / view_batch_size)


def predicted_seconds(last: tuple[int, float] | None, area: int) -> float:
    """A call's time scaled from the last measured (area, seconds): GSPN and the UNet's convolutions are linear."""
    return 0.0 if last is None else last[1] * area / last[0]


def random_sdxl_unet(meter: Meter, dtype: torch.dtype, tiny: bool = False):
    """SD-XL base 1.0's UNet architecture with random weights on the meter's device (``tiny``: the tiny SD-XL
    architecture of ``gspn_diffusers.tiny``, for the dry run)."""
    from diffusers import UNet2DConditionModel

    from gspn_diffusers.pipelines.memory import SDXL_UNET_CONFIG

    config = SDXL_UNET_CONFIG
    if tiny:
        from gspn_diffusers.tiny import tiny_pipeline

        config = tiny_pipeline("sdxl").unet.config
    torch.manual_seed(0)
    with meter.device:  # random init on the GPU: seconds instead of a minute for 2.6 B parameters
        return UNet2DConditionModel.from_config(config).to(dtype).eval()


def unet_call(unet, batch: int, height: int, width: int):
    """A closure running one UNet call at a latent size, with random SD-XL conditioning and the pipeline's chunking.

    The conditioning's sizes come from the UNet's config (SD-XL: 77 x 2048 text tokens, 1280 pooled + 6 time ids).
    """
    from gspn_diffusers.pipelines.chunking import chunk_feed_forward

    config, device = unet.config, unet.device
    dtype, gen = unet.dtype, torch.Generator(device).manual_seed(0)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    sample = torch.randn(batch, config.in_channels, height, width, device=device, dtype=dtype, generator=gen)
    embeds = torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype, generator=gen)
    added = {
        "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype, generator=gen),
        "time_ids": torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch, device=device).to(
            dtype
        ),
    }

    def call():
        chunk_feed_forward(unet, height, width)
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=embeds, added_cond_kwargs=added)

    return call


def timed_row(meter: Meter, unet, batch: int, height: int, width: int, last, deadline: float) -> dict:
    """Measure one call shape, or say why not; ``last`` is the (area, seconds) to predict from."""
    row: dict = {"unet_input": f"{batch}x4x{height}x{width}"}
    predicted = predicted_seconds(last, batch * height * width)
    now = time.monotonic()
    if now >= deadline:
        row["skipped"] = "this attention's share of the time budget is spent"
        return row
    if now + predicted > deadline:
        row["skipped"] = f"predicted {predicted:.1f} s, past the time budget"
        return row
    try:
        call = unet_call(unet, batch, height, width)
        seconds, peak, before = call_seconds_and_memory(meter, call, 3 if predicted < 1.0 else 1)
        row.update(call_s=seconds, peak_gib=peak, activations_gib=peak - before)
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    finally:
        meter.empty_cache()
    return row


def bench_attention(meter: Meter, unet, attention: str, sizes, args, deadline: float, rows: list[dict], write) -> None:
    """Rows for one attention at every size (ascending), after a warm-up call at the smallest shape."""
    warm_h, warm_w = sizes[0]
    unet_call(unet, 1, warm_h, warm_w)()
    last = None
    window_row = None
    for height, width in sizes:
        row = {"attention": attention, "width": width * 8, "height": height * 8, "latent": f"{width}x{height}"}
        if attention != "original" or height * width <= args.window * args.window:
            row.update(mode="whole", calls=1, **timed_row(meter, unet, 1, height, width, last, deadline))
            if "call_s" in row:
                last = (height * width, row["call_s"])
        else:
            if window_row is None:
                window_row = timed_row(meter, unet, args.view_batch_size, args.window, args.window, None, deadline)
            calls = window_calls(height, width, args.view_batch_size, args.window, args.stride)
            row.update(mode="windows", calls=calls, **window_row)
        if "call_s" in row:
            row["latent_s"] = row["call_s"] * row["calls"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write()


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Draw the PNG; False where matplotlib is not installed (the JSON has everything)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for attention in sorted({r["attention"] for r in rows}):
        done = [r for r in rows if r["attention"] == attention and "call_s" in r]
        pixels = [r["width"] * r["height"] / 1e6 for r in done]
        ax_time.loglog(pixels, [r["latent_s"] for r in done], "o-", label=f"{attention}: whole latent once")
        ax_mem.semilogx(pixels, [r["peak_gib"] for r in done], "o-", label=attention)
    ax_time.set(xlabel="megapixels", ylabel="seconds (UNet over the latent once)", title=title)
    ax_mem.set(xlabel="megapixels", ylabel="peak GiB allocated (weights included)", title="peak memory of one call")
    ax_time.legend(fontsize=8)
    ax_mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES])
    parser.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--view-batch-size", type=int, default=16, help="windows per UNet call (original)")
    parser.add_argument("--budget-s", type=float, default=140.0, help="stop measuring after this many seconds")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument(
        "--line-block-tokens",
        type=int,
        default=None,
        help="GSPN config's line_block_tokens for the 'gspn' rows (default: the config's own)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run on the CPU: tiny SD-XL architecture, GSPN through the kernel's host emulation (tiny --sizes)",
    )
    args = parser.parse_args(argv)
    args.sizes = sorted(args.sizes, key=lambda hw: hw[0] * hw[1])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            "bench_hires_unet.py needs a CUDA GPU; `python benchmarks/estimate_hires_memory.py` estimates memory, "
            "--dry-run runs this benchmark on the CPU at tiny sizes."
        )
    if args.dry_run:
        os.environ.setdefault("GSPN_DIFFUSERS_BACKEND", "emulation")  # the kernel's code, not the reference
    from gspn_diffusers import GSPNConfig, convert, restore
    from gspn_diffusers.ops.backend import requested_backend

    meter = meter_for(args.dry_run)
    start = time.monotonic()
    unet = random_sdxl_unet(meter, getattr(torch, args.dtype), tiny=args.dry_run)
    args.window = unet.config.sample_size  # the native latent: DemoFusion's window, stride half of it
    args.stride = args.window // 2
    meta = {
        "device": meter.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "backend": requested_backend(),
        "dtype": args.dtype,
        "unet": f"{'tiny ' if args.dry_run else ''}SD-XL base 1.0 architecture, random weights",
        "batch": 1,
        "window": args.window,
        "stride": args.stride,
        "view_batch_size": args.view_batch_size,
        "build_s": time.monotonic() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def write() -> None:
        (args.out / "hires_unet.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    # Shares of the time budget: the original's rows are one window call, GSPN's grow with the latent.
    weights = {"gspn": 0.45, "gspn-whole": 0.35, "original": 0.2}
    order = [a for a in ATTENTIONS if a in args.attention]
    for i, attention in enumerate(order):
        share = weights[attention] / sum(weights[a] for a in order[i:])
        deadline = time.monotonic() + share * (args.budget_s - (time.monotonic() - start))
        if attention != "original":
            config = GSPNConfig.from_preset("sdxl")
            if attention == "gspn-whole":
                config.line_block_tokens = None
            elif args.line_block_tokens is not None:
                config.line_block_tokens = args.line_block_tokens
            meta[f"{attention}_line_block_tokens"] = config.line_block_tokens
            convert(unet, config)
        bench_attention(meter, unet, attention, args.sizes, args, deadline, rows, write)
        if attention != "original":
            restore(unet)
    write()
    print(f"wrote {args.out / 'hires_unet.json'}")
    title = f"{'tiny ' if args.dry_run else ''}SD-XL UNet, {args.dtype}, batch 1, {meter.name}"
    if plot(rows, args.out / "hires_unet.png", title):
        print(f"wrote {args.out / 'hires_unet.png'}")


if __name__ == "__main__":
    main()
