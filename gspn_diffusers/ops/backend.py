"""Backend selection for the GSPN operators.

A backend is a pair of callables with the signatures of the reference functions. The reference is
always registered; the compiled backends (``cuda``: the kernel on CUDA tensors, ``emulation``: the same
kernel source compiled for the host, on CPU tensors) register themselves from ``cuda.py``.
``GSPN_DIFFUSERS_BACKEND`` chooses:

- ``auto`` (default): CUDA tensors run the kernel once a one-time self-check against the reference
  passed for that dtype and mode; CPU tensors run the reference;
- ``reference``: always the reference;
- ``cuda``: the kernel for CUDA tensors, without the self-check; CPU tensors run the reference;
- ``emulation``: the kernel's source on the CPU, for tests and debugging without a GPU (CPU tensors only).

Whatever a compiled backend cannot run (a kernel that did not build, an arch missing from the build, a
dtype it does not take, a line too long for its shared memory) runs on the reference, with a warning
that says why, once per cause: a pipeline never crashes because of the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import gspn_scan_fused_reference, gspn_scan_reference

ENV_VAR = "GSPN_DIFFUSERS_BACKEND"
_CHOICES = ("auto", "reference", "cuda", "emulation")


@dataclass(frozen=True)
class Backend:
    name: str
    scan: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
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
    if choice == "emulation":
        if example.is_cuda:
            raise ValueError(
                f"{ENV_VAR}=emulation runs the kernel's source on the CPU and takes CPU tensors; these are on "
                f"{example.device}. Use {ENV_VAR}=auto (or cuda) on the GPU."
            )
        return _registry.get("emulation", REFERENCE)
    if choice == "reference" or not example.is_cuda:
        return REFERENCE
    return _registry.get("cuda", REFERENCE)
