"""Estimated peak GPU memory per stage of SD-XL high-resolution generation, GSPN vs original attention (no GPU).

    python benchmarks/estimate_hires_memory.py --height 8192 --width 16384 --out benchmarks/results
    python benchmarks/estimate_hires_memory.py --json     # the stages a CUDA run would take, as JSON

Traces the real SD-XL UNet and VAE architectures on the ``meta`` device (see
``gspn_diffusers/pipelines/memory.py`` for the method) for the GSPN backend a CUDA run uses (the
kernel; ``--backend reference`` for the PyTorch ops) and writes ``hires_memory_estimate.json``.
``--json`` prints only the automatic run as a JSON list, one object per stage (``width``, ``height``,
``mode`` = "whole" or "windows", ``peak_gib``, ...), with each mode chosen as the pipeline chooses
it on a device of ``--device-gb`` GB. Without ``--json`` it also prints the peak bytes per token and
channel of one GSPN layer at the target size (input excluded, output included) for the PyTorch
reference on the whole latent, the CUDA kernel on the whole latent, and the kernel with line-block
inference. Takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gspn_diffusers.pipelines.memory import (
    DEVICE_80GB,
    GSPN_BACKENDS,
    as_dicts,
    estimate_hires_memory,
    gspn_layer_bytes_per_token_channel,
    meta_sdxl,
)

# One global layer at the 1280-channel level and one local (chunked) layer at the 640-channel level of SD-XL.
LAYERS = (
    "down_blocks.2.attentions.0.transformer_blocks.0.attn1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
)
LAYER_MODES = {
    "reference, whole": ("reference", False),
    "kernel, whole": ("kernel", False),
    "kernel, line-block": ("kernel", True),
}


def layer_bytes(height: int, width: int) -> dict[str, dict[str, float]]:
    """Bytes per token-channel of a GSPN layer, SD-XL bf16, per layer and scan mode."""
    unet, _ = meta_sdxl(True, torch.bfloat16)
    results = {}
    for layer in LAYERS:
        results[layer] = {
            mode: gspn_layer_bytes_per_token_channel(unet, layer, height // 8, width // 8, line_block, backend)
            for mode, (backend, line_block) in LAYER_MODES.items()
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=8192)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--view-batch-size", type=int, default=16)
    parser.add_argument("--backend", choices=GSPN_BACKENDS, default="kernel", help="GSPN backend to count.")
    parser.add_argument("--device-gb", type=float, default=DEVICE_80GB / 1e9, help="Device memory, GB (10^9).")
    parser.add_argument("--cpu-offload", action="store_true", help="Only the running model on the GPU.")
    parser.add_argument("--json", action="store_true", help="Print the automatic GSPN run as JSON, write nothing.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    common = dict(
        view_batch_size=args.view_batch_size,
        cpu_offload=args.cpu_offload,
        backend=args.backend,
        device_memory=int(args.device_gb * 1e9),
    )
    if args.json:
        rows = estimate_hires_memory(args.height, args.width, gspn=True, local_denoising="auto", **common)
        print(json.dumps(as_dicts(rows), indent=2))
        return
    per_layer = layer_bytes(args.height, args.width)
    print(f"GSPN layer peak, bytes per token-channel at {args.width}x{args.height} (SD-XL bf16, batch 1):")
    for layer, modes in per_layer.items():
        print(f"  {layer}: " + ", ".join(f"{mode} {value:.1f}" for mode, value in modes.items()))
    runs = {
        "gspn_auto": dict(gspn=True, local_denoising="auto"),
        "gspn_whole": dict(gspn=True, local_denoising="whole"),
        "gspn_windows": dict(gspn=True, local_denoising="windows"),
        "original_windows": dict(gspn=False, local_denoising="windows"),
    }
    results = {}
    for name, options in runs.items():
        rows = estimate_hires_memory(args.height, args.width, **common, **options)
        results[name] = as_dicts(rows)
        where = "CPU offload" if args.cpu_offload else "all models on the GPU"
        print(f"\n{name} (SD-XL bf16, GSPN backend {args.backend}, {where})")
        print(f"{'stage':>5} {'size':>12} {'mode':>8} {'UNet input':>14} {'weights':>8} {'UNet act':>9} {'peak':>7}")
        for r in rows:
            print(
                f"{r.stage:>5} {r.width:>6}x{r.height:<5} {r.mode:>8} {r.unet_input:>14} {r.weights_gib:>7.1f}G "
                f"{r.unet_activations_gib:>8.1f}G {r.peak_gib:>6.1f}G"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hires_memory_estimate.json"
    payload = {
        "height": args.height,
        "width": args.width,
        "backend": args.backend,
        "gspn_layer_bytes_per_token_channel": per_layer,
        "runs": results,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
