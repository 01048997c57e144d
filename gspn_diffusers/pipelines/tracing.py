"""Peak memory of one forward pass, traced on PyTorch's ``meta`` device: no GPU, no weights.

A model built on ``meta`` has shapes but no storage; one forward pass runs under a dispatch mode that adds up
the bytes of every live intermediate tensor (freed when the last reference to its storage dies), which gives
the peak of live activations. The original attention is counted as a fused SDPA kernel (flash /
memory-efficient: only its output), which is what PyTorch runs on a GPU for fp16/bf16. GSPN's scans are counted
for the backend that runs them: ``"kernel"`` (the CUDA kernel: its outputs only, no fp32 copies of the gates)
or ``"reference"`` (the PyTorch reference's fp32 temporaries).

The planning built on these traces (per stage, per mode, per CFG batch) is :mod:`.memory`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import GSPNConfig
from ..convert import convert
from ..models import GSPN_CONFIG_KEY
from ..ops import backend as ops_backend
from .chunking import _block_level, _level_size, chunk_feed_forward

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
GSPN_BACKENDS = ("reference", "kernel")


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


def _kernel_scan(
    x, lam, gate_logits, direction, chunk_size=None, initial_state=None, return_final_state=False, edge_rows=None
):
    """The CUDA kernel's memory: it writes h (and the final line) in x's dtype, with no fp32 copy of the gates (a
    band's ``edge_rows`` are read, not copied)."""
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


def unet_peak(
    unet: UNet2DConditionModel, batch: int, height: int, width: int, chunking: bool, backend: str = "kernel"
) -> int:
    """Peak activation bytes of one ``meta`` UNet call on a ``batch x C x height x width`` latent (chunked
    feed-forwards when ``chunking``), with SD-XL's added conditions when the config has them."""
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
    gspn = gspn_settings(attn)
    level = _block_level(layer, len(unet.config.block_out_channels))
    gspn.latent_size = (_level_size(height, level), _level_size(width, level))
    tokens = gspn.latent_size[0] * gspn.latent_size[1]
    hidden = torch.empty(1, tokens, gspn.channels, device="meta", dtype=unet.dtype)
    saved = gspn.line_block_tokens
    gspn.line_block_tokens = 0 if line_block else None
    try:
        peak = peak_activation_bytes(attn, attn, hidden, backend=backend)
    finally:
        gspn.line_block_tokens = saved
    return peak / (tokens * gspn.channels)


def gspn_settings(attn: torch.nn.Module) -> Any:
    """The module of a converted ``attn1`` layer that holds its GSPN settings (``channels``, ``latent_size``,
    ``line_block_tokens``): the one place the trace reaches into a GSPN layer, so a move of those settings is one
    line here."""
    return attn.gspn


def meta_unet(unet_config: dict[str, Any], gspn_config: GSPNConfig | None, dtype: torch.dtype) -> UNet2DConditionModel:
    """A UNet of this architecture on the ``meta`` device, converted with ``gspn_config`` (``None``: original)."""
    with torch.device("meta"):
        # nn.Module.to: ModelMixin.to warns about fp32 modules on every cast, here for nothing.
        # The plain architecture (a GSPN UNet's config also names its GSPN config, which is gspn_config here).
        plain = {key: value for key, value in unet_config.items() if key != GSPN_CONFIG_KEY}
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(plain), dtype)
    if gspn_config is not None:
        convert(unet, gspn_config)
    return unet


def gspn_band_layer_peak(
    channels: int,
    chunk_size: int | None,
    height: int,
    width: int,
    rows: tuple[int, int],
    batch: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "kernel",
    exact: bool = False,
) -> int:
    """Peak bytes of one patch-parallel GSPN ``attn1`` call (``to_out`` included) for the band rows ``[a, b)`` of a
    ``height x width`` latent at the layer's level: a stale call from the band's tokens and the neighbours' boundary
    lines, or (``exact``) a warm-up call from the whole image's gathered tokens. Its inputs are not counted.

    A ``meta`` Attention with a default :class:`~gspn_diffusers.module.GSPNModule` (one gate channel per channel).
    """
    from diffusers.models.attention_processor import Attention

    from ..module import GSPNModule
    from ..parallel.gspn import Band, attention_output, exact_band, stale_band, states_crossing

    with torch.device("meta"):
        attn = Attention(query_dim=channels, heads=1, dim_head=channels).to(dtype)
        gspn = GSPNModule(channels, chunk_size=chunk_size).to(dtype)
    a, b = rows
    needed = states_crossing(rows, height, chunk_size)
    lines = 2 * channels if gspn.normalize else channels  # values and normalisers interleaved

    if exact:

        def warmup(full: torch.Tensor) -> tuple[torch.Tensor, ...]:
            mixing, above, below = exact_band(attn, gspn, full, width, rows, height, needed)
            return attention_output(attn, mixing, full[:, a * width : b * width]), above, below

        tokens = torch.empty(batch, height * width, channels, device="meta", dtype=dtype)
        return peak_activation_bytes(attn, warmup, tokens, backend=backend)

    def received(exists: bool, state: bool) -> torch.Tensor | None:
        return torch.empty(batch, 2 + state, width, lines, device="meta", dtype=dtype) if exists else None

    band = Band(rows, height, received(a > 0, needed[0]), received(b < height, needed[1]))

    def stale(own: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mixing, to_above, to_below = stale_band(attn, gspn, own, width, band, needed)
        return attention_output(attn, mixing, own), to_above, to_below

    tokens = torch.empty(batch, (b - a) * width, channels, device="meta", dtype=dtype)
    edges = [t for t in (band.above, band.below) if t is not None]  # inputs, like the tokens: not counted
    return peak_activation_bytes(attn, stale, tokens, *edges, backend=backend)
