"""How the CUDA extension is compiled: sources and flags shared by the JIT loader, setup.py and the CI check.

Standard library only, so setup.py can load this file without importing torch or the package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("gspn_binding.cpp", "gspn_fp32.cu", "gspn_fp16.cu", "gspn_bf16.cu", "gspn_baseline.cu")
ARCH_ENV = "GSPN_DIFFUSERS_CUDA_ARCH"  # compute capabilities, e.g. "8.0;9.0"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def arch_flags(archs: str | None = None) -> list[str]:
    """nvcc -gencode flags for an explicit arch list ("8.0;9.0"), plus PTX of the newest for forward compatibility."""
    archs = archs or os.environ.get(ARCH_ENV) or DEFAULT_ARCHS
    numbers = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not numbers or not all(n.isdigit() for n in numbers):
        raise ValueError(f"{ARCH_ENV}={archs!r} is not a list of compute capabilities such as '8.0;9.0'.")
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
    flags.append(f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}")
    return flags


def compile_flags(archs: str | None = None) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags). The C++ standard is left to torch (its headers need the one it picks)."""
    return ["-O3"], ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *arch_flags(archs)]


def find_cuda_home() -> str | None:
    """The CUDA toolkit with its headers: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the parent of nvcc's bin/."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return candidate
    return None
