"""How the CUDA extension is compiled: sources and flags shared by the JIT loader, setup.py and the CI check.

Standard library only, so setup.py can load this file without importing torch or the package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("gspn_binding.cpp", "gspn_fp32.cu", "gspn_fp16.cu", "gspn_bf16.cu", "gspn_baseline.cu")
ARCH_ENV = "GSPN_DIFFUSERS_CUDA_ARCH"  # compute capabilities, e.g. "8.0;9.0"
# V100, T4, A100, A10/RTX 30, L4/RTX 40, H100, as far as the installed nvcc targets them (CUDA 13 dropped 7.0);
# newer GPUs run the PTX of the newest, compiled by the driver.
WANTED_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0")
FALLBACK_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0")  # every nvcc from CUDA 11.8 to 13 targets these


def nvcc_archs(nvcc: str | None = None) -> set[str] | None:
    """Compute capabilities ("7.5", "9.0", ...) the installed nvcc can target, or None when it cannot say."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        cuda_home = find_cuda_home()
        nvcc = str(Path(cuda_home) / "bin" / "nvcc") if cuda_home else None
    if nvcc is None:
        return None
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {f"{n[:-1]}.{n[-1]}" for n in re.findall(r"compute_(\d+)\b", listed.stdout)} or None


def default_archs(available: set[str] | None = None) -> str:
    """WANTED_ARCHS that the installed nvcc supports (FALLBACK_ARCHS when it cannot list them), ';'-joined."""
    available = nvcc_archs() if available is None else available
    if available is None:
        return ";".join(FALLBACK_ARCHS)
    return ";".join(a for a in WANTED_ARCHS if a in available)


def arch_numbers(archs: str | None = None) -> list[str]:
    """SM numbers ("75", "90") of an explicit arch list ("7.5;9.0"), $GSPN_DIFFUSERS_CUDA_ARCH or the default,
    sorted and without duplicates."""
    archs = archs or os.environ.get(ARCH_ENV) or default_archs()
    numbers = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not numbers or not all(n.isdigit() for n in numbers):
        raise ValueError(f"{ARCH_ENV}={archs!r} is not a list of compute capabilities such as '8.0;9.0'.")
    return sorted(set(numbers), key=int)


def arch_flags(archs: str | None = None) -> list[str]:
    """nvcc -gencode flags for an explicit arch list ("8.0;9.0"), plus PTX of the newest for forward compatibility."""
    numbers = arch_numbers(archs)
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
    flags.append(f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}")
    return flags


def compile_flags(archs: str | None = None) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags). The C++ standard is left to torch (its headers need the one it picks).

    GSPN_COMPILED_ARCHS (for the binding, a C++ file) names the SM versions of the build, so the module's
    ``compiled_archs()`` can tell the Python side whether the current GPU is covered (or only by the PTX).
    """
    numbers = arch_numbers(archs)
    define = f"-DGSPN_COMPILED_ARCHS={','.join(numbers)}"
    return ["-O3", define], ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *arch_flags(";".join(numbers))]


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
