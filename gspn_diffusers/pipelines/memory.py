"""Peak GPU memory per stage of the high-resolution pipeline, planned without a GPU from meta-device traces.

The traces (:mod:`.tracing`) give the peak activations of one UNet or VAE call of the real architectures
(random weights on ``meta``). Here they become a per-stage plan:

- ``"kernel"`` backend (what a CUDA run uses): each UNet call shape is traced at its real size (batch 1,
  scaled by the batch), so GSPN's line-block inference applies where the layers' threshold says it would;
- ``"reference"``: its Python loop over lines makes large traces slow, so the activations are fitted,
  affine in the latent pixels, on two traces at half and full native latent size.

A stage's peak is its largest UNet call (whole latent, a batch of windows, or the dilated sub-latents) for
its CFG batch, plus the stage loop's latent-sized buffers. The VAE decoder is traced once at its tile size
(tiled decoding keeps the tile constant); weights are counted from the parameters.
:func:`estimate_stage_peak` is the API the pipelines use to choose a stage's mode by memory; its UNet model is
built once per (architecture, GSPN config, dtype, backend) and cached.

Not counted: the CUDA context and cuBLAS/cuDNN workspaces (about 0.5-1 GB) and allocator
fragmentation, so a measured peak is expected somewhat above these numbers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..config import GSPNConfig
from ..convert import gspn_config_of
from .budget import SAFETY_MARGIN
from .stages import choose_local_denoising, dilation_factor, plan_stage_sizes, view_starts
from .tracing import (
    GSPN_BACKENDS,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    gspn_layer_bytes_per_token_channel,
    meta_sdxl,
    meta_unet,
    peak_activation_bytes,
    unet_peak,
)

__all__ = [
    "DEVICE_80GB",
    "GSPN_BACKENDS",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "ActivationModel",
    "StageMemory",
    "TracedActivations",
    "as_dicts",
    "estimate_hires_memory",
    "estimate_stage_peak",
    "gspn_layer_bytes_per_token_channel",
    "meta_sdxl",
    "peak_activation_bytes",
    "unet_activation_model",
]

# Parameters of SD-XL's two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers).
SDXL_TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840
# Latent-sized tensors the stage loop keeps alive besides the UNet call (latents, clean, noise,
# scaled input, prediction, local value/count, dilated padded/blurred/value copies).
LATENT_BUFFERS = 10
GIB = 2**30
# "An 80 GB device" (an H100/A100 80GB).
DEVICE_80GB = 80 * 10**9


@dataclass(frozen=True)
class ActivationModel:
    """Peak UNet activation bytes per sample, affine in the latent pixels: ``fixed + per_pixel * h * w``."""

    fixed: float
    per_pixel: float

    def __call__(self, batch: int, height: int, width: int) -> float:
        return batch * (self.fixed + self.per_pixel * height * width)


def unet_activation_model(
    unet_config: dict[str, Any],
    gspn_config: GSPNConfig | None,
    dtype: torch.dtype,
    backend: str = "kernel",
    forward_chunking: bool = True,
) -> ActivationModel | TracedActivations:
    """The UNet's peak activations per call (cached): traced at each size for the kernel, fitted for the reference."""
    if backend not in GSPN_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(GSPN_BACKENDS)}; got {backend!r}.")
    gspn_key = None if gspn_config is None else json.dumps(gspn_config.to_dict(), sort_keys=True)
    config_key = json.dumps(dict(unet_config), sort_keys=True, default=str)
    return _fitted_activation_model(config_key, gspn_key, dtype, backend, forward_chunking)


class TracedActivations:
    """Peak UNet activation bytes per call, traced at the call's real size (cached per size) and scaled by the batch.

    The kernel backend's model: exact at any size, line-block inference included.
    """

    def __init__(self, unet: UNet2DConditionModel, forward_chunking: bool) -> None:
        self.unet = unet
        self.forward_chunking = forward_chunking
        self._per_sample: dict[tuple[int, int], int] = {}

    def __call__(self, batch: int, height: int, width: int) -> float:
        if (height, width) not in self._per_sample:
            self._per_sample[height, width] = unet_peak(self.unet, 1, height, width, self.forward_chunking, "kernel")
        return batch * self._per_sample[height, width]


