"""Save and load only what GSPN adds, the way PEFT saves adapters.

A GSPN checkpoint is a folder (or a hub repo, see :mod:`gspn_diffusers.hub`) with
``gspn_config.json`` (the :class:`GSPNConfig` plus the layer layout it was made for),
``gspn_weights.safetensors`` (the GSPN parameters, and the attn1 projections when they were
trained) and a model card. Loading checks everything it can before it touches the model, converts,
then loads, and puts the model back as it was if anything fails: missing, unexpected or mis-shaped
weights, a truncated file, a config field of the wrong type, another architecture. Saving refuses
to replace an existing checkpoint unless asked, and writes every file under a temporary name first.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .config import GSPNConfig
from .convert import (
    convert,
    detect_preset,
    get_unet,
    gspn_config_of,
    gspn_parameters,
    is_converted,
    restore,
    self_attention_layers,
)
from .errors import GSPNFileExistsError, GSPNFileNotFoundError, GSPNUserError
from .hub import (
    CONFIG_NAME,
    MODEL_CARD_NAME,
    WEIGHTS_NAME,
    check_push_args,
    holds_checkpoint,
    model_card,
    push_checkpoint,
    resolve_checkpoint,
)
from .safe_write import atomic_path

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "check_gspn", "load_gspn", "save_gspn"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Version 2: the GSPN weights are a module of each attention layer (``...attn1.gspn.*``); version 1 stored them
# under the processor (``...attn1.processor.*``) and is still read, so distilled weights of older releases load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_V1_PREFIX, _V2_PREFIX = ".processor.", ".gspn."


def _layout(unet: Any) -> dict[str, int]:
    """attn1 layer name -> channels: what a checkpoint must match to load into this UNet."""
    return {name: attn.to_v.out_features for name, attn in self_attention_layers(unet).items()}


def _base_model_name(pipe_or_unet: Any) -> str | None:
    """The hub name or folder the pipeline (or UNet) was loaded from, for the model card (None: built in code)."""
    config = getattr(pipe_or_unet, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(get_unet(pipe_or_unet).config, "_name_or_path", None)
    return str(name) if name else None


def save_gspn(
    pipe_or_unet: Any,
    save_directory: str | Path,
    *,
    overwrite: bool = False,
    base_model: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> Path:
    """Write the GSPN weights, config and model card of a converted model to ``save_directory``; returns it.

    Args:
        overwrite: replace a GSPN checkpoint already in the folder (refused otherwise, so distilled weights
            are never lost to a second ``convert``).
        base_model: hub name of the base pipeline for the model card (default: what the pipeline was loaded from).
        training, metrics: what the model card reports (e.g. ``{"dataset": ..., "steps": ...}``, ``{"FID": ...}``).
        push_to_hub, repo_id, private, token: also upload the folder to the hub repo ``repo_id`` (created if
            needed), as PEFT's ``push_to_hub`` does; the arguments are checked before anything is written.
    """
    unet = get_unet(pipe_or_unet)
    config = gspn_config_of(unet)  # also refuses a model whose GSPN layers are not all in place
    directory = Path(save_directory)
    if push_to_hub:
        repo_id = check_push_args(repo_id)
    if directory.exists() and not directory.is_dir():
        raise GSPNFileExistsError(f"Cannot save GSPN weights to {str(directory)!r}: it is a file, not a folder.")
    if holds_checkpoint(directory) and not overwrite:
        raise GSPNFileExistsError(
            f"{str(directory)!r} already holds GSPN weights ({CONFIG_NAME}/{WEIGHTS_NAME}); pass overwrite=True "
            "(--overwrite on the command line) to replace them, or choose another folder."
        )
    # A README.md that is not this package's model card (a folder holding something else) is left alone.
    write_card = holds_checkpoint(directory) or not (directory / MODEL_CARD_NAME).exists()
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in gspn_parameters(unet).items()}
    layout = _layout(unet)
    document = {
        "format_version": FORMAT_VERSION,
        "gspn_diffusers_version": __version__,
        "config": config.to_dict(),
        "layers": layout,
    }
    card = model_card(
        config.to_dict(),
        len(layout),
        config.preset or detect_preset(unet),
        base_model or _base_model_name(pipe_or_unet),
        training=training,
        metrics=metrics,
    )
    # Every file is written in full under a temporary name before any replaces its old version, so an interruption
    # (Ctrl-C, a full disk) while writing leaves the old checkpoint whole, never new weights beside an old config.
    with contextlib.ExitStack() as files:
        save_file(
            tensors,
            files.enter_context(atomic_path(directory / WEIGHTS_NAME)),
            metadata={"format": "pt", "gspn_diffusers": __version__},
        )
        files.enter_context(atomic_path(directory / CONFIG_NAME)).write_text(json.dumps(document, indent=2) + "\n")
        if write_card:
            files.enter_context(atomic_path(directory / MODEL_CARD_NAME)).write_text(card)
    if not write_card:
        logger.warning("Kept the existing %s in %s (not a GSPN model card).", MODEL_CARD_NAME, directory)
    if push_to_hub:
        url = push_checkpoint(directory, repo_id, private=private, token=token)
        logger.info("Pushed the GSPN weights to %s", url)
    return directory


def _read_document(config_path: Path) -> dict[str, Any]:
    """The checked contents of ``gspn_config.json``; every error names the file and the field."""
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GSPNUserError(
            f"{config_path} is not valid JSON ({error}); re-save the checkpoint with save_gspn."
        ) from error
    if not isinstance(document, dict):
        raise GSPNUserError(f"{config_path} must hold a JSON object; got {type(document).__name__}.")
    if document.get("format_version") not in READABLE_VERSIONS:
        raise GSPNUserError(
            f"{config_path} has format_version {document.get('format_version')!r}; this gspn-diffusers reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}: upgrade gspn-diffusers."
        )
    for key, what in (("config", "the GSPN config"), ("layers", "the attn1 layer -> channels layout")):
        if not isinstance(document.get(key), dict):
            raise GSPNUserError(
                f"{config_path} has no {key!r} object ({what}); it was not written by save_gspn, re-save it."
            )
    bad = [n for n, c in document["layers"].items() if isinstance(c, bool) or not isinstance(c, int)]
    if bad:
        raise GSPNUserError(
            f"{config_path}: field 'layers' maps {bad[0]!r} to {document['layers'][bad[0]]!r}; expected an integer "
            "channel count."
        )
    return document


def _read_checkpoint(name_or_path: str | Path) -> tuple[dict[str, Any], GSPNConfig, Path]:
    directory = resolve_checkpoint(name_or_path)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise GSPNFileNotFoundError(
                f"{path.name} is missing in {str(directory)!r}; a GSPN checkpoint folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (written by save_gspn)."
            )
    document = _read_document(config_path)
    try:
        config = GSPNConfig.from_dict(document["config"])
    except GSPNUserError as error:
        raise GSPNUserError(f"{config_path}: {error}") from error
    _read_weights(weights_path, header_only=True)
    return document, config, weights_path


def _upgrade_keys(state: dict[str, torch.Tensor], format_version: int) -> dict[str, torch.Tensor]:
    """Version-1 names (the weights under the processor) as the module names of today."""
    if format_version != 1:
        return state
    return {key.replace(_V1_PREFIX, _V2_PREFIX, 1): value for key, value in state.items()}


def _read_weights(weights_path: Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of the weights file (none with ``header_only``: then only its header and size are checked,
    which finds a truncated file without reading the data)."""
    try:
        if header_only:
            with safe_open(weights_path, framework="pt") as handle:
                handle.keys()
            return {}
        return load_file(weights_path)
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError/ValueError
        raise GSPNUserError(
            f"{weights_path} is not a readable safetensors file ({error}); it may be truncated or corrupt: copy or "
            "download it again, or re-save it with save_gspn."
        ) from error


