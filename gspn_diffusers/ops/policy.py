"""When a GSPN call may run the compiled kernel, and saying why, once, when it may not.

Used inside the custom ops of :mod:`.cuda`, so a compiled graph keeps the decision: the kernel needs a built
module for the tensors' device, one supported dtype, a GPU arch the build covers and (``auto``) a passed one-time
self-check against the reference; otherwise the reference runs. Every cause is warned about once per process.
The self-check runs the registered ops (``torch.ops.gspn_diffusers``) without the policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

from .extension import SUPPORTED_DTYPES, compiled_archs, load_error, module_for
from .reference import DIRECTIONS, gspn_scan_fused_reference, gspn_scan_reference

_self_checks: dict[tuple, bool] = {}
_arch_ok: dict[int, bool] = {}
_warned: set[str] = set()


def warn_once(cause: str, message: str) -> None:
    """One warning per cause for the whole process (a pipeline calls the op thousands of times)."""
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(message, stacklevel=3)


def arch_covered(sm: int, archs: list[int]) -> bool:
    """Machine code for sm_XY runs on sm_XZ with Z >= Y; PTX of the newest arch is compiled by the driver for newer
    GPUs."""
    return any(a // 10 == sm // 10 and a <= sm for a in archs) or (bool(archs) and sm > max(archs))


def arch_covered_on(module: ModuleType, device: torch.device) -> bool:
    """The build can run on this GPU; if not, one warning says how to rebuild (the reference runs meanwhile)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _arch_ok:
        archs = compiled_archs(module)
        major, minor = torch.cuda.get_device_capability(index)
        sm = 10 * major + minor
        _arch_ok[index] = archs is None or arch_covered(sm, archs)
        if not _arch_ok[index]:
            warn_once(
                f"arch{sm}",
                f"The GSPN CUDA kernel was built for sm_{', sm_'.join(map(str, archs))}, not for this GPU "
                f"(sm_{sm}, {torch.cuda.get_device_name(index)}); running the PyTorch reference. Rebuild with "
                f'GSPN_DIFFUSERS_CUDA_ARCH="{major}.{minor}".',
            )
    return _arch_ok[index]


def kernel_for(
    x: torch.Tensor,
    others: Sequence[torch.Tensor],
    fused: bool,
    normalize: bool,
    chunk: int,
    verify: bool,
) -> ModuleType | None:
    """The compiled module that may run this call, or None (after a warning, once per cause) for the reference.

    ``others`` must share x's dtype and device. ``verify``: run the one-time self-check (``auto``).
    """
    kind = "CUDA kernel" if x.is_cuda else "kernel emulation"
    module = module_for(x)
    if module is None:
        source = "cuda" if x.is_cuda else "emulation"
        warn_once(
            f"build-{source}",
            f"The GSPN {kind} is not available ({load_error(source)}); running the PyTorch reference instead. "
            "Set GSPN_DIFFUSERS_BACKEND=reference to silence this.",
        )
        return None
    if x.dtype not in SUPPORTED_DTYPES:
        warn_once(
            f"dtype-{x.dtype}",
            f"The GSPN {kind} takes float32, float16 and bfloat16, not {x.dtype}; running the PyTorch reference "
            "for these inputs.",
        )
        return None
    mixed = sorted(
        {str(t.dtype) for t in others if t.dtype != x.dtype} | {str(t.device) for t in others if t.device != x.device}
    )
    if mixed:
        warn_once(
            "mixed",
            f"The GSPN {kind} needs its inputs in one dtype on one device (x is {x.dtype} on {x.device}, others "
            f"{', '.join(mixed)}); running the PyTorch reference. Cast them to one dtype before the op.",
        )
        return None
    if x.is_cuda and not arch_covered_on(module, x.device):
        return None
    if verify and x.is_cuda and not _verified(module, x, fused, normalize, chunk):
        return None
    return module


