"""Peak GPU memory per stage of the high-resolution pipeline, estimated without a GPU.

How: the real SD-XL UNet and VAE architectures (random weights) are built on PyTorch's ``meta``
device, where tensors have shapes but no storage, and one forward pass is traced under a
dispatch mode that adds up the bytes of every live intermediate tensor (freed when the last
reference to its storage dies), which gives the peak of live activations. The original attention
is counted as a fused SDPA kernel (flash / memory-efficient: only its output), which is what
PyTorch runs on a GPU for fp16/bf16. GSPN is counted for the backend that runs it:

- ``"kernel"`` (what a CUDA run uses): the scans as the CUDA kernel allocates them (their outputs
  only, no fp32 copies of the gates). Each UNet call shape is traced at its real size (batch 1,
  scaled by the batch), so GSPN's line-block inference applies where the processors' threshold
  says it would;
- ``"reference"``: the PyTorch reference's fp32 temporaries. Its Python loop over lines makes
  large traces slow, so the activations are fitted, affine in the latent pixels, on two traces at
  half and full native latent size.

The VAE decoder is traced once at its tile size (tiled decoding keeps the tile constant); weights
are counted from the parameters. :func:`estimate_stage_peak` is the API the pipelines use to choose
a stage's mode by memory; its UNet model is built once per (architecture, GSPN config, dtype,
backend) and cached.

Not counted: the CUDA context and cuBLAS/cuDNN workspaces (about 0.5-1 GB) and allocator
fragmentation, so a measured peak is expected somewhat above these numbers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import GSPNConfig
from ..convert import convert, gspn_config_of
from ..ops import backend as ops_backend
from .budget import SAFETY_MARGIN
from .chunking import _block_level, _level_size, chunk_feed_forward
from .stages import choose_local_denoising, dilation_factor, plan_stage_sizes, view_starts

# SD-XL base 1.0's UNet and VAE configurations (stabilityai/stable-diffusion-xl-base-1.0), for random-weight models.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
# Parameters of SD-XL's two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers).
SDXL_TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840
# Latent-sized tensors the stage loop keeps alive besides the UNet call (latents, clean, noise,
# scaled input, prediction, local value/count, dilated padded/blurred/value copies).
LATENT_BUFFERS = 10
GIB = 2**30
GSPN_BACKENDS = ("reference", "kernel")
# "An 80 GB device" (an H100/A100 80GB).
DEVICE_80GB = 80 * 10**9


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode, and their peak."""

    def __init__(self, external: set[int]) -> None:
        super().__init__()
        self.external = external
        self.live: dict[int, list[int]] = {}
        self.owners: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        if id(tensor) in self.owners:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.external:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        self.owners[id(tensor)] = key
        weakref.finalize(tensor, self._release, id(tensor), key)

    def _release(self, tensor_id: int, key: int) -> None:
        self.owners.pop(tensor_id, None)
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


