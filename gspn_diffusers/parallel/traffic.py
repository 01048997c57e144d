"""A model of the bytes each process sends per UNet call, from the UNet's layer shapes (no run, no devices).

It counts what :mod:`.comm` counts, layer by layer (the tests check it against the measured counts): the call's
shape check, every conv's halo rows, every GroupNorm's statistics, every ``attn1``'s all-gathered tokens (softmax
attention, and GSPN layers in exact calls) or boundary lines (GSPN in stale calls), and the gathered output. The
layer inventory is traced once on the ``meta`` device at a small latent, so it serves latents of any size,
16384x8192 included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .bands import BandPlan, downsampling_factor, plan_bands
from .gspn import gspn_module_of, vertical_state_needed
from .layers import conv_halo

_HANDSHAKE_VALUES = 6  # (B, C, H, W, timestep, step) as int64


@dataclass(frozen=True)
class Layer:
    kind: str  # "conv", "norm", "attn"
    level: int
    channels: int
    halo: tuple[int, int] = (0, 0)  # conv: rows to the band above's request (top) and below's (bottom)
    groups: int = 0  # norm
    chunk_size: int | None = None  # GSPN attn
    normalize: bool = True  # GSPN attn: the normaliser's C channels travel with the values


def layer_inventory(unet: UNet2DConditionModel) -> list[Layer]:
    """Every exchanging layer of ``unet`` with its UNet level and channels (a meta-device trace of one call)."""
    factor = downsampling_factor(unet.config)
    size = 8 * factor
    config = unet.config
    layers: list[Layer] = []
    handles = []

    def level_of(rows: int) -> int:
        return round(math.log2(size / rows))

    def hook(name: str, module: nn.Module):
        def record(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(mod, nn.Conv2d):
                layers.append(Layer("conv", level_of(x.shape[2]), x.shape[1], halo=conv_halo(mod)))
            elif isinstance(mod, nn.GroupNorm):
                layers.append(Layer("norm", level_of(x.shape[2]), x.shape[1], groups=mod.num_groups))
            else:
                gspn = gspn_module_of(mod)
                level = level_of(int(math.isqrt(x.shape[1])))
                chunk = gspn.chunk_size if gspn is not None else None
                normalize = gspn.normalize if gspn is not None else True
                layers.append(Layer("attn", level, x.shape[2], chunk_size=chunk, normalize=normalize))

        return record

    for name, module in unet.named_modules():
        exchanging = (isinstance(module, nn.Conv2d) and conv_halo(module) is not None) or isinstance(
            module, nn.GroupNorm
        )
        exchanging |= isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention
        if exchanging:
            handles.append(module.register_forward_pre_hook(hook(name, module), with_kwargs=True))
    try:
        with torch.no_grad():  # a real call for a real UNet (at 8f x 8f, cheap), none for a meta one
            param = next(unet.parameters())

            def empty(*shape: int) -> torch.Tensor:
                return torch.zeros(*shape, device=param.device, dtype=param.dtype)

            sample, embeds = empty(1, config.in_channels, size, size), empty(1, 77, config.cross_attention_dim)
            added = {}
            if config.addition_embed_type == "text_time":
                text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                added = {"text_embeds": empty(1, text_dim), "time_ids": empty(1, 6)}
            unet(sample, 999, encoder_hidden_states=embeds, added_cond_kwargs=added)
    finally:
        for handle in handles:
            handle.remove()
    return layers


def call_bytes_by_kind(
    layers: list[Layer],
    plan: BandPlan,
    band: int,
    batch: int,
    element_size: int,
    out_channels: int,
    gspn: bool,
    exact: bool,
    mode: str = "stale",
) -> dict[str, int]:
    """Bytes band ``band`` sends in one UNet call (``exact``: a warm-up or sync call; else a stale one), by kind:
    ``call`` (shape check and gathered output), ``conv`` (halos), ``norm`` (statistics), ``attn1``."""
    n = plan.size
    sent = dict.fromkeys(("call", "conv", "norm", "attn1"), 0)
    sent["call"] = (n - 1) * _HANDSHAKE_VALUES * 8
    sent["call"] += (n - 1) * batch * out_channels * max(plan.heights(0)) * plan.width * element_size
    if mode == "naive" or n == 1:
        return sent
    for layer in layers:
        width = plan.level_width(layer.level)
        if layer.kind == "conv":
            top, bottom = layer.halo
            rows = (bottom if band > 0 else 0) + (top if band < n - 1 else 0)
            sent["conv"] += rows * batch * layer.channels * width * element_size
        elif layer.kind == "norm":
            sent["norm"] += (n - 1) * batch * layer.groups * 3 * 8
        elif not gspn or exact:
            sent["attn1"] += (n - 1) * batch * max(plan.heights(layer.level)) * width * layer.channels * element_size
        else:
            start, end = plan.rows(band, layer.level)
            height = plan.level_height(layer.level)
            channels = layer.channels * (2 if layer.normalize else 1)
            for edge, exists in ((start, start > 0), (end, end < height)):
                if exists:
                    rows = 2 + vertical_state_needed(edge, layer.chunk_size)
                    sent["attn1"] += rows * batch * width * channels * element_size
    return sent


def call_bytes(*args, **kwargs) -> int:
    """The total of :func:`call_bytes_by_kind`: what :class:`~.comm.Comm` counts for the call."""
    return sum(call_bytes_by_kind(*args, **kwargs).values())


def traffic_table(
    unet: UNet2DConditionModel, height: int, width: int, world_sizes: list[int], batch: int, element_size: int
) -> list[dict[str, Any]]:
    """Per-process bytes of a stale call (the band that sends most), GSPN (``unet`` converted) vs softmax attention,
    per N: totals, the ``attn1`` layers alone, and DistriFusion's own attention traffic (it gathers K and V, 2C
    per token, where this implementation gathers the layer input, C).

    ``gspn_attn1_value_lines_bytes`` is the floor of any exact boundary exchange: the value scan's lines alone (two
    hidden rows and the vertical state per band edge, C each), as if the normaliser needed nothing."""
    layers = layer_inventory(unet)
    value_lines = [dataclasses.replace(layer, normalize=False) for layer in layers]
    rows = []
    for n in world_sizes:
        plan = plan_bands(height, width, n, downsampling_factor(unet.config))
        common = dict(batch=batch, element_size=element_size, out_channels=unet.config.out_channels, exact=False)
        gspn = [call_bytes_by_kind(layers, plan, k, gspn=True, **common) for k in range(n)]
        attn = [call_bytes_by_kind(layers, plan, k, gspn=False, **common) for k in range(n)]
        floor = [call_bytes_by_kind(value_lines, plan, k, gspn=True, **common) for k in range(n)]
        top = max(range(n), key=lambda k: sum(attn[k].values()))
        rows.append(
            {
                "height": height,
                "width": width,
                "world_size": n,
                "gspn_bytes": max(sum(g.values()) for g in gspn),
                "attention_bytes": sum(attn[top].values()),
                "distrifusion_kv_bytes": sum(attn[top].values()) + attn[top]["attn1"],
                "gspn_attn1_bytes": max(g["attn1"] for g in gspn),
                "gspn_attn1_value_lines_bytes": max(f["attn1"] for f in floor),
                "attention_attn1_bytes": attn[top]["attn1"],
                "conv_halo_bytes": max(a["conv"] for a in attn),
            }
        )
    return rows
