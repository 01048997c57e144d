"""Swap every UNet self-attention for GSPN, and back.

``convert`` installs a :class:`GSPNAttnProcessor` on each ``attn1`` (cross-attention ``attn2`` is
left alone) and a forward pre-hook on each enclosing ``Transformer2DModel`` that tells the
processors the exact latent height and width of the call. ``restore`` puts the original
processors back and removes the hooks, which gives bit-identical outputs to the unconverted model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import GSPNConfig
from .processor import GSPNAttnProcessor

T = TypeVar("T")
_STATE_ATTR = "_gspn_state"


@dataclass
class _ConversionState:
    config: GSPNConfig
    original_processors: dict[str, Any] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)


def get_unet(pipe_or_unet: Any) -> UNet2DConditionModel:
    """The UNet of a pipeline (or the UNet itself), or a clear error for anything else."""
    if isinstance(pipe_or_unet, UNet2DConditionModel):
        return pipe_or_unet
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return unet
    raise TypeError(
        f"gspn_diffusers needs a Diffusers pipeline whose `unet` is a UNet2DConditionModel (SD-1.5, SD-2, SD-XL) "
        f"or such a UNet; got {type(pipe_or_unet).__name__}"
        + (f" with a {type(unet).__name__} unet" if unet is not None else "")
        + ". Transformer-based pipelines (SD3, Flux, PixArt) are not supported."
    )


def self_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """Every spatial self-attention (``attn1``) of the UNet, by module name, in ``named_modules`` order."""
    layers = {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("attn1") and isinstance(module, Attention) and not module.is_cross_attention
    }
    if not layers:
        raise ValueError("This UNet has no transformer self-attention (attn1) layers to convert to GSPN.")
    return layers


def _transformers_by_layer(unet: UNet2DConditionModel, layer_names: list[str]) -> dict[str, list[str]]:
    """Map each Transformer2DModel name to the attn1 layer names it contains (an error if one has none)."""
    transformers = [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    owners: dict[str, list[str]] = {}
    for layer in layer_names:
        owner = max((t for t in transformers if layer.startswith(t + ".")), key=len, default=None)
        if owner is None:
            raise ValueError(
                f"Self-attention {layer} is not inside a Transformer2DModel, so its latent size cannot be known; "
                "GSPN conversion supports UNet2DConditionModel transformer blocks only."
            )
        owners.setdefault(owner, []).append(layer)
    return owners


def detect_preset(unet: UNet2DConditionModel) -> str:
    """SD-XL conditions on size and crop through the ``text_time`` added embedding; SD-1.5/2 do not."""
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd15"


def is_converted(pipe_or_unet: Any) -> bool:
    return getattr(get_unet(pipe_or_unet), _STATE_ATTR, None) is not None


def gspn_config_of(pipe_or_unet: Any) -> GSPNConfig:
    state = getattr(get_unet(pipe_or_unet), _STATE_ATTR, None)
    if state is None:
        raise ValueError("This model is not converted to GSPN; call gspn_diffusers.convert() first.")
    return state.config


def gspn_processors(pipe_or_unet: Any) -> dict[str, GSPNAttnProcessor]:
    """The installed GSPN modules, by attn1 layer name."""
    gspn_config_of(pipe_or_unet)
    return {
        name: attn.processor
        for name, attn in self_attention_layers(get_unet(pipe_or_unet)).items()
        if isinstance(attn.processor, GSPNAttnProcessor)
    }


def _record_latent_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a Transformer2DModel: tell the GSPN processors inside it the latent (H, W).

    It finds the processors through the module it is called on, so a deep copy of a converted
    UNet (a teacher, an EMA copy) keeps working on its own processors.
    """
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if hidden_states is None or hidden_states.dim() != 4:
        raise RuntimeError(
            f"{type(module).__name__} received no (B, C, H, W) hidden_states, so GSPN cannot know the latent "
            "size; only spatial (continuous-input) transformers are supported."
        )
    size = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
    for child in module.modules():
        if isinstance(child, GSPNAttnProcessor):
            child.latent_size = size


def convert(pipe_or_unet: T, config: GSPNConfig | str | None = None) -> T:
    """Replace every UNet self-attention with a GSPN module initialised from its Q/K/V.

    Args:
        pipe_or_unet: an SD-1.5/SD-XL-style pipeline or its ``UNet2DConditionModel``; changed in place.
        config: a :class:`GSPNConfig`, a preset name (``"sd15"``, ``"sdxl"``), or ``None`` to pick the
            preset from the UNet's architecture.

    Returns the object it was given, so ``pipe = convert(pipe)`` reads naturally.
    """
    unet = get_unet(pipe_or_unet)
    if is_converted(unet):
        raise ValueError("This UNet is already converted to GSPN; call gspn_diffusers.restore() first.")
    if config is None:
        config = GSPNConfig.from_preset(detect_preset(unet))
    elif isinstance(config, str):
        config = GSPNConfig.from_preset(config)
    layers = self_attention_layers(unet)
    owners = _transformers_by_layer(unet, list(layers))
    state = _ConversionState(config=config)
    for name, attn in layers.items():
        weight = attn.to_v.weight
        processor = GSPNAttnProcessor(
            channels=attn.to_v.out_features,
            gate_rank=config.gate_rank,
            gate_channels=config.gate_channels,
            chunk_size=config.chunk_size_for(name),
            use_skip=config.use_skip,
            normalize=config.normalize,
            line_block_tokens=config.line_block_tokens,
            line_block_lines=config.line_block_lines,
        ).to(device=weight.device, dtype=weight.dtype)
        state.original_processors[name] = attn.processor
        attn.set_processor(processor)
    modules = dict(unet.named_modules())
    for owner in owners:
        state.hooks.append(modules[owner].register_forward_pre_hook(_record_latent_size, with_kwargs=True))
    setattr(unet, _STATE_ATTR, state)
    return pipe_or_unet


def restore(pipe_or_unet: T) -> T:
    """Put back the attention processors that ``convert`` replaced and remove its hooks."""
    unet = get_unet(pipe_or_unet)
    state: _ConversionState | None = getattr(unet, _STATE_ATTR, None)
    if state is None:
        raise ValueError("This model is not converted to GSPN; there is nothing to restore.")
    layers = self_attention_layers(unet)
    for name, processor in state.original_processors.items():
        layers[name].set_processor(processor)
    for handle in state.hooks:
        handle.remove()
    delattr(unet, _STATE_ATTR)
    return pipe_or_unet


def gspn_parameters(pipe_or_unet: Any, include_projections: bool | None = None) -> dict[str, torch.nn.Parameter]:
    """The parameters a distillation trains, by their name in the UNet's state dict.

    ``include_projections`` defaults to the config's ``train_projections``: then the attn1
    to_q/to_k/to_v/to_out of every converted layer are included too.
    """
    unet = get_unet(pipe_or_unet)
    config = gspn_config_of(unet)
    if include_projections is None:
        include_projections = config.train_projections
    params: dict[str, torch.nn.Parameter] = {}
    for name, attn in self_attention_layers(unet).items():
        for key, param in attn.named_parameters():
            if key.startswith("processor.") or include_projections:
                params[f"{name}.{key}"] = param
    return params
