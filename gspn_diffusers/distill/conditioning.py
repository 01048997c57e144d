"""Turn a data batch into UNet inputs, one code path for SD-1.5 and SD-XL.

They differ only in the text conditioning: SD-1.5 has one text encoder; SD-XL has two, a pooled
embedding and the ``time_ids`` built from the original image size, the crop's top-left corner and
the target size. Prompts go through the pipeline's own ``encode_prompt``, so training sees exactly
the embeddings that inference uses; that includes SD-XL's unconditional input, which is zeros
(``force_zeros_for_empty_prompt``), not the encoding of ``""``.

A batch either holds pixels and captions, or (``--cache_latents``, see :mod:`.cache`) the VAE
posterior and the text embeddings computed once; both end in the same :class:`UNetInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..convert import detect_preset, get_unet
from .losses import diffusion_target


@dataclass
class UNetInputs:
    """A noised batch and everything the UNet call and the loss need besides it."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    unet_kwargs: dict[str, Any]


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    return detect_preset(get_unet(pipe)) == "sdxl"


def zeros_for_empty_prompt(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline's unconditional input is zero embeddings (SD-XL) rather than the encoded ``""``."""
    return is_sdxl(pipe) and bool(pipe.config.get("force_zeros_for_empty_prompt", True))


def sdxl_time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SD-XL's micro-conditioning per sample: (original h, w, crop top, left, target h, w)."""
    target = original_sizes.new_tensor([resolution, resolution]).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crops_top_left, target], dim=1)


@torch.no_grad()
def encode_text(pipe: DiffusionPipeline, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` (and SD-XL's ``pooled``) per caption; an empty caption gives the unconditional input."""
    if not is_sdxl(pipe):
        prompt_embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"prompt_embeds": prompt_embeds}
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    if zeros_for_empty_prompt(pipe):
        empty = torch.tensor([caption == "" for caption in captions], device=prompt_embeds.device)
        prompt_embeds = prompt_embeds.masked_fill(empty[:, None, None], 0.0)
        pooled = pooled.masked_fill(empty[:, None], 0.0)
    return {"prompt_embeds": prompt_embeds, "pooled": pooled}


def unet_conditioning(
    embeddings: dict[str, torch.Tensor],
    original_sizes: torch.Tensor | None = None,
    crops_top_left: torch.Tensor | None = None,
    resolution: int | None = None,
) -> dict[str, Any]:
    """The UNet keyword arguments from :func:`encode_text`'s embeddings (SD-XL: plus the size conditioning)."""
    prompt_embeds = embeddings["prompt_embeds"]
    if "pooled" not in embeddings:
        return {"encoder_hidden_states": prompt_embeds}
    if original_sizes is None or crops_top_left is None or resolution is None:
        raise ValueError("SD-XL conditioning needs the original sizes, crop corners and training resolution.")
    time_ids = sdxl_time_ids(original_sizes, crops_top_left, resolution)
    time_ids = time_ids.to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    return {
        "encoder_hidden_states": prompt_embeds,
        "added_cond_kwargs": {"text_embeds": embeddings["pooled"], "time_ids": time_ids},
    }


def text_conditioning(
    pipe: DiffusionPipeline,
    captions: list[str],
    device: torch.device,
    original_sizes: torch.Tensor | None = None,
    crops_top_left: torch.Tensor | None = None,
    resolution: int | None = None,
) -> dict[str, Any]:
    """``encoder_hidden_states`` (and for SD-XL ``added_cond_kwargs``) for the UNet call."""
    return unet_conditioning(encode_text(pipe, captions, device), original_sizes, crops_top_left, resolution)


@torch.no_grad()
def latent_moments(pipe: DiffusionPipeline, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior (unscaled), what the latent cache stores."""
    vae = pipe.vae
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def sample_latents(
    pipe: DiffusionPipeline, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A scaled latent drawn from the posterior (as ``latent_dist.sample()``), in fp32."""
    draw_on = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=draw_on).to(mean.device)
    return (mean.float() + std.float() * eps) * pipe.vae.config.scaling_factor


def drop_mask(count: int, probability: float) -> torch.Tensor:
    """Which samples get the unconditional input: each independently with ``probability`` (for CFG)."""
    if probability <= 0:
        return torch.zeros(count, dtype=torch.bool)
    return torch.rand(count) < probability


def drop_captions(captions: list[str], probability: float) -> list[str]:
    """Replace each caption by the empty prompt with ``probability``."""
    dropped = drop_mask(len(captions), probability).tolist()
    return ["" if d else caption for caption, d in zip(captions, dropped, strict=True)]


def drop_embeddings(
    embeddings: dict[str, torch.Tensor], unconditional: dict[str, torch.Tensor], probability: float
) -> dict[str, torch.Tensor]:
    """Cached embeddings with each sample replaced by the unconditional ones with ``probability``."""
    dropped = drop_mask(len(embeddings["prompt_embeds"]), probability)
    out = {}
    for key, value in embeddings.items():
        mask = dropped.to(value.device).reshape((-1,) + (1,) * (value.dim() - 1))
        out[key] = torch.where(mask, unconditional[key].to(value), value)
    return out


def sample_timesteps(
    count: int, num_train_timesteps: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Training timesteps, uniform over the scheduler's whole range ``[0, T)``: the student must match the
    teacher at every noise level it samples with, the cleanest (0) and the noisiest (T - 1) included."""
    return torch.randint(0, num_train_timesteps, (count,), generator=generator, device=device)


def prepare_inputs(
    pipe: DiffusionPipeline,
    noise_scheduler: Any,
    batch: dict[str, Any],
    resolution: int,
    dtype: torch.dtype,
    caption_dropout: float = 0.0,
    generator: torch.Generator | None = None,
    unconditional: dict[str, torch.Tensor] | None = None,
) -> UNetInputs:
    """Encode (or read from the cache), noise at uniformly drawn timesteps, and condition one batch.

    ``generator`` fixes the noise and timesteps (tests measure the loss on a fixed batch with it);
    training draws them from the global RNG (seeded per process), which Accelerate saves and
    restores with the state. ``unconditional`` (:func:`encode_text` of ``[""]``) is needed for a
    cached batch, whose captions are already embeddings.
    """
    device = get_unet(pipe).device
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = sample_latents(pipe, mean, std, generator)
        if unconditional is None:
            raise ValueError("A cached batch needs the unconditional embeddings for caption dropout.")
        cached = {k: batch[k].to(device) for k in ("prompt_embeds", "pooled") if k in batch}
        embeddings = drop_embeddings(cached, unconditional, caption_dropout)
    else:
        latents = sample_latents(pipe, *latent_moments(pipe, batch["pixel_values"]), generator)
        embeddings = encode_text(pipe, drop_captions(batch["captions"], caption_dropout), device)
    draw_on = generator.device if generator is not None else device
    noise = torch.randn(latents.shape, generator=generator, device=draw_on).to(device)
    timesteps = sample_timesteps(len(latents), noise_scheduler.config.num_train_timesteps, generator, draw_on)
    timesteps = timesteps.to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    conditioning = unet_conditioning(embeddings, batch["original_sizes"], batch["crops_top_left"], resolution)
    return UNetInputs(noisy_latents.to(dtype), timesteps, target, conditioning)
