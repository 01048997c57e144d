"""Estimated peak GPU memory per stage of SD-XL high-resolution generation, GSPN vs original attention (no GPU).

    python benchmarks/estimate_hires_memory.py --height 8192 --width 16384 --out benchmarks/results

Traces the real SD-XL UNet and VAE architectures on the ``meta`` device (see
``gspn_diffusers/pipelines/memory.py`` for the method) and writes ``hires_memory_estimate.json``.
It also prints the peak bytes per token and channel of one GSPN layer at the target size (input
excluded, output included) for the PyTorch reference on the whole latent, the CUDA kernel on the
whole latent, and the kernel with line-block inference. Takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gspn_diffusers.pipelines.memory import (
    SCAN_BACKENDS,
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
    parser.add_argument("--cpu-offload", action="store_true", help="Only the running model on the GPU.")
    parser.add_argument(
        "--scan-backend", choices=SCAN_BACKENDS, default="kernel", help="GSPN's scans as the CUDA kernel or reference"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    runs = {
        "gspn_auto": dict(gspn=True, local_denoising="auto"),
        "gspn_full": dict(gspn=True, local_denoising="full"),
        "gspn_views": dict(gspn=True, local_denoising="views"),
        "original_views": dict(gspn=False, local_denoising="views"),
    }
    per_layer = layer_bytes(args.height, args.width)
    print(f"GSPN layer peak, bytes per token-channel at {args.width}x{args.height} (SD-XL bf16, batch 1):")
    for layer, modes in per_layer.items():
        print(f"  {layer}: " + ", ".join(f"{mode} {value:.1f}" for mode, value in modes.items()))
    results = {}
    for name, options in runs.items():
        rows = estimate_hires_memory(
            args.height,
            args.width,
            view_batch_size=args.view_batch_size,
            cpu_offload=args.cpu_offload,
            scan_backend=args.scan_backend,
            **options,
        )
        results[name] = as_dicts(rows)
        print(
            f"\n{name} (SD-XL bf16, {'CPU offload' if args.cpu_offload else 'all models on the GPU'}, "
            f"GSPN scans: {args.scan_backend})"
        )
        print(f"{'stage':>5} {'size':>12} {'UNet input':>14} {'weights':>8} {'UNet act':>9} {'decode':>7} {'peak':>7}")
        for r in rows:
            print(
                f"{r.stage:>5} {r.width:>6}x{r.height:<5} {r.unet_input:>14} {r.weights_gib:>7.1f}G "
                f"{r.unet_activations_gib:>8.1f}G {r.decode_gib:>6.1f}G {r.peak_gib:>6.1f}G"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hires_memory_estimate.json"
    document = {
        "height": args.height,
        "width": args.width,
        "scan_backend": args.scan_backend,
        "gspn_layer_bytes_per_token_channel": per_layer,
        "runs": results,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
