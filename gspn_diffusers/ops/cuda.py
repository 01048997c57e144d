"""The compiled backends of the GSPN operators: the kernels of ``csrc/`` as ``torch.library`` custom ops.

Layers, from the bottom: the compiled module (``extension.py``: the CUDA extension for CUDA tensors, the host
emulation for CPU tensors) -> the policy (``policy.py``: may this call run the kernel, and if not, say why
once) -> the custom ops ``gspn_diffusers::scan`` / ``gspn_diffusers::scan_fused`` and their backward ops, with
fake implementations and autograd registered, so ``torch.compile(..., fullgraph=True)`` sees one opaque op ->
:func:`cuda_scan` / :func:`cuda_scan_fused` with the signatures of the reference functions, registered as the
``cuda`` and ``emulation`` backends.

The policy runs inside the op, so a compiled graph keeps it: an input the kernel cannot take (float64, mixed
dtypes, an arch missing from the build, a line too long for shared memory, a failed self-check under ``auto``)
runs the PyTorch reference inside the same op, and its gradients come from recomputing the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TypeVar

import torch

from .backend import Backend, register_backend, requested_backend
from .cuda_build import find_cuda_home  # noqa: F401 - re-exported for scripts/check_cuda_build.py
from .extension import (  # noqa: F401 - the loader's names are part of this module's interface
    EMULATION_NAME,
    EXPECTED_FUNCTIONS,
    EXTENSION_NAME,
    SUPPORTED_DTYPES,
    build_emulation,
    build_extension,
    compiled_archs,
    load_emulation,
    load_error,
    load_extension,
    module_for,
    source_paths,
)
from .policy import kernel_for, reference_on
from .reference import DIRECTIONS, gspn_scan_fused_reference, gspn_scan_reference

T = TypeVar("T")
TILE_ENV = "GSPN_DIFFUSERS_CUDA_TILE"  # channels per block (power of two <= 16); 0 = heuristic


def _tile() -> int:
    value = os.environ.get(TILE_ENV, "0")
    if not value.isdigit():
        raise ValueError(f"{TILE_ENV}={value!r} must be 0 (heuristic) or a power of two up to 16.")
    return int(value)


# ---- Custom ops ----------------------------------------------------------------------------------------------


def _reference_grads(
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor | None],
    grad_outputs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of the reference with respect to ``inputs`` (None stays None), recomputed.

    ``torch.func.vjp``, not ``torch.autograd.grad``: an op's implementation runs below the autograd dispatch key.
    """
    present = [t for t in inputs if t is not None]

    def on_present(*tensors):
        given = iter(tensors)
        return reference(*(None if t is None else next(given) for t in inputs))

    outputs, vjp = torch.func.vjp(on_present, *present)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = tuple(
        torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outputs, grad_outputs, strict=True)
    )
    grads = iter(vjp(cotangents if len(cotangents) > 1 else cotangents[0]))
    # A gradient that passes a cotangent through (an empty block's state) would alias an input of the backward op.
    given = {g.untyped_storage().data_ptr() for g in grad_outputs if g is not None}
    return [None if t is None else _unaliased(next(grads), given) for t in inputs]


