"""CUDA backend of the GSPN operators: the compiled kernels of ``csrc/`` behind ``autograd.Function``s.

Layers, from the bottom: the extension (imported ahead-of-time build ``gspn_diffusers._C`` from setup.py, else
compiled just in time with ``torch.utils.cpp_extension.load`` + ninja and cached in torch's extension
directory) -> ``_ScanFunction`` / ``_FusedScanFunction`` -> :func:`cuda_scan` / :func:`cuda_scan_fused`, which
have the signatures of the reference functions and are registered as the ``"cuda"`` backend.

Policy (``GSPN_DIFFUSERS_BACKEND``, read by ``backend.py``): CPU tensors and float64 always run the reference.
``auto`` runs the kernel on CUDA tensors only after a one-time self-check against the reference on a small
random case for that device, dtype and mode (op, normalisation, global/chunked); if the check disagrees a
warning says so and the reference runs. ``cuda`` skips the self-check. If the extension cannot be built or
imported, a warning says why and the reference runs: a pipeline never crashes because of the kernel.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

from .backend import Backend, register_backend, requested_backend
from .cuda_build import CSRC_DIR, SOURCES, compile_flags, find_cuda_home
from .reference import DIRECTIONS, gspn_scan_fused_reference, gspn_scan_reference

logger = logging.getLogger(__name__)

EXTENSION_NAME = "gspn_diffusers_cuda"
EMULATION_NAME = "gspn_diffusers_cuda_emulation"
TILE_ENV = "GSPN_DIFFUSERS_CUDA_TILE"  # channels per block (power of two <= 16); 0 = heuristic
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXPECTED_FUNCTIONS = ("fused_forward", "fused_backward", "scan_forward", "scan_backward", "baseline_scan")

_extension: ModuleType | None = None
_load_error: str | None = None
_self_checks: dict[tuple, bool] = {}
_warned: set[str] = set()


def source_paths() -> list[str]:
    missing = [name for name in SOURCES if not (CSRC_DIR / name).is_file()]
    if missing:
        raise OSError(
            f"The CUDA sources {', '.join(missing)} are not in {CSRC_DIR}. The JIT build needs a source checkout "
            "(pip install -e .), or install with GSPN_DIFFUSERS_BUILD_CUDA=1 to build the kernel ahead of time."
        )
    return [str(CSRC_DIR / name) for name in SOURCES]


def build_extension(build_directory: str | None = None, verbose: bool = False, archs: str | None = None):
    """Compile (or reuse the cached build of) the extension with ninja and import it. Raises on failure."""
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # torch guesses CUDA_HOME from nvcc's location, which misses the headers when nvcc is a symlink elsewhere.
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils.cpp_extension import load

    cxx, nvcc = compile_flags(archs)
    return load(
        name=EXTENSION_NAME,
        sources=source_paths(),
        extra_cflags=cxx,
        extra_cuda_cflags=nvcc,
        extra_include_paths=[str(CSRC_DIR)],
        build_directory=build_directory,
        verbose=verbose,
    )


def build_emulation(build_directory: str | None = None, verbose: bool = False):
    """Compile (host C++ only, no GPU needed) the emulation of the kernels used by tests/test_cuda_emulation.py."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise OSError("The host emulation needs the CUDA headers (cuda_fp16.h, cuda_bf16.h); set CUDA_HOME.")
    from torch.utils.cpp_extension import load

    return load(
        name=EMULATION_NAME,
        sources=[str(CSRC_DIR / "emulation" / "gspn_emulation.cpp")],
        extra_cflags=["-O2"],
        extra_include_paths=[str(CSRC_DIR), str(Path(cuda_home) / "include")],
        build_directory=build_directory,
        verbose=verbose,
    )


def load_extension() -> ModuleType | None:
    """The compiled module, built on first use; None (and the reason in :func:`load_error`) if that fails."""
    global _extension, _load_error
    if _extension is not None or _load_error is not None:
        return _extension
    try:
        from gspn_diffusers import _C as module  # ahead-of-time build from setup.py
    except ImportError:
        logger.warning(
            "Compiling the GSPN CUDA kernel (first use, about 3-5 minutes; cached afterwards in torch's extension "
            "directory, TORCH_EXTENSIONS_DIR)."
        )
        try:
            module = build_extension()
        except Exception as error:  # noqa: BLE001 - any build failure must fall back, never crash a pipeline
            _load_error = f"{type(error).__name__}: {error}"
            return None
    missing = [name for name in EXPECTED_FUNCTIONS if not hasattr(module, name)]
    if missing:
        _load_error = f"the compiled module {module.__name__} lacks {', '.join(missing)} (stale build?)"
        return None
    _extension = module
    return module


def load_error() -> str | None:
    return _load_error


