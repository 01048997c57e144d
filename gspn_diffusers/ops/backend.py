"""Backend selection for the GSPN operators.

A backend is a pair of callables with the signatures of the reference functions. The reference
is always registered; a compiled backend registers itself under its name (``"cuda"``) when its
extension is importable. ``GSPN_DIFFUSERS_BACKEND`` chooses:

- ``auto`` (default): the CUDA backend for CUDA tensors when it is registered, else the reference;
- ``reference``: always the reference;
- ``cuda``: the CUDA backend for CUDA tensors; if it is not available a warning says why and the
  reference runs instead, so a pipeline never crashes because a kernel failed to build.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import gspn_scan_fused_reference, gspn_scan_reference

ENV_VAR = "GSPN_DIFFUSERS_BACKEND"
_CHOICES = ("auto", "reference", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    scan: Callable[..., torch.Tensor]
    scan_fused: Callable[..., torch.Tensor]


REFERENCE = Backend("reference", gspn_scan_reference, gspn_scan_fused_reference)
_registry: dict[str, Backend] = {"reference": REFERENCE}
_warned: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Make a compiled backend available to :func:`resolve_backend`."""
    _registry[backend.name] = backend


def requested_backend() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not valid; use one of {', '.join(_CHOICES)}.")
    return choice


def resolve_backend(example: torch.Tensor) -> Backend:
    """The backend that runs an op whose inputs live where ``example`` lives."""
    choice = requested_backend()
    if choice == "reference" or not example.is_cuda:
        return REFERENCE
    cuda = _registry.get("cuda")
    if cuda is not None:
        return cuda
    if choice == "cuda" and "cuda" not in _warned:
        _warned.add("cuda")
        warnings.warn(
            f"{ENV_VAR}=cuda was requested but no compiled GSPN CUDA kernel is available in this install; "
            "running the PyTorch reference instead.",
            stacklevel=3,
        )
    return REFERENCE