def _unaliased(t: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """``t``, or a copy where it shares storage with one of ``storages`` (custom ops may not return their inputs)."""
    return t.clone() if t.untyped_storage().data_ptr() in storages else t


def _kernel_or_reference(
    module: ModuleType | None, kernel: Callable[[ModuleType], T], reference: Callable[[], T]
) -> T:
    """``kernel(module)``, or ``reference()`` where the policy gave no module or the kernel met a limit that a valid
    input can hit (a line too long for shared memory, no code for the GPU); any other kernel error is raised."""
    if module is not None:
        try:
            return kernel(module)
        except RuntimeError as error:
            if not reference_on(error):
                raise
    return reference()


def _or_absent(grad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Custom ops return tensors only: an empty tensor stands for 'no gradient' (absent skip or state)."""
    return x.new_empty(0) if grad is None else grad


@torch.library.custom_op("gspn_diffusers::scan", mutates_args=())
def _scan_op(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    direction: int,
    chunk: int,
    initial_state: torch.Tensor | None,
    verify: bool,
    edge_above: torch.Tensor | None = None,
    edge_below: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    others = [lam, gate_logits] + [t for t in (initial_state, edge_above, edge_below) if t is not None]
    h, final = _kernel_or_reference(
        kernel_for(x, others, fused=False, normalize=False, chunk=chunk, verify=verify),
        lambda m: m.scan_forward(
            x, lam, gate_logits, direction, chunk, initial_state, True, _tile(), edge_above, edge_below
        ),
        lambda: gspn_scan_reference(
            x,
            lam,
            gate_logits,
            DIRECTIONS[direction],
            chunk or None,
            initial_state,
            True,
            _edges(edge_above, edge_below),
        ),
    )
    return h.contiguous(), final.contiguous()


def _edges(edge_above: torch.Tensor | None, edge_below: torch.Tensor | None):
    """The reference's ``edge_rows`` from the ops' two optional tensors."""
    return None if edge_above is None and edge_below is None else (edge_above, edge_below)


@_scan_op.register_fake
def _(x, lam, gate_logits, direction, chunk, initial_state, verify, edge_above=None, edge_below=None):
    perp = x.shape[1] if direction < 2 else x.shape[2]
    return x.new_empty(x.shape), x.new_empty((x.shape[0], perp, x.shape[3]))


@torch.library.custom_op("gspn_diffusers::scan_backward", mutates_args=())
def _scan_backward_op(
    grad_h: torch.Tensor,
    grad_final: torch.Tensor | None,
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    direction: int,
    chunk: int,
    initial_state: torch.Tensor | None,
    verify: bool,
    edge_above: torch.Tensor | None = None,
    edge_below: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, lam, gate_logits, initial_state, edge_above, edge_below (empty for an absent input)."""
    given = (initial_state, grad_final, edge_above, edge_below)
    others = [lam, gate_logits, grad_h] + [t for t in given if t is not None]
    grads = _kernel_or_reference(
        kernel_for(x, others, fused=False, normalize=False, chunk=chunk, verify=verify),
        lambda m: m.scan_backward(
            grad_h, x, lam, gate_logits, direction, chunk, initial_state, grad_final, _tile(), edge_above, edge_below
        ),
        lambda: _reference_grads(
            lambda *a: gspn_scan_reference(
                *a[:3], DIRECTIONS[direction], chunk or None, a[3], True, _edges(a[4], a[5])
            ),
            (x, lam, gate_logits, initial_state, edge_above, edge_below),
            (grad_h, grad_final),
        ),
    )
    return (*grads[:3], *(_or_absent(g, x) for g in grads[3:]))


@_scan_backward_op.register_fake
def _(
    grad_h, grad_final, x, lam, gate_logits, direction, chunk, initial_state, verify, edge_above=None, edge_below=None
):
    optional = (x.new_empty(0) if t is None else t.new_empty(t.shape) for t in (initial_state, edge_above, edge_below))
    return x.new_empty(x.shape), lam.new_empty(lam.shape), gate_logits.new_empty(gate_logits.shape), *optional


def _scan_setup_context(ctx, inputs, output):
    x, lam, gate_logits, direction, chunk, initial_state, verify, edge_above, edge_below = inputs
    ctx.save_for_backward(x, lam, gate_logits, initial_state, edge_above, edge_below)
    ctx.args = (direction, chunk, verify)


def _scan_backward(ctx, grad_h, grad_final):
    x, lam, gate_logits, initial_state, edge_above, edge_below = ctx.saved_tensors
    direction, chunk, verify = ctx.args
    gx, glam, ggate, *optional = _scan_backward_op(
        grad_h, grad_final, x, lam, gate_logits, direction, chunk, initial_state, verify, edge_above, edge_below
    )
    gstate, gabove, gbelow = (
        g if t is not None else None for g, t in zip(optional, (initial_state, edge_above, edge_below), strict=True)
    )
    return gx, glam, ggate, None, None, gstate, None, gabove, gbelow


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


@torch.library.custom_op("gspn_diffusers::scan_fused", mutates_args=())
def _fused_op(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    u: torch.Tensor,
    merge: torch.Tensor,
    skip: torch.Tensor | None,
    chunk: int,
    normalize: bool,
    eps: float,
    verify: bool,
) -> torch.Tensor:
    # merge and skip may be fp32 parameters beside low-precision activations: the kernel reads either.
    return _kernel_or_reference(
        kernel_for(x, [lam, gate_logits, u], fused=True, normalize=normalize, chunk=chunk, verify=verify),
        lambda m: m.fused_forward(x, lam, gate_logits, u, merge, skip, chunk, normalize, eps, _tile()),
        lambda: gspn_scan_fused_reference(x, lam, gate_logits, u, merge, skip, chunk or None, normalize, eps),
    ).contiguous()


@_fused_op.register_fake
def _(x, lam, gate_logits, u, merge, skip, chunk, normalize, eps, verify):
    return x.new_empty(x.shape)


@torch.library.custom_op("gspn_diffusers::scan_fused_backward", mutates_args=())
def _fused_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    u: torch.Tensor,
    merge: torch.Tensor,
    skip: torch.Tensor | None,
    chunk: int,
    normalize: bool,
    eps: float,
    verify: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernel_or_reference(
        kernel_for(x, [lam, gate_logits, u, grad_y], fused=True, normalize=normalize, chunk=chunk, verify=verify),
        lambda m: m.fused_backward(grad_y, x, lam, gate_logits, u, merge, skip, chunk, normalize, eps, _tile()),
        lambda: _reference_grads(
            lambda *a: gspn_scan_fused_reference(*a, chunk or None, normalize, eps),
            (x, lam, gate_logits, u, merge, skip),
            (grad_y,),
        ),
    )
    return (*grads[:5], _or_absent(grads[5], x))


@_fused_backward_op.register_fake
def _(grad_y, x, lam, gate_logits, u, merge, skip, chunk, normalize, eps, verify):
    grad_skip = x.new_empty(0) if skip is None else skip.new_empty(skip.shape)
    return (*(t.new_empty(t.shape) for t in (x, lam, gate_logits, u, merge)), grad_skip)


def _fused_setup_context(ctx, inputs, output):
    x, lam, gate_logits, u, merge, skip, chunk, normalize, eps, verify = inputs
    ctx.save_for_backward(x, lam, gate_logits, u, merge, skip)
    ctx.args = (chunk, normalize, eps, verify)


def _fused_backward(ctx, grad_y):
    x, lam, gate_logits, u, merge, skip = ctx.saved_tensors
    grads = _fused_backward_op(grad_y, x, lam, gate_logits, u, merge, skip, *ctx.args)
    return (*grads[:5], grads[5] if skip is not None else None, None, None, None, None)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---- Entry points --------------------------------------------------------------------------------------------


def _chunk(chunk_size: int | None) -> int:
    return 0 if chunk_size is None else int(chunk_size)


def _run_scan(x, lam, gate_logits, direction, chunk_size, initial_state, return_final_state, edge_rows, verify):
    above, below = (None, None) if edge_rows is None else edge_rows
    d, chunk = DIRECTIONS.index(direction), _chunk(chunk_size)
    h, final = _scan_op(x, lam, gate_logits, d, chunk, initial_state, verify, above, below)
    return (h, final) if return_final_state else h


def kernel_scan(
    x,
    lam,
    gate_logits,
    direction: str,
    chunk_size: int | None = None,
    initial_state=None,
    return_final_state=False,
    edge_rows=None,
):
    """The kernel on x's device (CUDA, or the emulation for CPU tensors) without the self-check."""
    return _run_scan(x, lam, gate_logits, direction, chunk_size, initial_state, return_final_state, edge_rows, False)


def kernel_scan_fused(x, lam, gate_logits, u, merge, skip=None, chunk_size=None, normalize=False, eps=1e-6):
    """The kernel on x's device (CUDA, or the emulation for CPU tensors) without the self-check."""
    return _fused_op(x, lam, gate_logits, u, merge, skip, _chunk(chunk_size), normalize, eps, False)


def cuda_scan(
    x,
    lam,
    gate_logits,
    direction: str,
    chunk_size: int | None = None,
    initial_state=None,
    return_final_state=False,
    edge_rows=None,
):
    """:func:`gspn_scan_reference` computed by the kernel where the policy allows (``auto``: once self-checked)."""
    verify = requested_backend() == "auto"
    return _run_scan(x, lam, gate_logits, direction, chunk_size, initial_state, return_final_state, edge_rows, verify)


def cuda_scan_fused(x, lam, gate_logits, u, merge, skip=None, chunk_size=None, normalize=False, eps=1e-6):
    """:func:`gspn_scan_fused_reference` computed by the kernel where the policy allows."""
    verify = requested_backend() == "auto"
    return _fused_op(x, lam, gate_logits, u, merge, skip, _chunk(chunk_size), normalize, eps, verify)


CUDA_BACKEND = Backend("cuda", cuda_scan, cuda_scan_fused)
EMULATION_BACKEND = Backend("emulation", kernel_scan, kernel_scan_fused)
register_backend(CUDA_BACKEND)
register_backend(EMULATION_BACKEND)
