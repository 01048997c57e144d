"""GSPN model classes: a converted UNet (or ControlNet) is one, and its class and config rebuild it.

Diffusers rebuilds a model from its class and config (``from_pretrained``, ``from_config``,
``device_map``, ``push_to_hub``), so a model that is GSPN says so in both:
:class:`GSPNUNet2DConditionModel` is a ``UNet2DConditionModel`` whose config carries ``gspn_config``
and whose ``__init__`` converts every self-attention (``attn1``) to a
:class:`~gspn_diffusers.attention.GSPNAttention` with its GSPN module. ``save_pretrained`` then
writes the GSPN weights with the rest and ``from_pretrained`` loads them into the same layers.
:func:`attach_gspn` / :func:`detach_gspn` do the conversion in place (``convert`` / ``restore``).
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    CROSS_ATTENTION_PROCESSORS,
    Attention,
    AttnAddedKVProcessor,
    AttnProcessor,
)
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - Diffusers' loader looks it up in this module
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .attention import GSPNAttention, to_gspn_attention, to_plain_attention
from .config import GSPNConfig
from .errors import GSPNUserError
from .module import GSPNModule
from .processor import GSPN_PROCESSORS

GSPN_CONFIG_KEY = "gspn_config"


def self_attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every spatial self-attention (``attn1``) of the model, by module name, in ``named_modules`` order."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if name.endswith("attn1") and isinstance(module, Attention) and not module.is_cross_attention
    }
    if not layers:
        raise GSPNUserError("This model has no transformer self-attention (attn1) layers to convert to GSPN.")
    return layers


def gspn_layers(model: nn.Module) -> dict[str, GSPNAttention]:
    """The converted self-attention layers (those holding a GSPN module), by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, GSPNAttention) and isinstance(getattr(module, "gspn", None), GSPNModule)
    }


def detect_preset(model: nn.Module) -> str:
    """SD-XL conditions on size and crop through the ``text_time`` added embedding; SD-1.5/2 do not."""
    return "sdxl" if model.config.get("addition_embed_type") == "text_time" else "sd15"


def _owning_transformers(model: nn.Module, layer_names: list[str]) -> list[str]:
    """The Transformer2DModel around each attn1 (an error if one has none: its latent size could not be known)."""
    transformers = [n for n, m in model.named_modules() if isinstance(m, Transformer2DModel)]
    owners: list[str] = []
    for layer in layer_names:
        owner = max((t for t in transformers if layer.startswith(t + ".")), key=len, default=None)
        if owner is None:
            raise GSPNUserError(
                f"Self-attention {layer} is not inside a Transformer2DModel, so its latent size cannot be known; "
                "GSPN conversion supports UNet2DConditionModel / ControlNetModel transformer blocks only."
            )
        if owner not in owners:
            owners.append(owner)
    return owners


def _record_latent_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a Transformer2DModel: tell the GSPN modules inside it the latent (H, W).

    It finds the modules through the transformer it is called on, so a deep copy of a converted
    model (a teacher, an EMA copy) keeps working on its own modules.
    """
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if hidden_states is None or hidden_states.dim() != 4:
        raise RuntimeError(
            f"{type(module).__name__} received no (B, C, H, W) hidden_states, so GSPN cannot know the latent "
            "size; only spatial (continuous-input) transformers are supported."
        )
    size = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
    for child in module.modules():
        if isinstance(child, GSPNModule):
            child.latent_size = size


def _has_latent_hook(module: nn.Module) -> bool:
    return any(hook is _record_latent_size for hook in module._forward_pre_hooks.values())


def build_gspn_modules(model: nn.Module, config: GSPNConfig) -> dict[str, GSPNModule]:
    """One GSPN module per attn1, on that layer's device and dtype; raises before anything is changed."""
    layers = self_attention_layers(model)
    _owning_transformers(model, list(layers))
    for name, attn in layers.items():
        channels = attn.to_v.out_features
        gate_channels = config.gate_channels or channels
        if channels % gate_channels:
            raise GSPNUserError(
                f"gate_channels={gate_channels} does not divide the {channels} channels of {name}; choose a "
                "divisor of every attention width (e.g. a power of two such as 32), or leave it unset."
            )
    modules = {}
    for name, attn in layers.items():
        weight = attn.to_v.weight
        modules[name] = GSPNModule(
            channels=attn.to_v.out_features,
            gate_rank=config.gate_rank,
            gate_channels=config.gate_channels,
            chunk_size=config.chunk_size_for(name),
            use_skip=config.use_skip,
            normalize=config.normalize,
            line_block_tokens=config.line_block_tokens,
            line_block_lines=config.line_block_lines,
        ).to(device=weight.device, dtype=weight.dtype)
    return modules


def attach_gspn(model: nn.Module, config: GSPNConfig) -> None:
    """Convert every attn1 of ``model`` in place: all modules are built (and checked) before any layer changes."""
    layers = self_attention_layers(model)
    if gspn_layers(model):
        raise GSPNUserError("This model already has GSPN layers; call gspn_diffusers.restore() first.")
    modules = build_gspn_modules(model, config)
    owners = _owning_transformers(model, list(layers))
    for name, attn in layers.items():
        to_gspn_attention(attn, modules[name])
    named = dict(model.named_modules())
    for owner in owners:
        if not _has_latent_hook(named[owner]):
            named[owner].register_forward_pre_hook(_record_latent_size, with_kwargs=True)