def _tile() -> int:
    value = os.environ.get(TILE_ENV, "0")
    if not value.isdigit():
        raise ValueError(f"{TILE_ENV}={value!r} must be 0 (heuristic) or a power of two up to 16.")
    return int(value)


def _chunk(chunk_size: int | None) -> int:
    return 0 if chunk_size is None else int(chunk_size)


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, gate_logits, direction: int, chunk: int):
        ctx.save_for_backward(x, lam, gate_logits)
        ctx.direction, ctx.chunk = direction, chunk
        return _extension.scan_forward(x, lam, gate_logits, direction, chunk, _tile())

    @staticmethod
    def backward(ctx, grad_h):
        x, lam, gate_logits = ctx.saved_tensors
        grads = _kernel_or_reference_grads(
            lambda: _extension.scan_backward(grad_h, x, lam, gate_logits, ctx.direction, ctx.chunk, _tile()),
            lambda *a: gspn_scan_reference(*a, DIRECTIONS[ctx.direction], ctx.chunk or None),
            (x, lam, gate_logits),
            grad_h,
        )
        return *grads, None, None


class _FusedScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, gate_logits, u, merge, skip, chunk: int, normalize: bool, eps: float):
        ctx.save_for_backward(x, lam, gate_logits, u, merge, skip)
        ctx.chunk, ctx.normalize, ctx.eps = chunk, normalize, eps
        return _extension.fused_forward(x, lam, gate_logits, u, merge, skip, chunk, normalize, eps, _tile())

    @staticmethod
    def backward(ctx, grad_y):
        x, lam, gate_logits, u, merge, skip = ctx.saved_tensors
        grads = _kernel_or_reference_grads(
            lambda: _extension.fused_backward(
                grad_y, x, lam, gate_logits, u, merge, skip, ctx.chunk, ctx.normalize, ctx.eps, _tile()
            ),
            lambda *a: gspn_scan_fused_reference(*a, ctx.chunk or None, ctx.normalize, ctx.eps),
            (x, lam, gate_logits, u, merge, skip),
            grad_y,
        )
        grad_x, grad_lam, grad_gates, grad_u, grad_merge, grad_skip = grads
        if skip is None:
            grad_skip = None
        return grad_x, grad_lam, grad_gates, grad_u, grad_merge, grad_skip, None, None, None


def _kernel_or_reference_grads(
    kernel_backward: Callable[[], Sequence[torch.Tensor]],
    reference: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor | None, ...],
    grad_out: torch.Tensor,
) -> Sequence[torch.Tensor | None]:
    """The kernel's gradients, or the reference's where the scan line is too long for the backward's shared memory.

    ``inputs`` are the reference's tensor arguments in order; an absent one (``None``, e.g. no skip) stays
    ``None`` and gets no gradient.
    """
    try:
        return kernel_backward()
    except RuntimeError as error:
        if not _line_too_long(error):
            raise
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
    with torch.enable_grad():
        given = iter(leaves)
        out = reference(*(None if t is None else next(given) for t in inputs))
        grads = iter(torch.autograd.grad(out, leaves, grad_out))
    return tuple(None if t is None else next(grads) for t in inputs)


def kernel_scan(x, lam, gate_logits, direction: str, chunk_size: int | None = None) -> torch.Tensor:
    """The kernel itself, no policy: inputs must be CUDA tensors of a supported dtype."""
    return _ScanFunction.apply(x, lam, gate_logits, DIRECTIONS.index(direction), _chunk(chunk_size))


def kernel_scan_fused(x, lam, gate_logits, u, merge, skip=None, chunk_size=None, normalize=False, eps=1e-6):
    """The kernel itself, no policy: inputs must be CUDA tensors of a supported dtype."""
    return _FusedScanFunction.apply(x, lam, gate_logits, u, merge, skip, _chunk(chunk_size), normalize, eps)


# Self-check tolerances (relative to the largest reference value) for forward and gradients.
_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _max_rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().clamp_min(1e-6)
    return float((got.detach().double() - expected.detach().double()).abs().max() / scale)


