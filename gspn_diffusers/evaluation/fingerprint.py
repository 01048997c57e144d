"""Content fingerprints: what a resumed run and the FID reference cache compare instead of paths.

A path says nothing about what is behind it: weights re-distilled into the same folder must not
reuse the old images, and the same weights under another path should. Tensors are hashed by name,
dtype, shape and bytes; image sets by file name, size and modification time (cheap for 40k files).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


def tensors_sha256(tensors: Mapping[str, torch.Tensor], extra: Any = None) -> str:
    """sha256 of named tensors (sorted by name) and of the JSON of ``extra`` (e.g. a config)."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gspn_weights_sha256(pipe_or_unet: Any) -> str | None:
    """The fingerprint of the GSPN weights and config that a converted model runs with (``None`` if not converted).

    Hashing the loaded parameters covers every source of the weights (a folder, the hub, a model
    converted or trained in memory); the weights' dtype is part of it, as it is of the images.
    """
    from ..convert import get_unet, gspn_config_of, gspn_parameters, is_converted

    unet = get_unet(pipe_or_unet)
    if not is_converted(unet):
        return None
    return tensors_sha256(gspn_parameters(unet), extra=gspn_config_of(unet).to_dict())


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a model's state dict: identifies a feature extractor in the FID reference cache key."""
    return tensors_sha256(module.state_dict())


def file_set_key(files: Iterable[Path], root: Path, settings: Mapping[str, Any]) -> str:
    """sha256 of files (names relative to ``root``, sizes, mtimes) and of the ``settings`` that process them."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    document = {"files": sorted(entries), "settings": dict(settings)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