@functools.lru_cache(maxsize=16)
def _fitted_activation_model(
    config_key: str, gspn_key: str | None, dtype: torch.dtype, backend: str, forward_chunking: bool
) -> ActivationModel | TracedActivations:
    unet_config = json.loads(config_key)
    gspn_config = None if gspn_key is None else GSPNConfig.from_dict(json.loads(gspn_key))
    unet = meta_unet(unet_config, gspn_config, dtype)
    if backend == "kernel":
        return TracedActivations(unet, forward_chunking)
    window = _native_latent(unet_config)
    small, large = max(2, window // 2), window
    peak_small = unet_peak(unet, 1, small, small, forward_chunking, backend)
    peak_large = unet_peak(unet, 1, large, large, forward_chunking, backend)
    per_pixel = (peak_large - peak_small) / (large * large - small * small)
    return ActivationModel(fixed=peak_small - per_pixel * small * small, per_pixel=per_pixel)


def _native_latent(unet_config: dict[str, Any]) -> int:
    size = unet_config["sample_size"]
    return int(size if isinstance(size, int) else max(size))


def estimate_stage_peak(
    unet_config: dict[str, Any],
    latent_height: int,
    latent_width: int,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "kernel",
    mode: str = "whole",
    *,
    gspn_config: GSPNConfig | None = None,
    view_batch_size: int = 16,
    stride: int | None = None,
    cfg_batch: int = 2,
    dilated: bool = True,
    forward_chunking: bool = True,
) -> int:
    """Peak accelerator bytes of one upscaling stage besides the resident weights.

    That is the UNet activations of the stage's largest call (the whole latent, or ``view_batch_size``
    native windows, and the dilated sub-latents when ``dilated``) for ``cfg_batch`` CFG samples per
    latent (2: batched CFG, 1: ``split_cfg``), plus the stage loop's latent-sized buffers. ``backend``
    is the GSPN backend that will run (``"kernel"`` on CUDA with the kernel available, else
    ``"reference"``); ``gspn_config=None`` means the original attention.
    """
    if mode not in ("whole", "windows"):
        raise ValueError(f"mode must be 'whole' or 'windows'; got {mode!r}.")
    activations = unet_activation_model(unet_config, gspn_config, dtype, backend, forward_chunking)
    window = _native_latent(unet_config)
    if mode == "whole":
        peak = activations(cfg_batch, latent_height, latent_width)
    else:
        stride = stride or window // 2
        views = len(view_starts(latent_height, window, stride)) * len(view_starts(latent_width, window, stride))
        batch = cfg_batch * min(view_batch_size, views)
        peak = activations(batch, min(window, latent_height), min(window, latent_width))
    if dilated:
        d = dilation_factor(latent_height, latent_width, window)
        sub = (-(-latent_height // d), -(-latent_width // d))
        peak = max(peak, activations(cfg_batch * min(view_batch_size, d * d), *sub))
    itemsize = torch.empty((), dtype=dtype).element_size()
    channels = unet_config.get("in_channels", 4)
    return int(peak + LATENT_BUFFERS * channels * latent_height * latent_width * itemsize)


@dataclass
class StageMemory:
    """Estimated peak GPU memory of one stage, in GiB, and the local denoising chosen for it."""

    stage: int
    width: int
    height: int
    mode: str
    unet_input: str
    weights_gib: float
    unet_activations_gib: float
    latents_gib: float
    decode_gib: float
    peak_gib: float


def estimate_hires_memory(
    height: int = 8192,
    width: int = 16384,
    gspn: bool = True,
    local_denoising: str = "auto",
    view_batch_size: int = 16,
    split_cfg: bool | None = None,
    forward_chunking: bool = True,
    cpu_offload: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "kernel",
    device_memory: int = DEVICE_80GB,
) -> list[StageMemory]:
    """Peak GPU memory per stage of SD-XL high-resolution generation (defaults: 16384x8192, bf16, GSPN kernel).

    The options mean what they mean in :class:`~.demofusion.GSPNDemoFusionSDXLPipeline`; with
    ``cpu_offload`` only the UNet (or the VAE, while decoding) is on the GPU. ``"auto"`` chooses each
    stage's mode as the pipeline does, for a device of ``device_memory`` bytes with the models loaded.
    The last stage includes the tiled VAE decode of the final image. See the module docstring for the method.
    """
    unet, vae = meta_sdxl(gspn, dtype)
    gspn_config = gspn_config_of(unet) if gspn else None
    itemsize = torch.empty((), dtype=dtype).element_size()
    window = SDXL_UNET_CONFIG["sample_size"]
    native_area = window * window
    unet_bytes = sum(p.numel() for p in unet.parameters()) * itemsize
    vae_bytes = sum(p.numel() for p in vae.parameters()) * itemsize
    text_bytes = SDXL_TEXT_ENCODER_PARAMS * itemsize
    weights = unet_bytes if cpu_offload else unet_bytes + vae_bytes + text_bytes
    decode_weights = vae_bytes if cpu_offload else weights

    tile = vae.config.sample_size // 8
    tile_latent = torch.empty(1, 4, tile, tile, device="meta", dtype=dtype)
    tile_peak = peak_activation_bytes(vae, lambda z: vae.decode(z).sample, tile_latent)

    rows = []
    sizes = plan_stage_sizes(height, width, window * 8, 8)
    for k, (stage_h, stage_w) in enumerate(sizes):
        latent_h, latent_w = stage_h // 8, stage_w // 8
        split = split_cfg if split_cfg is not None else (k > 0 and latent_h * latent_w > 4 * native_area)
        cfg_batch = 1 if split else 2

        def stage_bytes(mode: str, latent_h=latent_h, latent_w=latent_w, cfg_batch=cfg_batch, k=k) -> int:
            return estimate_stage_peak(
                SDXL_UNET_CONFIG,
                latent_h,
                latent_w,
                dtype,
                backend,
                mode,
                gspn_config=gspn_config,
                view_batch_size=view_batch_size,
                cfg_batch=cfg_batch,
                dilated=k > 0,
                forward_chunking=forward_chunking and k > 0,
            )

        if k == 0:
            mode = "whole"  # the base runs the parent pipeline's own loop
        else:
            budget = SAFETY_MARGIN * device_memory - weights
            mode, _ = choose_local_denoising(local_denoising, gspn, lambda: stage_bytes("whole"), budget)
        if mode == "whole":
            unet_input = f"{cfg_batch}x{latent_w}x{latent_h}"
        else:
            unet_input = f"{cfg_batch * view_batch_size}x{window}x{window}"
        latents = LATENT_BUFFERS * 4 * latent_h * latent_w * itemsize
        activations = stage_bytes(mode) - latents
        decode = 0.0
        if k == len(sizes) - 1:
            # Diffusers' tiled decode keeps every decoded tile (overlap 1/4: (4/3)^2 of the image) plus the result.
            image = 3 * stage_h * stage_w * itemsize
            decode = tile_peak + image * (1 + (4 / 3) ** 2)
        peak = max(weights + activations + latents, decode_weights + decode + latents)
        rows.append(
            StageMemory(
                stage=k,
                width=stage_w,
                height=stage_h,
                mode=mode,
                unet_input=unet_input,
                weights_gib=weights / GIB,
                unet_activations_gib=activations / GIB,
                latents_gib=latents / GIB,
                decode_gib=decode / GIB,
                peak_gib=peak / GIB,
            )
        )
    return rows


def as_dicts(rows: list[StageMemory]) -> list[dict]:
    return [asdict(row) for row in rows]
