"""Building and importing the compiled GSPN kernels: the CUDA extension and its host emulation.

Two modules expose the same functions (``csrc/gspn_ops.h`` defines them once for both):

- the CUDA extension: the ahead-of-time build ``gspn_diffusers._C`` from setup.py, else compiled just in time
  with ``torch.utils.cpp_extension.load`` + ninja and cached in torch's extension directory;
- the host emulation (``csrc/emulation/``): the same kernel source compiled for the CPU, where every CUDA thread
  is a host thread. It runs CPU tensors, for tests and debugging without a GPU (``GSPN_DIFFUSERS_BACKEND=emulation``).

Loading never raises: a failure is remembered, and :func:`load_error` says why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from .cuda_build import CSRC_DIR, SOURCES, compile_flags, find_cuda_home

logger = logging.getLogger(__name__)

EXTENSION_NAME = "gspn_diffusers_cuda"
EMULATION_NAME = "gspn_diffusers_cuda_emulation"
# Where scripts/check_cuda_build.py builds the emulation in a source checkout: the backend reuses that build.
EMULATION_BUILD_DIR = CSRC_DIR.parent / "build" / "cuda_check" / "emulation"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the ops call; the CUDA module also has the benchmark's per-line baseline.
OP_FUNCTIONS = ("fused_forward", "fused_backward", "scan_forward", "scan_backward", "compiled_archs")
EXPECTED_FUNCTIONS = (*OP_FUNCTIONS, "baseline_scan")

_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def source_paths() -> list[str]:
    missing = [name for name in SOURCES if not (CSRC_DIR / name).is_file()]
    if missing:
        raise OSError(
            f"The CUDA sources {', '.join(missing)} are not in {CSRC_DIR}. The JIT build needs a source checkout "
            "(pip install -e .), or install with GSPN_DIFFUSERS_BUILD_CUDA=1 to build the kernel ahead of time."
        )
    return [str(CSRC_DIR / name) for name in SOURCES]


def _cuda_home_or_raise(purpose: str) -> str:
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise OSError(f"{purpose} needs the CUDA toolkit headers (cuda_runtime_api.h); set CUDA_HOME.")
    # torch guesses CUDA_HOME from nvcc's location, which misses the headers when nvcc is a symlink elsewhere.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    return cuda_home


def build_extension(build_directory: str | None = None, verbose: bool = False, archs: str | None = None):
    """Compile (or reuse the cached build of) the CUDA extension with ninja and import it. Raises on failure."""
    _cuda_home_or_raise("Compiling the GSPN CUDA kernel")
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
    """Compile (host C++ only, no GPU needed) the emulation of the kernels. Raises on failure."""
    cuda_home = _cuda_home_or_raise("The host emulation of the GSPN kernels")
    from torch.utils.cpp_extension import load

    return load(
        name=EMULATION_NAME,
        sources=[str(CSRC_DIR / "emulation" / "gspn_emulation.cpp")],
        extra_cflags=["-O2"],
        extra_include_paths=[str(CSRC_DIR), str(Path(cuda_home) / "include")],
        build_directory=build_directory,
        verbose=verbose,
    )


def _import_cuda() -> ModuleType:
    try:
        from gspn_diffusers import _C as module  # ahead-of-time build from setup.py
    except ImportError:
        logger.warning(
            "Compiling the GSPN CUDA kernel (first use, about 3-5 minutes; cached afterwards in torch's extension "
            "directory, TORCH_EXTENSIONS_DIR)."
        )
        module = build_extension()
    return module


def _import_emulation() -> ModuleType:
    build_dir = None
    if (CSRC_DIR / "emulation").is_dir():
        EMULATION_BUILD_DIR.mkdir(parents=True, exist_ok=True)
        build_dir = str(EMULATION_BUILD_DIR)
        logger.info("Loading the GSPN kernel emulation (compiled on first use, about a minute) from %s", build_dir)
    return build_emulation(build_directory=build_dir)


def _load(kind: str) -> ModuleType | None:
    if kind in _modules or kind in _errors:
        return _modules.get(kind)
    try:
        module = _import_cuda() if kind == "cuda" else _import_emulation()
    except Exception as error:  # noqa: BLE001 - any build failure must fall back, never crash a pipeline
        _errors[kind] = f"{type(error).__name__}: {error}"
        return None
    expected = EXPECTED_FUNCTIONS if kind == "cuda" else OP_FUNCTIONS
    missing = [name for name in expected if not hasattr(module, name)]
    if missing:
        _errors[kind] = f"the compiled module {module.__name__} lacks {', '.join(missing)} (stale build?)"
        return None
    _modules[kind] = module
    return module


def load_extension() -> ModuleType | None:
    """The CUDA extension, built on first use; None (and the reason in :func:`load_error`) if that fails."""
    return _load("cuda")


def load_emulation() -> ModuleType | None:
    """The host emulation of the kernels, built on first use; None (reason in ``load_error("emulation")``)."""
    return _load("emulation")


def load_error(kind: str = "cuda") -> str | None:
    return _errors.get(kind)


def module_for(x: torch.Tensor) -> ModuleType | None:
    """The compiled module that runs tensors on x's device: the CUDA extension, or the emulation for CPU tensors."""
    return load_extension() if x.is_cuda else load_emulation()


def compiled_archs(module: ModuleType) -> list[int] | None:
    """SM versions the CUDA module was built for (e.g. [75, 80, 90]); None where the build does not say."""
    archs = getattr(module, "compiled_archs", None)
    return list(archs()) if callable(archs) else None


def reset() -> None:
    """Forget loaded modules and remembered errors (tests; a rebuilt kernel)."""
    _modules.clear()
    _errors.clear()
