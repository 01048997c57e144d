"""Turn a data batch into UNet inputs, one code path for SD-1.5 and SD-XL.

They differ only in the text conditioning: SD-1.5 has one text encoder; SD-XL has two, a pooled
embedding and the ``time_ids`` built from the original image size, the crop's top-left corner and
the target size. Prompts go through the pipeline's own ``encode_prompt``, so training sees exactly
the embeddings that inference uses.
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


def sdxl_time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SD-XL's micro-conditioning per sample: (original h, w, crop top, left, target h, w)."""
    target = original_sizes.new_tensor([resolution, resolution]).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crops_top_left, target], dim=1)


@torch.no_grad()
def text_conditioning(
    pipe: DiffusionPipeline,
    captions: list[str],
    device: torch.device,
    original_sizes: torch.Tensor | None = None,
    crops_top_left: torch.Tensor | None = None,
    resolution: int | None = None,
) -> dict[str, Any]:
    """``encoder_hidden_states`` (and for SD-XL ``added_cond_kwargs``) for the UNet call."""
    if not is_sdxl(pipe):
        prompt_embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": prompt_embeds}
    if original_sizes is None or crops_top_left is None or resolution is None:
        raise ValueError("SD-XL conditioning needs the original sizes, crop corners and training resolution.")
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    time_ids = sdxl_time_ids(original_sizes, crops_top_left, resolution).to(device=device, dtype=prompt_embeds.dtype)
    return {"encoder_hidden_states": prompt_embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@torch.no_grad()
def encode_latents(
    pipe: DiffusionPipeline, pixel_values: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    vae = pipe.vae
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.sample(generator=generator) * vae.config.scaling_factor


def drop_captions(captions: list[str], probability: float) -> list[str]:
    """Replace each caption by the empty prompt with ``probability`` (for classifier-free guidance)."""
    if probability <= 0:
        return list(captions)
    keep = torch.rand(len(captions)) >= probability
    return [caption if k else "" for caption, k in zip(captions, keep.tolist(), strict=True)]


def prepare_inputs(
    pipe: DiffusionPipeline,
    noise_scheduler: Any,
    batch: dict[str, Any],
    resolution: int,
    dtype: torch.dtype,
    caption_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> UNetInputs:
    """Encode, noise at uniformly drawn timesteps, and condition one batch.

    ``generator`` fixes the noise and timesteps (tests measure the loss on a fixed batch with it);
    training draws them from the global RNG, which Accelerate saves and restores with the state.
    """
    device = get_unet(pipe).device
    latents = encode_latents(pipe, batch["pixel_values"], generator).float()
    draw_on = generator.device if generator is not None else device
    noise = torch.randn(latents.shape, generator=generator, device=draw_on).to(device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (len(latents),), generator=generator, device=draw_on).to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    captions = drop_captions(batch["captions"], caption_dropout)
    conditioning = text_conditioning(
        pipe, captions, device, batch["original_sizes"], batch["crops_top_left"], resolution
    )
    return UNetInputs(noisy_latents.to(dtype), timesteps, target, conditioning)
