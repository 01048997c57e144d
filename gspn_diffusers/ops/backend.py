"""Backend selection for the GSPN operators.

A backend is a pair of callables with the signatures of the reference functions. The reference
is always registered; a compiled backend registers itself under its name (``"cuda"``) when its
extension is importable. ``GSPN_DIFFUSERS_BACKEND`` chooses:

- ``auto`` (default): for CUDA tensors the CUDA backend (built on first use), which runs the kernel
  once a one-time self-check against the reference passed for that dtype and mode, else the reference;
- ``reference``: always the reference;
- ``cuda``: the CUDA kernel for CUDA tensors, without the self-check.
If the kernel cannot be built or imported a warning says why and the reference runs instead, so a
pipeline never crashes because a kernel failed to build. CPU tensors always run the reference.
"""

from __future__ import annotations

import os
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
    cuda = _registry.get("cuda") or _load_cuda_backend()
    return REFERENCE if cuda is None else cuda


def _load_cuda_backend() -> Backend | None:
    """Build or import the kernel on first use with a CUDA tensor (it warns and returns None if it cannot)."""
    from .cuda import cuda_backend

    return cuda_backend()
