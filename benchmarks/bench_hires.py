"""Time and peak GPU memory per high-resolution stage, SD-XL architecture with random weights, GSPN vs original.

    python benchmarks/bench_hires.py --sizes 2048x2048 2048x1024 4096x2048 8192x4096 16384x8192 \
        --attention gspn original --out benchmarks/results

For every size (WxH) and attention it runs ``--steps`` denoising steps of an upscaling stage of
:class:`GSPNDemoFusionSDXLPipeline` (skip residual, local branch, dilated sampling; ``--local-denoising
auto`` as in the pipeline: GSPN on the whole latent where the memory estimate fits the free memory,
DemoFusion's windows where it does not and for the original attention)
and a tiled VAE decode at that size, and records seconds and ``torch.cuda.max_memory_allocated``.
No download is needed: the UNet and VAE are SD-XL's architectures with random weights and the
text conditioning is random (speed and memory do not depend on the weights). Writes
``hires_bench.json`` and ``hires_bench.png``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from gspn_diffusers import convert, is_converted
from gspn_diffusers.pipelines import GSPNDemoFusionSDXLPipeline
from gspn_diffusers.pipelines.budget import gspn_backend_for, memory_budget
from gspn_diffusers.pipelines.chunking import chunk_feed_forward
from gspn_diffusers.pipelines.denoising import StageSettings, TextConditioning
from gspn_diffusers.pipelines.memory import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
from gspn_diffusers.pipelines.stages import LOCAL_MODES

GIB = 2**30


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (height, width)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"size must look like 16384x8192 (WxH), got {text!r}") from error
    return height, width


def random_sdxl_pipeline(attention: str, dtype: torch.dtype) -> GSPNDemoFusionSDXLPipeline:
    """SD-XL's UNet and VAE with random weights on the GPU; no text encoders (the conditioning is given)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG, force_upcast=False).to(dtype)
    if attention == "gspn":
        convert(unet, "sdxl")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = GSPNDemoFusionSDXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(fn) -> tuple[float, float, float]:
    """Seconds, peak GiB allocated while running ``fn()``, and GiB allocated before it (weights, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / GIB, before / GIB


def bench_size(pipe, height: int, width: int, args, local_denoising: str) -> dict:
    dtype = pipe.unet.dtype
    generator = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 4, height // 8, width // 8, device="cuda", dtype=dtype, generator=generator)
    uncond = TextConditioning(
        torch.randn(1, 77, 2048, device="cuda", dtype=dtype), torch.randn(1, 1280, device="cuda", dtype=dtype)
    )
    cond = TextConditioning(torch.randn_like(uncond.embeds), torch.randn_like(uncond.pooled))
    latent_size = (height // 8, width // 8)
    split = latent_size[0] * latent_size[1] > 4 * pipe.window**2
    common = dict(
        stride=pipe.window // 2,
        cosine_scale_1=3.0,
        cosine_scale_2=1.0,
        cosine_scale_3=1.0,
        sigma=0.8,
        forward_chunking=True,
    )
    # The pipeline's own choice of mode and windows per call, for this device's free memory and GSPN backend.
    backend = gspn_backend_for(latents.device) if is_converted(pipe.unet) else "reference"
    budget = memory_budget(latents.device, None)
    local_denoising, reason, views = pipe.plan_stage_memory(
        latent_size, local_denoising, args.view_batch_size, 1 if split else 2, common, budget, backend
    )
    settings = StageSettings(
        guidance_scale=5.0,
        local_denoising=local_denoising,
        view_batch_size=views,
        split_cfg=split,
        final_size=(height, width),
        **common,
    )
    pipe.scheduler.set_timesteps(args.steps * 5, device="cuda")
    timesteps = pipe.scheduler.timesteps[-args.steps :]
    pipe.scheduler.set_begin_index(len(pipe.scheduler.timesteps) - args.steps)
    row = {"width": width, "height": height, "local_denoising": local_denoising, "reason": reason, "split_cfg": split}
    try:
        seconds, peak, before = measure(
            lambda: pipe.denoise_stage(latents, timesteps, uncond, cond, settings, generator, {})
        )
        row.update(denoise_s_per_step=seconds / args.steps, denoise_peak_gib=peak, resident_gib=before)
    except torch.OutOfMemoryError:
        row.update(denoise_error="out of memory")
    finally:
        chunk_feed_forward(pipe.unet, None)
        torch.cuda.empty_cache()
    try:
        seconds, peak, _ = measure(lambda: pipe.decode_latents_tiled(latents, tiled=True))
        row.update(decode_s=seconds, decode_peak_gib=peak)
    except torch.OutOfMemoryError:
        row.update(decode_error="out of memory")
    finally:
        torch.cuda.empty_cache()
    return row


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for attention in sorted({r["attention"] for r in rows}):
        done = [r for r in rows if r["attention"] == attention and "denoise_s_per_step" in r]
        pixels = [r["width"] * r["height"] / 1e6 for r in done]
        ax_time.loglog(pixels, [r["denoise_s_per_step"] for r in done], "o-", label=attention)
        ax_mem.semilogx(pixels, [r["denoise_peak_gib"] for r in done], "o-", label=attention)
    ax_time.set(xlabel="megapixels", ylabel="seconds per denoising step", title="SD-XL stage step time")
    ax_mem.set(xlabel="megapixels", ylabel="peak GiB (denoising)", title="SD-XL stage peak memory")
    ax_mem.axhline(80, color="k", ls="--", lw=0.8)
    ax_time.legend()
    ax_mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[parse_size(s) for s in ("2048x2048", "2048x1024", "4096x2048", "8192x4096", "16384x8192")],
        help="WxH sizes (default: 2048x2048 and the stages of 16384x8192).",
    )
    parser.add_argument("--attention", nargs="+", choices=["gspn", "original"], default=["gspn", "original"])
    parser.add_argument("--local-denoising", choices=LOCAL_MODES, default="auto")
    parser.add_argument("--steps", type=int, default=1, help="Denoising steps timed per size.")
    parser.add_argument("--view-batch-size", type=int, default=None, help="Default: sized by free memory.")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench_hires.py needs a CUDA GPU (none is visible to PyTorch). Without one, estimate the memory with "
            "`python benchmarks/estimate_hires_memory.py`."
        )
    rows = []
    for attention in args.attention:
        pipe = random_sdxl_pipeline(attention, getattr(torch, args.dtype))
        warm_up = argparse.Namespace(**{**vars(args), "steps": 1})
        bench_size(pipe, 1024, 1024, warm_up, args.local_denoising)
        for height, width in args.sizes:
            row = {"attention": attention, **bench_size(pipe, height, width, args, args.local_denoising)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del pipe
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "steps_timed": args.steps,
        "machine": platform.node(),
    }
    (args.out / "hires_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if plot(rows, args.out / "hires_bench.png"):
        print(f"wrote {args.out / 'hires_bench.png'}")
    print(f"wrote {args.out / 'hires_bench.json'}")


if __name__ == "__main__":
    main()