def _verified(module: ModuleType, x: torch.Tensor, fused: bool, normalize: bool, chunk: int) -> bool:
    key = (x.device, x.dtype, fused, normalize, chunk > 0)
    if key not in _self_checks:
        if torch.cuda.is_current_stream_capturing():
            warn_once(
                "capture",
                "The GSPN CUDA kernel has not passed its self-check for this dtype and mode before CUDA graph "
                "capture (the check synchronises); the reference is captured. Run one step before capturing.",
            )
            return False
        problem = self_check(x.device, x.dtype, fused, normalize, chunk or None)
        _self_checks[key] = not problem
        if problem:
            warn_once(
                f"check{key}",
                f"The GSPN CUDA kernel failed its self-check ({'fused' if fused else 'single'} scan, {x.dtype}, "
                f"normalize={normalize}, chunked={chunk > 0}): {problem}. Running the PyTorch reference for this "
                "mode; please report this. GSPN_DIFFUSERS_BACKEND=cuda forces the kernel.",
            )
    return _self_checks[key]


def reference_on(error: RuntimeError) -> bool:
    """Kernel errors that a valid input can hit: a line too long for shared memory, no kernel image for the GPU."""
    text = str(error)
    if "does not fit in shared memory" in text:
        warn_once("line", f"{text} Running the PyTorch reference for such sizes.")
        return True
    if "no kernel image is available" in text:
        warn_once("image", f"The GSPN CUDA kernel has no code for this GPU ({text}); running the PyTorch reference.")
        return True
    return False


def _kernel_scan(
    x, lam, gate_logits, direction, chunk_size=None, initial_state=None, return_final_state=False, edge_rows=None
):
    above, below = (None, None) if edge_rows is None else edge_rows
    h, final = torch.ops.gspn_diffusers.scan(
        x, lam, gate_logits, DIRECTIONS.index(direction), chunk_size or 0, initial_state, False, above, below
    )
    return (h, final) if return_final_state else h


def _kernel_scan_fused(x, lam, gate_logits, u, merge, skip=None, chunk_size=None, normalize=False, eps=1e-6):
    return torch.ops.gspn_diffusers.scan_fused(
        x, lam, gate_logits, u, merge, skip, chunk_size or 0, normalize, eps, False
    )


# ---- Self-check ----------------------------------------------------------------------------------------------

# Tolerances (relative to the largest reference value) for forward and gradients.
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
        names = ["output", "grad x", "grad lam", "grad gates", "grad u", "grad merge", "grad skip"]

        def run(fn, *args):
            return fn(*args, chunk_size=chunk_size, normalize=normalize)

        kernel, reference = _kernel_scan_fused, gspn_scan_fused_reference
    else:
        # With a carried state (what line-block inference runs) and a band's edge rows (patch parallelism): h, the
        # final state and the band's h are all checked.
        inputs = [x, lam, rand(b, h, w, 3, g, low=-2, high=2), rand(b, w, c), rand(b, w, c), rand(b, w, c)]
        names = ["output, final state and band output", "grad x", "grad lam", "grad gates", "grad initial state"]
        names += ["grad edge row above", "grad edge row below"]

        def run(fn, *args):
            out, final = fn(*args[:3], "bottom_to_top", chunk_size, args[3], True)
            band = fn(*args[:3], "right_to_left", chunk_size, edge_rows=(args[4], args[5]))
            return torch.cat([out.flatten(), final.flatten(), band.flatten()])

        kernel, reference = _kernel_scan, gspn_scan_reference
    tol = _CHECK_TOLERANCE[dtype]
    with torch.enable_grad():
        results = []
        for fn in (kernel, reference):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = run(fn, *leaves)
            grad = torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).reshape(out.shape)
            out.backward(grad)
            results.append([out, *(leaf.grad for leaf in leaves)])
    for index, (name, got, expected) in enumerate(zip(names, *results, strict=True)):
        if got is None and expected is None:
            continue
        if got is None or expected is None:
            return f"{name}: one side has no gradient"
        err = _max_rel_error(got, expected)
        if not err <= (tol if index == 0 else 3 * tol):
            return f"{name} differs from the reference by {err:.2e} (relative)"
    return ""
