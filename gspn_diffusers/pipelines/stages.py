"""The geometry and schedules of DemoFusion-style progressive upscaling, as plain functions.

Kept apart from the pipelines so that they can be tested and reused (the memory estimate plans
the same stages) without a model: stage sizes, the cosine weights of the skip residual and of
dilated sampling, the overlapping local views and the Gaussian filter of the dilated branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def base_multiple(native: int, multiple: int) -> int:
    """The grid of the base size: 64 px for the real models (SD-XL's aspect buckets are multiples of 64), finer for
    tiny test models whose native size is far below 512 (a quarter of the native size, never below the VAE factor).
    """
    return max(multiple, min(64, native // 4 // multiple * multiple))


def base_size(height: int, width: int, native: int, multiple: int) -> tuple[int, int]:
    """The base image ``(height, width)``: about the trained pixel count (``native ** 2``), the target's aspect.

    Models are trained at about ``native ** 2`` pixels on aspect buckets (SD-XL: about 1 MP on multiples of 64;
    SD-1.5: about 512x512), so the base keeps that pixel count for any aspect ratio rather than putting the long
    side at the native size, which gives SD-XL a 0.5 MP base at 2:1 and 1024x144 at 7680x1080. The chosen
    size is the point of the :func:`base_multiple` grid nearest the target's aspect ratio and the native area
    (both in log scale), clipped to the target itself.
    """
    grid = base_multiple(native, multiple)
    area, aspect = float(native * native), width / height
    best, best_score = (grid, grid), math.inf
    for base_h in range(grid, 4 * native + 1, grid):
        base_w = max(grid, round(base_h * aspect / grid) * grid)
        score = abs(math.log(base_w / base_h / aspect)) + abs(math.log(base_w * base_h / area))
        if score < best_score - 1e-12:
            best, best_score = (base_h, base_w), score
    return min(best[0], height), min(best[1], width)


def plan_stage_sizes(height: int, width: int, native: int, multiple: int) -> list[tuple[int, int]]:
    """Pixel sizes ``(height, width)`` of the base image and of every upscaling stage, the last one the target.

    The base is :func:`base_size`. The number of stages is the smallest that keeps every step at most 2x
    on both axes, and the stages grow by the same factor each time (per axis); intermediate sizes are
    rounded up to ``multiple`` (the VAE's latent factor), which keeps every step within 2x, and the
    target itself is kept exactly.
    """
    if max(height, width) < native:
        raise ValueError(
            f"The target {width}x{height} is smaller than the model's native size {native}: its long side must be at "
            "least the native size. Use the plain pipeline for images at or below the native size."
        )
    base_h, base_w = base_size(height, width, native, multiple)
    ratio_h, ratio_w = height / base_h, width / base_w
    num_stages = max(0, math.ceil(math.log2(max(ratio_h, ratio_w)) - 1e-9))
    sizes = [(base_h, base_w)]
    for k in range(1, num_stages):
        step = k / num_stages
        sizes.append((_round_up(base_h * ratio_h**step, multiple), _round_up(base_w * ratio_w**step, multiple)))
    if num_stages:
        sizes.append((height, width))
    return sizes


def _round_up(size: float, multiple: int) -> int:
    return math.ceil(size / multiple - 1e-9) * multiple


def kept_steps(num_inference_steps: int, strength: float) -> int:
    """Steps a stage denoises: Diffusers' ``int(steps * strength)`` (robust to ``1 - 0.8 = 0.19999...``), never 0.

    Flooring keeps a stage equal to Diffusers' img2img at the same strength; a product below 1 still keeps
    one step, because a stage with no step would only add noise to the upsampled latent.
    """
    return max(1, min(int(num_inference_steps * strength + 1e-6), num_inference_steps))


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


# How a stage runs its local branch: "whole" is the UNet on the whole latent (GSPN's point: linear in tokens,
# no patches), "windows" DemoFusion's overlapping native windows; "auto" decides per stage by memory.
LOCAL_MODES = ("auto", "whole", "windows")
GIB = 2**30


def choose_local_denoising(
    requested: str, gspn: bool, whole_bytes: Callable[[], int], budget: float | None
) -> tuple[str, str]:
    """The local denoising of one stage and the reason, for the log.

    ``"auto"`` runs the whole latent when GSPN replaces the attention and ``whole_bytes()`` (the
    stage's estimated peak with the whole latent, evaluated only when needed) fits ``budget`` bytes
    (``None``: no limit, as on a CPU); windows for the original attention, quadratic in tokens, and
    when the whole latent does not fit.
    """
    if requested != "auto":
        return requested, "requested"
    if not gspn:
        return "windows", "the original attention is quadratic in tokens"
    if budget is None:
        return "whole", "GSPN, no memory limit"
    need = whole_bytes()
    if need <= budget:
        return "whole", f"GSPN, the whole latent needs about {format_bytes(need)} of {format_bytes(budget)} available"
    return "windows", f"the whole latent needs about {format_bytes(need)}, more than {format_bytes(budget)} available"


def format_bytes(size: float) -> str:
    """``12.3 GiB`` or ``45.6 MiB``: readable in a log line at any scale."""
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"


def match_statistics(latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``latents`` shifted and scaled, image by image, to the mean and std of ``reference`` (over channels and pixels).

    DemoFusion's anchor: each stage's result gets the base latent's statistics, which keeps the colours
    and contrast of the base through the stages; it also renormalises the blurred copy of the dilated branch.
    """
    dims = tuple(range(1, latents.dim()))
    mean, std = latents.mean(dims, keepdim=True), latents.std(dims, keepdim=True)
    return (latents - mean) / std * reference.std(dims, keepdim=True) + reference.mean(dims, keepdim=True)
