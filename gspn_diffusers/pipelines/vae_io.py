"""VAE decoding and encoding for the high-resolution pipelines, tiled where the image is large.

Kept apart from the stage logic: the pipelines decode the final image (and every stage's, when asked),
with ``upsample="pixel"`` decode, resize in pixel space and encode again between stages, and with ``image=``
encode the picture to upscale. Both directions apply the VAE's latent scaling (and SD-XL-style
``latents_mean``/``latents_std`` when the config has them) and run an fp16 VAE that asks for it
(``force_upcast``) in fp32, as Diffusers does. Large latents are decoded by Diffusers' tiled VAE or by
DemoFusion's multi-decoder (:func:`decode_latents_multi`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents

from .stages import get_views

logger = logging.getLogger(__name__)


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


def _unscaled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The diffusion model's scaled latents as the VAE's decoder takes them."""
    stats = _latent_stats(vae, latents)
    if stats is not None:
        return latents * stats[1] / vae.config.scaling_factor + stats[0]
    return latents / vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Scaled latents to ``[-1, 1]`` images; ``tiled`` uses Diffusers' tiled VAE (constant memory in the size)."""
    latents = _unscaled(vae, latents)
    with _vae_ready(vae, tiled) as dtype:
        return vae.decode(latents.to(dtype), return_dict=False)[0]


def decode_latents_multi(vae: AutoencoderKL, latents: torch.Tensor, window: int, lowvram: bool) -> torch.Tensor:
    """DemoFusion's multi-decoder: seam-free tiled decoding, in constant memory, of a latent of any size.

    The latent is cut into core tiles of ``window // 4`` latent pixels (stride: the core; ``lowvram``: half of
    it); each core is decoded together with ``3/4 window`` of context on every side (``lowvram``: one core)
    and only the core is kept, so that every kept pixel was decoded far from a tile edge, and overlapping
    cores are averaged. Unlike DemoFusion the context is clipped to the latent instead of zero-padded (the
    decoder sees no invented border). Diffusers' tiled VAE blends the edges of adjacent tiles instead: cheaper,
    but its seams can show on a large image.
    """
    core = max(1, window // 4)
    stride, pad = (max(1, core // 2), core) if lowvram else (core, window // 4 * 3)
    height, width = latents.shape[-2:]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image = torch.zeros(latents.shape[0], 3, height * factor, width * factor, device=latents.device)
    count = torch.zeros(1, 1, height * factor, width * factor, device=latents.device)
    latents = _unscaled(vae, latents)
    with _vae_ready(vae, False) as dtype:
        for h0, h1, w0, w1 in get_views(height, width, core, stride):
            top, left = max(0, h0 - pad), max(0, w0 - pad)
            context = latents[:, :, top : min(height, h1 + pad), left : min(width, w1 + pad)]
            tile = vae.decode(context.to(dtype), return_dict=False)[0]
            rows = slice((h0 - top) * factor, (h1 - top) * factor)
            cols = slice((w0 - left) * factor, (w1 - left) * factor)
            image[:, :, h0 * factor : h1 * factor, w0 * factor : w1 * factor] += tile[:, :, rows, cols].float()
            count[:, :, h0 * factor : h1 * factor, w0 * factor : w1 * factor] += 1
    return image / count


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


@dataclass
class DecodeOptions:
    """How a call decodes: ``tiled_vae`` (Diffusers' tiled VAE; ``None``: above the native latent),
    ``multi_decoder`` (DemoFusion's tiled decode instead, above the native latent) and ``lowvram`` (its smaller
    tiles)."""

    tiled_vae: bool | None = None
    multi_decoder: bool = False
    lowvram: bool = False


class StageDecodingMixin:
    """Decoding, encoding and upsampling of the stages' latents; needs ``self.vae``, ``self.vae_scale_factor``,
    ``self.window`` and ``self.image_processor``."""

    def decode_latents_tiled(self, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
        """VAE decode to ``[-1, 1]`` images; ``tiled`` uses Diffusers' tiled VAE (constant memory in the size)."""
        return decode_latents(self.vae, latents, tiled)

    def decode_stage(self, latents: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
        """A stage's latent to ``[-1, 1]`` images, by the multi-decoder or the (tiled) VAE as ``options`` say."""
        large = max(latents.shape[-2:]) > self.window
        if options.multi_decoder and large:
            return decode_latents_multi(self.vae, latents, self.window, options.lowvram)
        return self.decode_latents_tiled(latents, self._tiled(latents.shape[-2:], options.tiled_vae))

    def _tiled(self, latent_size: tuple[int, int], tiled_vae: bool | None) -> bool:
        return tiled_vae if tiled_vae is not None else max(latent_size) > self.window

    def to_output(self, latents: torch.Tensor, output_type: str, options: DecodeOptions) -> Any:
        """``latents`` as the caller's ``output_type``: the latents themselves, or decoded and post-processed."""
        if output_type == "latent":
            return latents
        return self.image_processor.postprocess(self.decode_stage(latents, options), output_type=output_type)

    def upsample_latents(
        self, latents: torch.Tensor, size: tuple[int, int], upsample: str, options: DecodeOptions
    ) -> torch.Tensor:
        """The previous stage's latent at the next stage's latent ``size``: bicubic in latent space (DemoFusion),
        or in pixel space (``"pixel"``: decode, bicubic resize, encode), which avoids interpolating latents."""
        if upsample == "latent":
            return F.interpolate(latents, size=size, mode="bicubic", align_corners=False)
        factor = self.vae_scale_factor
        image = self.decode_stage(latents, options)
        image = F.interpolate(image.float(), size=(size[0] * factor, size[1] * factor), mode="bicubic")
        return encode_images(self.vae, image.clamp(-1, 1), self._tiled(size, options.tiled_vae), latents.dtype)

    def encode_start_image(
        self,
        image: Any,
        size: tuple[int, int],
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
        options: DecodeOptions,
    ) -> torch.Tensor:
        """``image=`` (PIL, array or tensor, one or one per image) resized to the base stage's pixel ``size`` as
        Diffusers' img2img resizes, and encoded: the latent the first upscaling stage starts from."""
        pixels = self.image_processor.preprocess(image, height=size[0], width=size[1]).to(device)
        if batch % pixels.shape[0]:
            raise ValueError(
                f"image= holds {pixels.shape[0]} images for {batch} outputs (prompts x num_images_per_prompt): give "
                "one image, or one per prompt."
            )
        latents = encode_images(
            self.vae,
            pixels,
            self._tiled((size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor), options.tiled_vae),
            dtype,
        )
        return latents.repeat_interleave(batch // pixels.shape[0], dim=0)


def show_stage_images(images: list[Any], stage: int) -> None:
    """DemoFusion's ``show_image``: display a stage's images in a notebook (IPython), the display library
    DemoFusion's users run it in; elsewhere one log line says how to get them instead (no hard dependency)."""
    try:
        ipython = importlib.import_module("IPython")
    except ImportError:
        ipython = None
    if ipython is None or ipython.get_ipython() is None:
        logger.info("show_image: no notebook to show stage %d in; return_stages=True returns every stage.", stage)
        return
    for image in images:
        ipython.display.display(image)