def self_check(device: torch.device, dtype: torch.dtype, fused: bool, normalize: bool, chunk_size: int | None) -> str:
    """Kernel vs reference, forward and gradients, on one small random case; returns '' or what disagreed."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, h, w, c, g = 2, 5, 7, 24, 12

    def rand(*shape, low=-1.0, high=1.0):
        return (torch.rand(*shape, generator=gen, device=device) * (high - low) + low).to(dtype)

    x, lam = rand(b, h, w, c), rand(b, h, w, c, low=0.1, high=1.0)
    if fused:
        inputs = [x, lam, rand(b, h, w, 4, 3, g, low=-2, high=2), rand(b, h, w, 4, c), rand(4, c), rand(c)]

        def run(fn, *args):
            return fn(*args, chunk_size=chunk_size, normalize=normalize)

        kernel, reference = kernel_scan_fused, gspn_scan_fused_reference
    else:
        inputs = [x, lam, rand(b, h, w, 3, g, low=-2, high=2)]

        def run(fn, *args):
            return fn(*args, "bottom_to_top", chunk_size)

        kernel, reference = kernel_scan, gspn_scan_reference
    tol = _CHECK_TOLERANCE[dtype]
    with torch.enable_grad():
        results = []
        for fn in (kernel, reference):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = run(fn, *leaves)
            grad = torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).reshape(out.shape)
            out.backward(grad)
            results.append([out, *(leaf.grad for leaf in leaves)])
    names = ["output", "grad x", "grad lam", "grad gates", "grad u", "grad merge", "grad skip"]
    for name, got, expected in zip(names, *results, strict=False):
        err = _max_rel_error(got, expected)
        if not err <= (tol if name == "output" else 3 * tol):
            return f"{name} differs from the reference by {err:.2e} (relative)"
    return ""


def _verified(x: torch.Tensor, fused: bool, normalize: bool, chunk_size: int | None) -> bool:
    """auto: the one-time self-check of this device/dtype/mode; cuda: always True (the user forced the kernel)."""
    if requested_backend() == "cuda":
        return True
    key = (x.device, x.dtype, fused, normalize, chunk_size is not None)
    if key not in _self_checks and torch.cuda.is_current_stream_capturing():
        return False  # no self-check (it synchronises) inside CUDA graph capture: the reference is captured
    if key not in _self_checks:
        problem = self_check(x.device, x.dtype, fused, normalize, chunk_size)
        _self_checks[key] = not problem
        if problem:
            warnings.warn(
                f"The GSPN CUDA kernel failed its self-check ({'fused' if fused else 'single'} scan, {x.dtype}, "
                f"normalize={normalize}, chunked={chunk_size is not None}): {problem}. Running the PyTorch "
                "reference for this mode; please report this. GSPN_DIFFUSERS_BACKEND=cuda forces the kernel.",
                stacklevel=4,
            )
    return _self_checks[key]


def _kernel_applies(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """CUDA tensors of one supported dtype on one device (mixed dtypes go to the reference, which upcasts)."""
    same = all(t.dtype == x.dtype and t.device == x.device for t in others)
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES and same and load_extension() is not None


def _line_too_long(error: RuntimeError) -> bool:
    """The one kernel limit a valid input can hit: a scan line longer than shared memory holds (~14K positions)."""
    if "does not fit in shared memory" not in str(error):
        return False
    if "line" not in _warned:
        _warned.add("line")
        warnings.warn(f"{error} Running the PyTorch reference for such sizes.", stacklevel=4)
    return True


def cuda_scan(
    x, lam, gate_logits, direction: str, chunk_size: int | None = None, initial_state=None, return_final_state=False
):
    """:func:`gspn_scan_reference` computed by the kernel where it applies and passed its self-check."""
    carried = initial_state is not None or return_final_state
    if not carried and _kernel_applies(x, lam, gate_logits) and _verified(x, False, False, chunk_size):
        try:
            return kernel_scan(x, lam, gate_logits, direction, chunk_size)
        except RuntimeError as error:
            if not _line_too_long(error):
                raise
    return gspn_scan_reference(x, lam, gate_logits, direction, chunk_size, initial_state, return_final_state)


def cuda_scan_fused(x, lam, gate_logits, u, merge, skip=None, chunk_size=None, normalize=False, eps=1e-6):
    """:func:`gspn_scan_fused_reference` computed by the kernel where it applies and passed its self-check."""
    if _kernel_applies(x, lam, gate_logits, u) and _verified(x, True, normalize, chunk_size):
        try:
            return kernel_scan_fused(x, lam, gate_logits, u, merge, skip, chunk_size, normalize, eps)
        except RuntimeError as error:
            if not _line_too_long(error):
                raise
    return gspn_scan_fused_reference(x, lam, gate_logits, u, merge, skip, chunk_size, normalize, eps)


CUDA_BACKEND = Backend("cuda", cuda_scan, cuda_scan_fused)


def cuda_backend() -> Backend | None:
    """Build/import the extension and register the backend; None (after one warning saying why) on failure."""
    if load_extension() is None:
        if "build" not in _warned:
            _warned.add("build")
            warnings.warn(
                f"The GSPN CUDA kernel is not available ({_load_error}); running the PyTorch reference instead. "
                "Set GSPN_DIFFUSERS_BACKEND=reference to silence this.",
                stacklevel=4,
            )
        return None
    register_backend(CUDA_BACKEND)
    return CUDA_BACKEND
