"""GSPN operators: the public entry points, dispatching to a backend.

``gspn_scan`` is the single-direction operator of DESIGN.md section 1 and ``gspn_scan_fused`` the
four-direction scan with merge. CPU tensors run the pure-PyTorch reference; CUDA tensors run the CUDA
kernel of ``csrc/`` (``cuda.py``, built on first use) where it is available and passed its self-check.
``backend.py`` reads ``GSPN_DIFFUSERS_BACKEND=auto|reference|cuda|emulation``; ``cuda.py`` registers the
compiled backends as ``torch.library`` custom ops (one opaque op each for ``torch.compile``).
"""

from __future__ import annotations

import torch

from . import cuda as _compiled  # noqa: F401 - registers the cuda and emulation backends
from .backend import resolve_backend
from .reference import (
    DIRECTIONS,
    NUM_GATES,
    EdgeRows,
    check_direction,
    check_edge_rows,
    check_fused_inputs,
    check_initial_state,
    check_scan_inputs,
    gspn_scan_fused_reference,
    gspn_scan_reference,
)

__all__ = [
    "DIRECTIONS",
    "NUM_GATES",
    "gspn_scan",
    "gspn_scan_fused",
    "gspn_scan_fused_reference",
    "gspn_scan_reference",
]


def gspn_scan(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    direction: str,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    edge_rows: EdgeRows | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One-direction GSPN scan (channels-last), optionally chained over blocks of lines by a carried state, or
    over a band of rows given the hidden rows just outside it.

    See :func:`gspn_scan_reference` for shapes, the carried state (scanning consecutive blocks of the scan axis in
    scan order, each with the previous block's ``final_state``, equals the whole scan) and ``edge_rows``
    ``(above, below)``, each None or (B, W, C), for the horizontal scans of a band of rows (feeding each band of
    an image the whole scan's rows just above and below it equals the whole scan).
    """
    check_direction(direction)
    check_scan_inputs(x, lam, gate_logits, chunk_size)
    check_initial_state(x, initial_state, direction)
    edge_rows = check_edge_rows(x, edge_rows, direction, initial_state)
    backend = resolve_backend(x)
    # Only a band passes edge rows, so backends written before them (a memory model, a recorder) serve the rest.
    band = {} if edge_rows is None else {"edge_rows": edge_rows}
    return backend.scan(x, lam, gate_logits, direction, chunk_size, initial_state, return_final_state, **band)


def gspn_scan_fused(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    u: torch.Tensor,
    merge: torch.Tensor,
    skip: torch.Tensor | None = None,
    chunk_size: int | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Four directions scanned and merged in image coordinates. See :func:`gspn_scan_fused_reference`."""
    check_fused_inputs(x, lam, gate_logits, u, merge, skip, chunk_size)
    backend = resolve_backend(x)
    return backend.scan_fused(x, lam, gate_logits, u, merge, skip, chunk_size, normalize)
