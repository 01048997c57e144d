"""Swap every self-attention of a UNet (or ControlNet) for GSPN, and back.

``convert`` makes the model an instance of its GSPN class (:mod:`gspn_diffusers.models`) in place:
its config gains ``gspn_config``, each ``attn1`` gains a GSPN module and keeps its pretrained
projections, cross-attention (``attn2``) is left alone, and a pipeline's ``model_index.json`` names
the GSPN class, so ``save_pretrained`` / ``from_pretrained`` round-trip it. ``restore`` gives back the
plain model with its original processors, bit for bit. Both accept a ``torch.compile``d model.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.utils.torch_utils import is_compiled_module

from .config import GSPNConfig
from .errors import GSPNUserError
from .models import (
    GSPN_MODEL_CLASSES,
    GSPNModelMixin,
    attach_gspn,
    detach_gspn,
    detect_preset,
    gspn_layers,
    self_attention_layers,
    set_model_class,
)
from .module import GSPNModule

__all__ = [
    "convert",
    "detect_preset",
    "get_unet",
    "gspn_config_of",
    "gspn_modules",
    "gspn_parameters",
    "is_converted",
    "restore",
    "self_attention_layers",
]

T = TypeVar("T")
_MODELS = (UNet2DConditionModel, ControlNetModel)


def _unwrap(model: Any) -> Any:
    return model._orig_mod if is_compiled_module(model) else model


def get_unet(pipe_or_model: Any) -> UNet2DConditionModel | ControlNetModel:
    """The model GSPN works on: a pipeline's UNet, or a UNet or ControlNet given directly (compiled or not)."""
    model = _unwrap(pipe_or_model)
    if isinstance(model, _MODELS):
        return model
    unet = _unwrap(getattr(pipe_or_model, "unet", None))
    if isinstance(unet, UNet2DConditionModel):
        return unet
    raise TypeError(
        f"gspn_diffusers needs a Diffusers pipeline whose `unet` is a UNet2DConditionModel (SD-1.5, SD-2, SD-XL), "
        f"such a UNet or a ControlNetModel; got {type(pipe_or_model).__name__}"
        + (f" with a {type(unet).__name__} unet" if unet is not None else "")
        + ". Transformer-based pipelines (SD3, Flux, PixArt) are not supported."
    )


def is_converted(pipe_or_model: Any) -> bool:
    """The model is GSPN: its class and config say so and every self-attention runs GSPN."""
    model = get_unet(pipe_or_model)
    return isinstance(model, GSPNModelMixin) and len(gspn_layers(model)) == len(self_attention_layers(model))


def _check_converted(model: Any) -> None:
    if not isinstance(model, GSPNModelMixin):
        raise GSPNUserError("This model is not converted to GSPN; call gspn_diffusers.convert() first.")
    missing = sorted(set(self_attention_layers(model)) - set(gspn_layers(model)))
    if missing:
        raise GSPNUserError(
            f"This GSPN model lost the GSPN module of {len(missing)} self-attention layers (e.g. {missing[0]}); "
            "reload it (from_pretrained, or load_gspn into a fresh pipeline) instead of saving or using it."
        )


def gspn_config_of(pipe_or_model: Any) -> GSPNConfig:
    model = get_unet(pipe_or_model)
    _check_converted(model)
    return model.gspn_config


def gspn_modules(pipe_or_model: Any) -> dict[str, GSPNModule]:
    """The GSPN modules, by attn1 layer name."""
    model = get_unet(pipe_or_model)
    _check_converted(model)
    return {name: attn.gspn for name, attn in gspn_layers(model).items()}


def convert(pipe_or_model: T, config: GSPNConfig | str | None = None, *, init_from: Any | None = None) -> T:
    """Replace every self-attention with a GSPN module initialised from its Q/K/V.

    Args:
        pipe_or_model: an SD-1.5/SD-XL-style pipeline, its ``UNet2DConditionModel``, or a ``ControlNetModel``;
            changed in place (every layer is checked before any changes).
        config: a :class:`GSPNConfig`, a preset name (``"sd15"``, ``"sdxl"``), or ``None`` to pick the
            preset from the architecture (or take ``init_from``'s config).
        init_from: a converted UNet (or pipeline) whose GSPN weights initialise the layers of the same name:
            a ControlNet's attn1 layers mirror its UNet's down and mid blocks, so a ControlNet converted this
            way starts from the UNet's distilled GSPN.

    Returns the object it was given, so ``pipe = convert(pipe)`` reads naturally.
    """
    model = get_unet(pipe_or_model)
    if isinstance(model, GSPNModelMixin):
        raise GSPNUserError("This model is already converted to GSPN; call gspn_diffusers.restore() first.")
    if type(model) not in GSPN_MODEL_CLASSES:
        raise GSPNUserError(
            f"GSPN converts UNet2DConditionModel and ControlNetModel; {type(model).__name__} is a subclass it cannot "
            "rebuild from its config."
        )
    source = gspn_modules(init_from) if init_from is not None else None
    if config is None:
        config = gspn_config_of(init_from) if init_from is not None else GSPNConfig.from_preset(detect_preset(model))
    elif isinstance(config, str):
        config = GSPNConfig.from_preset(config)
    attach_gspn(model, config)
    set_model_class(model, config)
    if source is not None:
        _initialise_from(model, source)
    if getattr(pipe_or_model, "unet", None) is not None and get_unet(pipe_or_model) is model:
        # A pipeline records its components' classes when they are assigned: re-assign, so model_index.json
        # names the GSPN class and from_pretrained rebuilds it.
        pipe_or_model.unet = pipe_or_model.unet
    return pipe_or_model


def _initialise_from(model: Any, source: dict[str, GSPNModule]) -> None:
    targets = gspn_modules(model)
    with torch.no_grad():
        for name, module in targets.items():
            if name in source:
                module.load_state_dict(source[name].state_dict())


def restore(pipe_or_model: T) -> T:
    """Put back the plain model class, config and attention processors that ``convert`` replaced."""
    model = get_unet(pipe_or_model)
    if not isinstance(model, GSPNModelMixin):
        raise GSPNUserError("This model is not converted to GSPN; there is nothing to restore.")
    detach_gspn(model)
    set_model_class(model, None)
    if getattr(pipe_or_model, "unet", None) is not None and get_unet(pipe_or_model) is model:
        pipe_or_model.unet = pipe_or_model.unet
    return pipe_or_model


def gspn_parameters(pipe_or_model: Any, include_projections: bool | None = None) -> dict[str, torch.nn.Parameter]:
    """The parameters a distillation trains, by their name in the model's state dict.

    ``include_projections`` defaults to the config's ``train_projections``: then the attn1
    to_q/to_k/to_v/to_out of every converted layer are included too.
    """
    model = get_unet(pipe_or_model)
    config = gspn_config_of(model)
    if include_projections is None:
        include_projections = config.train_projections
    params: dict[str, torch.nn.Parameter] = {}
    for name, attn in gspn_layers(model).items():
        for key, param in attn.named_parameters():
            if key.startswith("gspn.") or include_projections:
                params[f"{name}.{key}"] = param
    return params