@contextlib.contextmanager
def _fused_sdpa() -> Iterator[None]:
    """Count SDPA as a fused kernel (its output only): on ``meta`` it would decompose into the N^2 math path."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _kernel_scan(x, lam, gate_logits, direction, chunk_size=None, initial_state=None, return_final_state=False):
    """The CUDA kernel's memory: it writes h (and the final line) in x's dtype, with no fp32 copy of the gates."""
    h = torch.empty_like(x)
    if not return_final_state:
        return h
    n_perp = x.shape[1] if direction in ("left_to_right", "right_to_left") else x.shape[2]
    return h, x.new_empty(x.shape[0], n_perp, x.shape[-1])


def _kernel_scan_fused(x, *args, **kwargs):
    return torch.empty_like(x)


@contextlib.contextmanager
def _scan_memory(backend: str) -> Iterator[None]:
    """Trace GSPN's scans as the CUDA kernel (outputs only) or as the PyTorch reference (its fp32 temporaries).

    Meta tensors resolve to the reference backend; for ``"kernel"`` it is swapped for the kernel's memory model.
    """
    if backend not in GSPN_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(GSPN_BACKENDS)}; got {backend!r}.")
    if backend == "reference":
        yield
        return
    reference = ops_backend.REFERENCE
    ops_backend.REFERENCE = ops_backend.Backend("kernel memory model", _kernel_scan, _kernel_scan_fused)
    try:
        yield
    finally:
        ops_backend.REFERENCE = reference


def peak_activation_bytes(model: torch.nn.Module, run, *inputs: torch.Tensor, backend: str = "kernel") -> int:
    """Peak bytes of the intermediate tensors of ``run(*inputs)`` on a ``meta`` model (weights and inputs excluded).

    ``backend``: GSPN's scans counted as the CUDA kernel (``"kernel"``) or the PyTorch reference.
    """
    external = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), *inputs]}
    mode = _LiveBytes(external)
    with torch.no_grad(), _fused_sdpa(), _scan_memory(backend), mode:
        out = run(*inputs)
        del out
    return mode.peak


def meta_sdxl(gspn: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """SD-XL's UNet (GSPN-converted or not) and VAE on the ``meta`` device: architecture only, no memory."""
    with torch.device("meta"):
        unet = torch.nn.Module.to(UNet2DConditionModel(**SDXL_UNET_CONFIG), dtype)
        vae = torch.nn.Module.to(AutoencoderKL(**SDXL_VAE_CONFIG), dtype)
    if gspn:
        convert(unet, "sdxl")
    return unet, vae


def _unet_peak(
    unet: UNet2DConditionModel, batch: int, height: int, width: int, chunking: bool, backend: str = "kernel"
) -> int:
    config, dtype = unet.config, unet.dtype
    sample = torch.empty(batch, config.in_channels, height, width, device="meta", dtype=dtype)
    embeds = torch.empty(batch, 77, config.cross_attention_dim, device="meta", dtype=dtype)
    added = {}
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.empty(batch, text_dim, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    chunk_feed_forward(unet, height if chunking else None, width)
    try:
        return peak_activation_bytes(
            unet,
            lambda x, e: unet(x, 999, encoder_hidden_states=e, added_cond_kwargs=added),
            sample,
            embeds,
            backend=backend,
        )
    finally:
        chunk_feed_forward(unet, None)


def gspn_layer_bytes_per_token_channel(
    unet: UNet2DConditionModel, layer: str, height: int, width: int, line_block: bool, backend: str = "kernel"
) -> float:
    """Peak bytes of one GSPN layer's call (its input excluded, its output included) per token and channel.

    ``unet`` is a converted ``meta`` UNet, ``layer`` an attn1 name, ``height x width`` the UNet's latent (the layer
    sees it at its level's size); ``line_block`` forces line-block inference on or off for the call.
    """
    attn = unet.get_submodule(layer)
    processor = attn.gspn  # the layer's GSPN module
    level = _block_level(layer, len(unet.config.block_out_channels))
    processor.latent_size = (_level_size(height, level), _level_size(width, level))
    tokens = processor.latent_size[0] * processor.latent_size[1]
    hidden = torch.empty(1, tokens, processor.channels, device="meta", dtype=unet.dtype)
    saved = processor.line_block_tokens
    processor.line_block_tokens = 0 if line_block else None
    try:
        peak = peak_activation_bytes(attn, attn, hidden, backend=backend)
    finally:
        processor.line_block_tokens = saved
    return peak / (tokens * processor.channels)


def meta_unet(unet_config: dict[str, Any], gspn_config: GSPNConfig | None, dtype: torch.dtype) -> UNet2DConditionModel:
    """A UNet of this architecture on the ``meta`` device, converted with ``gspn_config`` (``None``: original)."""
    with torch.device("meta"):
        # nn.Module.to: ModelMixin.to warns about fp32 modules on every cast, here for nothing.
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(unet_config), dtype)
    if gspn_config is not None:
        convert(unet, gspn_config)
    return unet


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
            self._per_sample[height, width] = _unet_peak(self.unet, 1, height, width, self.forward_chunking, "kernel")
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
    peak_small = _unet_peak(unet, 1, small, small, forward_chunking, backend)
    peak_large = _unet_peak(unet, 1, large, large, forward_chunking, backend)
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
