"""The geometry and schedules of DemoFusion-style progressive upscaling, as plain functions.

Kept apart from the pipelines so that they can be tested and reused (the memory estimate plans
the same stages) without a model: stage sizes, the cosine weights of the skip residual and of
dilated sampling, the overlapping local views and the Gaussian filter of the dilated branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def plan_stage_sizes(height: int, width: int, native: int, multiple: int) -> list[tuple[int, int]]:
    """Pixel sizes ``(height, width)`` of the base image and of every upscaling stage, the last one the target.

    The base has the target's aspect ratio and its long side at the model's native size (as in
    DemoFusion). The number of stages is the smallest that keeps every step at most 2x, and the
    stages grow by the same factor each time, so for a power-of-two ratio (16384x8192 from SD-XL's
    1024) every stage is exactly 2x. Intermediate sizes are rounded to ``multiple`` (the VAE's
    latent factor); the target itself is kept exactly.
    """
    ratio = max(height, width) / native
    if ratio < 1:
        raise ValueError(
            f"The target {width}x{height} is smaller than the model's native size {native}: its long side must be at "
            "least the base size. Use the plain pipeline for images at or below the native size."
        )
    num_stages = max(0, math.ceil(math.log2(ratio) - 1e-9))
    sizes = []
    for k in range(num_stages + 1):
        scale = ratio ** ((k - num_stages) / num_stages) if num_stages else 1.0
        sizes.append(
            (
                max(multiple, round(height * scale / multiple) * multiple),
                max(multiple, round(width * scale / multiple) * multiple),
            )
        )
    sizes[-1] = (height, width)
    return sizes


def cosine_factor(timestep: float, num_train_timesteps: int) -> float:
    """DemoFusion's ``(1 + cos(pi * (T - t) / T)) / 2``: 1 at pure noise (t = T), 0 at the clean image (t = 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * (num_train_timesteps - float(timestep)) / num_train_timesteps))


def cosine_weight(factor: float, scale: float | None) -> float:
    """``factor ** scale``; ``scale=None`` is the limit ``scale -> inf``, a weight of exactly 0 (the term is off)."""
    return 0.0 if scale is None else factor**scale


def view_starts(size: int, window: int, stride: int) -> list[int]:
    """Starts of ``window``-wide windows along an axis of ``size``, ``stride`` apart, the last flush with the end."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


def get_views(
    height: int,
    width: int,
    window: int,
    stride: int,
    jitter: bool = False,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int, int, int]]:
    """Overlapping latent windows ``(h_start, h_end, w_start, w_end)`` that cover a ``height x width`` latent.

    With ``jitter`` the interior windows move by up to ``(window - stride) // 4`` (DemoFusion's
    jitter range) so that the seams change from step to step; unlike DemoFusion, windows stay
    inside the latent instead of reaching into zero padding, and the border windows stay flush.
    """
    win_h, win_w = min(window, height), min(window, width)
    jitter_range = (window - stride) // 4 if jitter else 0
    views = []
    for h_start in view_starts(height, win_h, stride):
        for w_start in view_starts(width, win_w, stride):
            h = _jittered(h_start, height, win_h, jitter_range, generator)
            w = _jittered(w_start, width, win_w, jitter_range, generator)
            views.append((h, h + win_h, w, w + win_w))
    return views


def _jittered(start: int, size: int, window: int, jitter_range: int, generator: torch.Generator | None) -> int:
    if jitter_range <= 0 or start == 0 or start + window == size:
        return start
    device = generator.device if generator is not None else "cpu"
    offset = int(torch.randint(-jitter_range, jitter_range + 1, (1,), generator=generator, device=device))
    return min(max(start + offset, 0), size - window)


def dilation_factor(height: int, width: int, window: int) -> int:
    """DemoFusion's dilation of the global branch: the sub-latents ``latents[h::d, w::d]`` fit the native window."""
    return max(1, math.ceil(max(height, width) / window - 1e-9))


def gaussian_blur(latents: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of a ``(B, C, H, W)`` tensor with reflect padding; size 1 is the identity."""
    if kernel_size <= 1 or sigma <= 0:
        return latents
    radius = kernel_size // 2
    coords = torch.arange(kernel_size, device=latents.device, dtype=torch.float32) - radius
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(latents.dtype)
    channels = latents.shape[1]
    mode = "reflect" if min(latents.shape[-2:]) > radius else "replicate"
    out = F.pad(latents, (radius, radius, radius, radius), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)


def dilated_views(dilation: int) -> list[tuple[int, int]]:
    """The ``d * d`` phase offsets ``(h, w)`` of the dilated sub-latents ``latents[:, :, h::d, w::d]``."""
    return [(h, w) for h in range(dilation) for w in range(dilation)]


# With the reference GSPN backend, the whole SD-XL latent of 16384x8192 (128x the native latent area)
# needs about 82 GiB of UNet activations (see memory.py); up to 64x (8192x4096: about 20 GiB) it fits.
FULL_LATENT_MAX_AREA_RATIO = 64


def resolve_local_denoising(mode: str, gspn: bool, latent_area: int, native_area: int) -> str:
    """``"auto"``: the whole latent (``"full"``) with GSPN up to 64x the native latent area, else DemoFusion's views.

    The original attention is quadratic in tokens, so it always uses views; GSPN is linear, but its
    activations still grow with the latent, and beyond the limit windows keep the peak constant.
    """
    if mode != "auto":
        return mode
    return "full" if gspn and latent_area <= FULL_LATENT_MAX_AREA_RATIO * native_area else "views"
