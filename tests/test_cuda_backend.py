"""The CUDA backend's loader and policy on a machine without a GPU (the kernel itself: test_cuda_kernel.py)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gspn_diffusers.ops import cuda, cuda_build, extension, gspn_scan_fused, gspn_scan_fused_reference, policy

ROOT = Path(__file__).resolve().parents[1]


def test_sources_exist_and_flags_name_the_archs():
    assert [Path(p).name for p in cuda.source_paths()] == list(cuda_build.SOURCES)
    cxx, nvcc = cuda_build.compile_flags("8.0;9.0")
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc and "-gencode=arch=compute_90,code=sm_90" in nvcc
    assert "-gencode=arch=compute_90,code=compute_90" in nvcc  # PTX for newer GPUs
    with pytest.raises(ValueError, match="compute capabilities"):
        cuda_build.arch_flags("sm_90")


@pytest.fixture
def fresh_loader(monkeypatch):
    """Nothing loaded or failed yet, and no warning given yet."""
    monkeypatch.setattr(extension, "_modules", {})
    monkeypatch.setattr(extension, "_errors", {})
    monkeypatch.setattr(policy, "_warned", set())


def small_fused_case():
    gen = torch.Generator().manual_seed(0)
    x, lam = torch.randn(1, 3, 4, 2, generator=gen), torch.rand(1, 3, 4, 2, generator=gen)
    return x, lam, torch.randn(1, 3, 4, 4, 3, 2, generator=gen), torch.rand(1, 3, 4, 2), torch.rand(4)


def test_cpu_tensors_use_the_reference_without_building(monkeypatch, fresh_loader):
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "cuda")
    case = small_fused_case()
    out = gspn_scan_fused(*case, normalize=True)
    torch.testing.assert_close(out, gspn_scan_fused_reference(*case, normalize=True))
    assert not extension._modules and not extension._errors  # nothing was built or imported


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path, fresh_loader):
    """A kernel that cannot be built says why, once, and the reference runs inside the same op."""
    monkeypatch.setitem(sys.modules, "gspn_diffusers._C", None)  # no ahead-of-time build either
    monkeypatch.setattr(extension, "CSRC_DIR", tmp_path)  # a checkout without csrc/
    assert extension.load_extension() is None
    assert "GSPN_DIFFUSERS_BUILD_CUDA=1" in extension.load_error()
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "emulation")
    case = small_fused_case()
    with pytest.warns(UserWarning, match="kernel emulation is not available .*Error"):
        out = gspn_scan_fused(*case, normalize=True)
    torch.testing.assert_close(out, gspn_scan_fused_reference(*case, normalize=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per cause
        gspn_scan_fused(*case, normalize=True)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "triton")
    with pytest.raises(ValueError, match="GSPN_DIFFUSERS_BACKEND='triton' is not valid; use one of auto, reference"):
        gspn_scan_fused(*small_fused_case())


def test_compiled_module_exports_the_expected_functions():
    """If scripts/check_cuda_build.py built the extension here, it imports and exposes what cuda.py calls."""
    built = sorted((ROOT / "build" / "cuda_check").glob(f"{cuda.EXTENSION_NAME}*.so"))
    if not built:
        pytest.skip("the extension is not built here (scripts/check_cuda_build.py builds it; needs nvcc)")
    spec = importlib.util.spec_from_file_location(cuda.EXTENSION_NAME, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert all(callable(getattr(module, name, None)) for name in cuda.EXPECTED_FUNCTIONS)


@pytest.mark.parametrize(
    "sm,archs,covered",
    [
        (90, [75, 80, 86, 89, 90], True),
        (87, [75, 80, 86, 89, 90], True),  # sm_86 machine code runs on sm_87
        (100, [75, 80, 86, 89, 90], True),  # PTX of sm_90, compiled by the driver
        (70, [75, 80, 86, 89, 90], False),  # V100: older than every arch in the build
        (75, [80, 90], False),  # T4 against a build without sm_75
        (86, [80], True),
    ],
)
def test_arch_coverage_of_a_build(sm, archs, covered):
    assert policy.arch_covered(sm, archs) is covered


def test_reference_fallback_of_an_empty_block_returns_a_new_state(monkeypatch, fresh_loader):
    """An empty block passes the carried state through; run by the reference inside the custom op (here: no
    emulation build), its final state and the state's gradient must be new tensors, not the inputs (custom ops
    may not return an input)."""
    monkeypatch.setitem(extension._errors, "emulation", "not built in this test")
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "emulation")
    x, lam = torch.zeros(1, 3, 0, 2), torch.zeros(1, 3, 0, 2)
    gates = torch.zeros(1, 3, 0, 3, 2)
    state = torch.randn(1, 3, 2, requires_grad=True)
    with pytest.warns(UserWarning, match="not available"):
        h, final = cuda.kernel_scan(x, lam, gates, "left_to_right", initial_state=state, return_final_state=True)
    assert h.shape == x.shape and final is not state
    torch.testing.assert_close(final, state)
    grad = torch.randn(1, 3, 2)
    final.backward(grad)
    torch.testing.assert_close(state.grad, grad)
