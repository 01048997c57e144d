"""Patch parallelism: bytes each process sends per UNet call (GSPN vs softmax attention under DistriFusion), CPU
time per step at N = 1, 2, the time a process waits on communication, and the per-row latent error of stale vs
naive exchange.

    python benchmarks/bench_patch_parallel.py --out benchmarks/results            # ~10 min on 2 busy CPU cores
    python benchmarks/bench_patch_parallel.py --out /tmp/pp --quick               # smaller sizes, fewer steps

Bytes are counted by the communication layer (``gspn_diffusers.parallel.comm``) in real gloo runs of a mid-size
UNet with SD-XL's layout (1/10 of its widths, 2 transformer layers per block) and compared with the layer-shape
model (``gspn_diffusers.parallel.traffic``) on the same UNet, which must agree exactly; the model then gives SD-XL
itself (bf16, CFG batch 2) at 1024x1024, 4096x4096 and 16384x8192 for N = 2, 4, 8, and the peak memory of one
SD-XL GSPN band layer call at 16384x8192 (traced on ``meta``). Writes
``patch_parallel.json``, ``patch_parallel_bytes.png`` and ``patch_parallel_row_error.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MID_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(4, 8, 16),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    norm_num_groups=16,
)
SDXL_SIZES = [(128, 128), (512, 512), (1024, 2048)]  # latents of 1024^2, 4096^2, 16384x8192 (W x H) images
NVLINK_GBPS = {"A100 NVLink 3 (300 GB/s per direction)": 300.0, "H100 NVLink 4 (450 GB/s per direction)": 450.0}


def build_unet(gspn: bool):
    from diffusers import UNet2DConditionModel

    from gspn_diffusers import GSPNConfig, convert

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MID_UNET).eval()
    if gspn:
        convert(unet, GSPNConfig.from_preset("sdxl"))
        torch.manual_seed(1)
        for name, param in unet.named_parameters():
            if ".gspn." in name:
                param.data.normal_(0.0, 0.3).add_(0.5 if "merge" in name else 0.0)
    return unet


def unet_inputs(batch: int, size: tuple[int, int]):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, *size, generator=gen)
    embeds = torch.randn(batch, 77, MID_UNET["cross_attention_dim"], generator=gen)
    added = {"text_embeds": torch.randn(batch, 32, generator=gen), "time_ids": torch.randn(batch, 6, generator=gen)}
    return sample, embeds, added


def denoise(unet, size, steps: int):
    """A DDIM-like loop on the bare UNet: enough to make the stale values one step old, as in a pipeline."""
    sample, embeds, added = unet_inputs(2, size)
    latents = []
    for t in torch.linspace(999, 1, steps).round():
        with torch.no_grad():
            eps = unet(sample, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        sample = sample - 0.1 * eps
        latents.append(sample)
    return sample


def _worker(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    import torch.distributed as dist

    from gspn_diffusers.parallel import parallelize

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    results = []
    for job in jobs:
        unet = build_unet(job["gspn"])
        with parallelize(unet, mode=job["mode"], warmup_steps=job["warmup"]) as ctx:
            latent = denoise(unet, tuple(job["size"]), job["steps"])
        results.append({**job, "latent": latent, "calls": [vars(c) for c in ctx.calls]})
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_parallel(world: int, jobs: list[dict]) -> list[list[dict]]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.start_processes(_worker, args=(world, port, jobs, out), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def model_bytes(unet, size, world, exact, gspn, batch=2, element_size=4, mode="stale") -> list[int]:
    from gspn_diffusers.parallel import downsampling_factor, plan_bands
    from gspn_diffusers.parallel.traffic import call_bytes, layer_inventory

    plan = plan_bands(*size, world, downsampling_factor(unet.config))
    layers = layer_inventory(unet)
    return [
        call_bytes(layers, plan, k, batch, element_size, unet.config.out_channels, gspn=gspn, exact=exact, mode=mode)
        for k in range(world)
    ]


def sdxl_table() -> list[dict]:
    from gspn_diffusers.parallel.traffic import traffic_table
    from gspn_diffusers.pipelines.memory import meta_sdxl

    unet, _ = meta_sdxl(gspn=True, dtype=torch.bfloat16)
    rows = []
    for height, width in SDXL_SIZES:
        for row in traffic_table(unet, height, width, [2, 4, 8], batch=2, element_size=2):
            row["image"] = f"{width * 8}x{height * 8}"
            row["ratio"] = row["attention_bytes"] / row["gspn_bytes"]
            row["ratio_distrifusion_kv"] = row["distrifusion_kv_bytes"] / row["gspn_bytes"]
            row["ratio_attn1_layers_kv"] = 2 * row["attention_attn1_bytes"] / row["gspn_attn1_bytes"]
            row["ratio_attn1_layers_kv_value_lines"] = (
                2 * row["attention_attn1_bytes"] / row["gspn_attn1_value_lines_bytes"]
            )
            row["estimated_nccl_ms"] = {
                name: {"gspn": row["gspn_bytes"] / gbps / 1e6, "attention": row["attention_bytes"] / gbps / 1e6}
                for name, gbps in NVLINK_GBPS.items()
            }
            rows.append(row)
    return rows


SDXL_GSPN_LEVELS = {1: (640, 16), 2: (1280, None)}  # UNet level -> (channels, sdxl preset's chunk size)


def sdxl_band_layer_memory(size: tuple[int, int] = SDXL_SIZES[-1]) -> list[dict]:
    """Peak GiB of one SD-XL GSPN ``attn1`` call on band 1 (bf16, CFG batch 2, the kernel's memory, traced on
    ``meta``): a stale call and a warm-up call, per N and per GSPN level, at the latent ``size``."""
    from gspn_diffusers.parallel import plan_bands
    from gspn_diffusers.pipelines.tracing import gspn_band_layer_peak

    rows = []
    for n in (2, 4, 8):
        plan = plan_bands(*size, n, 4)
        for level, (channels, chunk) in SDXL_GSPN_LEVELS.items():
            geometry = (channels, chunk, plan.level_height(level), plan.level_width(level), plan.rows(1, level))
            rows.append(
                {
                    "image": f"{size[1] * 8}x{size[0] * 8}",
                    "world_size": n,
                    "channels": channels,
                    "band_rows": list(plan.rows(1, level)),
                    "stale_peak_gib": gspn_band_layer_peak(*geometry) / 2**30,
                    "warmup_peak_gib": gspn_band_layer_peak(*geometry, exact=True) / 2**30,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="Smaller latents and fewer steps (a smoke run).")
    args = parser.parse_args()
    from gspn_diffusers.parallel import downsampling_factor, plan_bands

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    size = (32, 32) if args.quick else (48, 48)
    steps, warmup = (5, 2) if args.quick else (8, 3)

    # 1. measured bytes and time per step (N = 2), against the model; N = 1 for the time ratio
    jobs = [
        dict(gspn=gspn, mode=mode, warmup=warmup, size=size, steps=steps)
        for gspn in (True, False)
        for mode in ("stale", "sync", "naive")
    ]
    two = run_parallel(2, jobs)
    one = run_parallel(1, [dict(gspn=True, mode="sync", warmup=0, size=size, steps=steps)])
    reference = {gspn: denoise(build_unet(gspn), size, steps) for gspn in (True, False)}
    measured = []
    for job_index, job in enumerate(jobs):
        unet = build_unet(job["gspn"])
        per_rank = [r[job_index] for r in two]
        stale_calls = [[c for c in r["calls"] if not c["exact"]] for r in per_rank]
        exact_calls = [[c for c in r["calls"] if c["exact"]] for r in per_rank]
        entry = {
            "attention": "gspn" if job["gspn"] else "softmax",
            "mode": job["mode"],
            "latent": list(size),
            "bytes_exact_call": [calls[0]["bytes_sent"] for calls in exact_calls],
            "model_exact_call": model_bytes(unet, size, 2, exact=True, gspn=job["gspn"])
            if job["mode"] != "naive"
            else None,
            "seconds_per_step": sum(c["seconds"] for c in per_rank[0]["calls"]) / len(per_rank[0]["calls"]),
            "wait_seconds_exact_call": sum(c["wait_seconds"] for c in exact_calls[0]) / max(1, len(exact_calls[0])),
            "latent_max_abs_error": (per_rank[0]["latent"] - reference[job["gspn"]]).abs().max().item(),
            "latent_mean_abs_error": (per_rank[0]["latent"] - reference[job["gspn"]]).abs().mean().item(),
        }
        if stale_calls[0]:
            entry["bytes_stale_call"] = [calls[0]["bytes_sent"] for calls in stale_calls]
            entry["model_stale_call"] = model_bytes(unet, size, 2, exact=False, gspn=job["gspn"], mode=job["mode"])
            entry["wait_seconds_stale_call"] = sum(c["wait_seconds"] for c in stale_calls[0]) / len(stale_calls[0])
        if job["mode"] == "naive":  # no call is "exact" in naive mode: one kind of call
            entry["bytes_naive_call"] = entry.pop("bytes_stale_call")
            entry["model_naive_call"] = entry.pop("model_stale_call")
            entry.pop("bytes_exact_call"), entry.pop("model_exact_call")
        measured.append(entry)
        print(json.dumps({k: v for k, v in entry.items()}, default=str))
    single_seconds = sum(c["seconds"] for c in one[0][0]["calls"]) / len(one[0][0]["calls"])

    # 2. per-row error of stale vs naive (GSPN), process 0's latent against the single-process one
    row_error = {}
    for entry, job_index in ((e, i) for i, e in enumerate(measured) if e["attention"] == "gspn"):
        if entry["mode"] in ("stale", "naive"):
            diff = (two[0][job_index]["latent"] - reference[True]).abs().mean(dim=(0, 1))
            row_error[entry["mode"]] = diff

    result = {
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "mid_unet": MID_UNET,
        "steps": steps,
        "warmup_steps": warmup,
        "measured_n2": measured,
        "seconds_per_call_n1_gspn_sync": single_seconds,
        "sdxl_model": sdxl_table(),
        "sdxl_gspn_band_layer_memory": sdxl_band_layer_memory(),
        "band_edges": list(plan_bands(*size, 2, downsampling_factor(MID_UNET)).bounds[1:-1]),
        "notes": "bytes: per process per UNet call (CFG batch 2), as counted by gspn_diffusers.parallel.comm; "
        "SD-XL rows are the traffic model (bf16); estimated_nccl_ms = bytes / link bandwidth, an estimate; "
        "sdxl_gspn_band_layer_memory: one GSPN attn1 call's peak on band 1, traced on meta (kernel memory model).",
    }
    (out / "patch_parallel.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["sdxl_model"], indent=1))
    plot(result, row_error, out)


def plot(result: dict, row_error: dict, out: Path) -> None:
    """Two PNGs drawn with Pillow (a dependency already; matplotlib is not): bytes per call (log scale) per image
    size and N, and the per-pixel latent error of stale vs naive with the band edge marked."""
    import math

    from PIL import Image, ImageDraw

    width, height, left, top, bottom = 760, 420, 70, 30, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    rows = result["sdxl_model"]
    values = [r[key] for r in rows for key in ("gspn_bytes", "distrifusion_kv_bytes")]
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    images = list(dict.fromkeys(r["image"] for r in rows))

    def xy(index: int, value: float) -> tuple[float, float]:
        x = left + (index + 0.5) * (width - left - 20) / len(images)
        y = top + (high - math.log10(value)) / (high - low) * (height - top - bottom)
        return x, y

    for exponent in range(low, high + 1):
        y = xy(0, 10**exponent)[1]
        draw.line([(left, y), (width - 20, y)], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{10**exponent / 1e6:g} MB", fill="black")
    for index, name in enumerate(images):
        draw.text((xy(index, 10**low)[0] - 30, height - bottom + 8), name, fill="black")
    colours = {2: (31, 119, 180), 4: (44, 160, 44), 8: (214, 39, 40)}
    for n, colour in colours.items():
        for key, dashed in (("gspn_bytes", False), ("distrifusion_kv_bytes", True)):
            points = [
                xy(i, r[key])
                for i, name in enumerate(images)
                for r in rows
                if r["image"] == name and r["world_size"] == n
            ]
            for a, b in zip(points[:-1], points[1:], strict=False):
                draw.line([a, b], fill=colour, width=1 if dashed else 3)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.text(
        (left, 8),
        "SD-XL bf16, CFG batch 2: bytes sent per process per UNet call (stale exchange, log scale)",
        fill="black",
    )
    draw.text(
        (left, height - 25),
        "thick: GSPN; thin: softmax attention (DistriFusion, K and V); blue N=2, green N=4, red N=8",
        fill="black",
    )
    image.save(out / "patch_parallel_bytes.png")
    if not row_error:
        return
    scale = 8
    vmax = max(v.max().item() for v in row_error.values())
    panels = []
    for mode, err in row_error.items():
        grey = (err / vmax).clamp(0, 1).mul(255).byte().numpy()
        panel = Image.fromarray(grey, "L").resize((grey.shape[1] * scale, grey.shape[0] * scale), Image.NEAREST)
        panel = panel.convert("RGB")
        draw = ImageDraw.Draw(panel)
        for edge in result["band_edges"]:
            draw.line([(0, edge * scale), (panel.width, edge * scale)], fill=(0, 200, 255), width=1)
        draw.text((4, 4), f"{mode}: |latent - 1 process|", fill=(255, 80, 80))
        panels.append(panel)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 10 * (len(panels) - 1), panels[0].height + 20), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 10
    ImageDraw.Draw(sheet).text((4, panels[0].height + 4), f"white = {vmax:.3g}; band edges in cyan", fill="black")
    sheet.save(out / "patch_parallel_row_error.png")


if __name__ == "__main__":
    main()
