"""The CUDA backend's loader and policy on a machine without a GPU (the kernel itself: test_cuda_kernel.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gspn_diffusers.ops import cuda, cuda_build, gspn_scan_fused, gspn_scan_fused_reference

ROOT = Path(__file__).resolve().parents[1]


def test_sources_exist_and_flags_name_the_archs():
    assert [Path(p).name for p in cuda.source_paths()] == list(cuda.SOURCES)
    cxx, nvcc = cuda_build.compile_flags("8.0;9.0")
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc and "-gencode=arch=compute_90,code=sm_90" in nvcc
    assert "-gencode=arch=compute_90,code=compute_90" in nvcc  # PTX for newer GPUs
    with pytest.raises(ValueError, match="compute capabilities"):
        cuda_build.arch_flags("sm_90")


def test_cpu_tensors_use_the_reference_without_building(monkeypatch):
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "cuda")
    monkeypatch.setattr(cuda, "_extension", None)
    monkeypatch.setattr(cuda, "_load_error", None)
    gen = torch.Generator().manual_seed(0)
    x, lam = torch.randn(1, 3, 4, 2, generator=gen), torch.rand(1, 3, 4, 2, generator=gen)
    gates, u, merge = torch.randn(1, 3, 4, 4, 3, 2, generator=gen), torch.rand(1, 3, 4, 2), torch.rand(4)
    out = gspn_scan_fused(x, lam, gates, u, merge, normalize=True)
    torch.testing.assert_close(out, gspn_scan_fused_reference(x, lam, gates, u, merge, normalize=True))
    assert cuda._extension is None and cuda._load_error is None  # nothing was built or imported


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    """A kernel that cannot be built says why, once, and the caller gets None (-> the reference)."""
    monkeypatch.setitem(sys.modules, "gspn_diffusers._C", None)  # no ahead-of-time build either
    monkeypatch.setattr(cuda, "CSRC_DIR", tmp_path)  # a checkout without csrc/
    monkeypatch.setattr(cuda, "_extension", None)
    monkeypatch.setattr(cuda, "_load_error", None)
    monkeypatch.setattr(cuda, "_warned", set())
    with pytest.warns(UserWarning, match="not available .*OSError: The CUDA sources .* are not in"):
        assert cuda.cuda_backend() is None
    assert "GSPN_DIFFUSERS_BUILD_CUDA=1" in cuda.load_error()


def test_compiled_module_exports_the_expected_functions():
    """If scripts/check_cuda_build.py built the extension here, it imports and exposes what cuda.py calls."""
    built = sorted((ROOT / "build" / "cuda_check").glob(f"{cuda.EXTENSION_NAME}*.so"))
    if not built:
        pytest.skip("the extension is not built here (scripts/check_cuda_build.py builds it; needs nvcc)")
    spec = importlib.util.spec_from_file_location(cuda.EXTENSION_NAME, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert all(callable(getattr(module, name, None)) for name in cuda.EXPECTED_FUNCTIONS)
