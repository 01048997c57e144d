"""VAE decoding and encoding for the high-resolution pipelines, tiled where the image is large.

Kept apart from the stage logic: the pipelines decode the final image (and every stage's, when asked),
and with ``upsample="pixel"`` decode, resize in pixel space and encode again between stages. Both
directions apply the VAE's latent scaling (and SD-XL-style ``latents_mean``/``latents_std`` when the
config has them) and run an fp16 VAE that asks for it (``force_upcast``) in fp32, as Diffusers does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents


@contextlib.contextmanager
def _vae_ready(vae: AutoencoderKL, tiled: bool) -> Iterator[torch.dtype]:
    """Tiling set to ``tiled`` and an fp16 VAE upcast if its config says so; both undone on exit. Yields its dtype."""
    needs_upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcast:
        vae.to(dtype=torch.float32)
    was_tiling = getattr(vae, "use_tiling", False)
    vae.use_tiling = tiled
    try:
        yield next(iter(vae.post_quant_conv.parameters())).dtype
    finally:
        vae.use_tiling = was_tiling
        if needs_upcast:
            vae.to(dtype=torch.float16)


def _latent_stats(vae: AutoencoderKL, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Scaled latents to ``[-1, 1]`` images; ``tiled`` uses Diffusers' tiled VAE (constant memory in the size)."""
    stats = _latent_stats(vae, latents)
    if stats is not None:
        latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
    else:
        latents = latents / vae.config.scaling_factor
    with _vae_ready(vae, tiled) as dtype:
        return vae.decode(latents.to(dtype), return_dict=False)[0]


def encode_images(vae: AutoencoderKL, images: torch.Tensor, tiled: bool, dtype: torch.dtype) -> torch.Tensor:
    """``[-1, 1]`` images to scaled latents in ``dtype`` (the posterior's mode: upsampling adds no noise)."""
    with _vae_ready(vae, tiled) as vae_dtype:
        latents = retrieve_latents(vae.encode(images.to(vae_dtype)), sample_mode="argmax")
    stats = _latent_stats(vae, latents)
    if stats is not None:
        latents = (latents - stats[0]) * vae.config.scaling_factor / stats[1]
    else:
        latents = latents * vae.config.scaling_factor
    return latents.to(dtype)