def detach_gspn(model: nn.Module) -> None:
    """Give every converted layer back its original processor (Diffusers' default if unknown) and drop the hooks."""
    for attn in gspn_layers(model).values():
        to_plain_attention(attn)
    for module in model.modules():
        if isinstance(module, Transformer2DModel):
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _record_latent_size]:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


class GSPNModelMixin:
    """What a GSPN model class adds to its Diffusers base class."""

    def _init_gspn(self, gspn_config: dict[str, Any] | None) -> None:
        config = (
            GSPNConfig.from_preset(detect_preset(self)) if gspn_config is None else GSPNConfig.from_dict(gspn_config)
        )
        self.register_to_config(**{GSPN_CONFIG_KEY: config.to_dict()})
        attach_gspn(self, config)

    @property
    def gspn_config(self) -> GSPNConfig:
        return GSPNConfig.from_dict(self.config[GSPN_CONFIG_KEY])

    def set_default_attn_processor(self) -> None:
        """Diffusers' default processor on the softmax attention layers; the GSPN layers keep GSPN.

        Diffusers' own version refuses any processor class it does not know, GSPN's included.
        """
        others = [p for p in self.attn_processors.values() if not isinstance(p, GSPN_PROCESSORS)]
        if all(p.__class__ in ADDED_KV_ATTENTION_PROCESSORS for p in others):
            processor = AttnAddedKVProcessor()
        elif all(p.__class__ in CROSS_ATTENTION_PROCESSORS for p in others):
            processor = AttnProcessor()
        else:
            raise ValueError(
                f"Cannot call `set_default_attn_processor` when attention processors are of type {type(others[0])}."
            )
        self.set_attn_processor(processor)


def _gspn_init(base: type) -> Any:
    """``base.__init__`` plus ``gspn_config``, with the full signature: Diffusers reads a model's config keys from
    its ``__init__`` signature, so every key of the base config must appear there."""

    def __init__(self: Any, *args: Any, gspn_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self._init_gspn(gspn_config)

    parameters = list(inspect.signature(base.__init__).parameters.values())
    extra = inspect.Parameter(GSPN_CONFIG_KEY, inspect.Parameter.KEYWORD_ONLY, default=None)
    __init__.__signature__ = inspect.Signature([*parameters, extra])
    __init__.__doc__ = f"{base.__name__}'s arguments, and ``gspn_config`` (a GSPNConfig dict; None: the preset)."
    return __init__


class GSPNUNet2DConditionModel(GSPNModelMixin, UNet2DConditionModel):
    """An SD-1.5 / SD-XL UNet whose self-attention layers are GSPN; its config carries ``gspn_config``."""

    __init__ = _gspn_init(UNet2DConditionModel)


class GSPNControlNetModel(GSPNModelMixin, ControlNetModel):
    """A ControlNet whose self-attention layers are GSPN (they mirror the UNet's down and mid blocks)."""

    __init__ = _gspn_init(ControlNetModel)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, **kwargs: Any) -> GSPNControlNetModel:
        """``ControlNetModel.from_unet`` that keeps GSPN: a GSPN UNet's weights and GSPN config, GSPN weights included.

        Diffusers' own ``from_unet`` loads the UNet's blocks strictly into a plain ControlNet, which has no place
        for the GSPN weights. From a plain UNet, the ControlNet is converted with the preset (fresh GSPN modules).
        """
        from .convert import convert

        from_gspn = isinstance(unet, GSPNUNet2DConditionModel)
        load_weights = kwargs.pop("load_weights_from_unet", True)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=load_weights and not from_gspn, **kwargs)
        convert(controlnet, unet.gspn_config if from_gspn else None)
        if from_gspn and load_weights:
            for name, child in controlnet.named_children():
                source = unet._modules.get(name)
                if source is not None:
                    child.load_state_dict(source.state_dict())
        return controlnet


GSPN_MODEL_CLASSES: dict[type, type] = {
    UNet2DConditionModel: GSPNUNet2DConditionModel,
    ControlNetModel: GSPNControlNetModel,
}


def gspn_components(pipeline: Any) -> dict[str, nn.Module]:
    """The GSPN models among a pipeline's components, to hand to ``from_pipe`` explicitly.

    Diffusers' ``from_pipe`` carries a model over only when its class is exactly the one the new pipeline's
    signature names, which a GSPN subclass is not (Diffusers then warns and asks for ``from_pipe(..., unet=unet)``).
    """
    return {name: c for name, c in pipeline.components.items() if isinstance(c, GSPNModelMixin)}


def set_model_class(model: nn.Module, config: GSPNConfig | None) -> None:
    """Make ``model`` an instance of its GSPN class with ``config`` in its config (``None``: back to the base)."""
    if config is None:
        model.__class__ = next(base for base, gspn in GSPN_MODEL_CLASSES.items() if type(model) is gspn)
    else:
        model.__class__ = GSPN_MODEL_CLASSES[type(model)]
    values = {k: v for k, v in model.config.items() if k != GSPN_CONFIG_KEY}
    if config is not None:
        values[GSPN_CONFIG_KEY] = config.to_dict()
    # Diffusers' config is a FrozenDict with no removal API, and Diffusers itself sometimes changes a value only as
    # an attribute of it (load_ip_adapter's encoder_hid_dim_type): rebuild it and carry those attributes over, or
    # the model would silently stop using them (register_to_config drops them).
    rebuilt = FrozenDict(values)
    rebuilt.__dict__.update({k: v for k, v in vars(model.config).items() if k != GSPN_CONFIG_KEY})
    model._internal_dict = rebuilt