def check_gspn(name_or_path: str | Path) -> Path:
    """The local folder of a GSPN checkpoint (a folder, or a hub repo fetched or found in the cache), after
    checking its config and the weights file's header: lets a command fail before it loads any model."""
    _, _, weights_path = _read_checkpoint(name_or_path)
    return weights_path.parent


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
    raise GSPNUserError(
        f"These GSPN weights were made for a different UNet architecture ({len(expected)} self-attention layers; "
        f"this UNet has {len(actual)}): " + "; ".join(details) + ". Load them into the model they were trained on "
        "(SD-1.5 weights into an SD-1.5 pipeline, SD-XL into SD-XL)."
    )


def _check_state(state: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], weights_path: Path) -> None:
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise GSPNUserError(
            f"{weights_path} does not match its config: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}."
        )
    for name, param in params.items():
        if state[name].shape != param.shape:
            raise GSPNUserError(
                f"{weights_path}: shape mismatch for {name}: checkpoint {tuple(state[name].shape)}, model "
                f"{tuple(param.shape)}."
            )


def load_gspn(pipe_or_unet: T, save_directory: str | Path) -> T:
    """Convert the model with the saved config (if not converted yet) and load the saved GSPN weights.

    ``save_directory`` is a folder written by :func:`save_gspn` or a hub repo id ``org/name`` (downloaded, or read
    from the hub cache offline). When anything is wrong the model is left exactly as it was (a conversion made
    here is undone). Returns the object it was given.
    """
    unet = get_unet(pipe_or_unet)
    document, config, weights_path = _read_checkpoint(save_directory)
    _check_layout(document["layers"], _layout(unet))
    if is_converted(unet) and gspn_config_of(unet) != config:
        raise GSPNUserError(
            "This UNet is already converted with a different GSPN config than the checkpoint's; call "
            "gspn_diffusers.restore() before load_gspn()."
        )
    state = _upgrade_keys(_read_weights(weights_path), document["format_version"])
    converted_here = not is_converted(unet)
    if converted_here:
        convert(pipe_or_unet, config)  # the pipeline too: its model_index.json must name the GSPN class
    try:
        params = gspn_parameters(unet)
        _check_state(state, params, weights_path)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(device=param.device, dtype=param.dtype))
    except BaseException:
        if converted_here:
            restore(pipe_or_unet)
        raise
    return pipe_or_unet
