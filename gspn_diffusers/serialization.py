"""Save and load only what GSPN adds, the way PEFT saves adapters.

A GSPN checkpoint is a folder with ``gspn_config.json`` (the :class:`GSPNConfig` plus the layer
layout it was made for) and ``gspn_weights.safetensors`` (the GSPN parameters, and the attn1
projections when they were trained). Loading converts first, then loads, and refuses missing,
unexpected or mis-shaped weights and checkpoints made for another architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import GSPNConfig
from .convert import convert, get_unet, gspn_config_of, gspn_parameters, is_converted, self_attention_layers

T = TypeVar("T")
CONFIG_NAME = "gspn_config.json"
WEIGHTS_NAME = "gspn_weights.safetensors"
FORMAT_VERSION = 1


def _layout(unet: Any) -> dict[str, int]:
    """attn1 layer name -> channels: what a checkpoint must match to load into this UNet."""
    return {name: attn.to_v.out_features for name, attn in self_attention_layers(unet).items()}


def save_gspn(pipe_or_unet: Any, save_directory: str | Path) -> Path:
    """Write the GSPN weights and config of a converted model to ``save_directory``; returns it."""
    unet = get_unet(pipe_or_unet)
    config = gspn_config_of(unet)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in gspn_parameters(unet).items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "gspn_diffusers": __version__})
    document = {
        "format_version": FORMAT_VERSION,
        "gspn_diffusers_version": __version__,
        "config": config.to_dict(),
        "layers": _layout(unet),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")
    return directory


def _read_checkpoint(directory: Path) -> tuple[dict[str, Any], Path]:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"GSPN weights folder {str(directory)!r} does not exist; pass the folder written by save_gspn or "
            "`gspn-diffusers convert --output`."
        )
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path.name} is missing in {str(directory)!r}; a GSPN checkpoint folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (written by save_gspn)."
            )
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{config_path} is not valid JSON ({error}); re-save the checkpoint with save_gspn."
        ) from error
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {document.get('format_version')!r}; this gspn-diffusers reads "
            f"version {FORMAT_VERSION}."
        )
    return document, weights_path


def _check_layout(expected: dict[str, int], actual: dict[str, int]) -> None:
    if expected == actual:
        return
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    resized = sorted(n for n in set(expected) & set(actual) if expected[n] != actual[n])
    details = []
    if missing:
        details.append(f"{len(missing)} checkpoint layers absent from this UNet (e.g. {missing[0]})")
    if extra:
        details.append(f"{len(extra)} UNet layers absent from the checkpoint (e.g. {extra[0]})")
    if resized:
        n = resized[0]
        details.append(f"channel mismatch at {n}: checkpoint {expected[n]}, UNet {actual[n]}")
    raise ValueError(
        f"These GSPN weights were made for a different UNet architecture ({len(expected)} self-attention layers; "
        f"this UNet has {len(actual)}): " + "; ".join(details) + ". Load them into the model they were trained on "
        "(SD-1.5 weights into an SD-1.5 pipeline, SD-XL into SD-XL)."
    )


def load_gspn(pipe_or_unet: T, save_directory: str | Path) -> T:
    """Convert the model with the saved config (if not converted yet) and load the saved GSPN weights.

    Returns the object it was given.
    """
    unet = get_unet(pipe_or_unet)
    document, weights_path = _read_checkpoint(Path(save_directory))
    _check_layout(document["layers"], _layout(unet))
    config = GSPNConfig.from_dict(document["config"])
    if not is_converted(unet):
        convert(unet, config)
    elif gspn_config_of(unet) != config:
        raise ValueError(
            "This UNet is already converted with a different GSPN config than the checkpoint's; call "
            "gspn_diffusers.restore() before load_gspn()."
        )
    state = load_file(weights_path)
    params = gspn_parameters(unet)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match its config: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}."
        )
    for name, param in params.items():
        if state[name].shape != param.shape:
            raise ValueError(
                f"Shape mismatch for {name}: checkpoint {tuple(state[name].shape)}, model {tuple(param.shape)}."
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))
    return pipe_or_unet
