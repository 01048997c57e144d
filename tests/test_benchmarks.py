"""The GPU benchmarks' CPU-side logic (sizes, byte model, skip rules) and the GPU check script's summary."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scan_bench_byte_model():
    bench = load_benchmark("bench_cuda_scan")
    sizes = bench.bytes_moved(batch=2, channels=640, gates=80, height=1024, width=512, element=2)
    tokens = 2 * 1024 * 512
    assert sizes["forward"] == 2 * (tokens * (4 * 640 + 12 * 80) + 5 * 640)
    assert sizes["backward"] == 2 * tokens * (7 * 640 + 24 * 80)
    assert sizes["forward_backward"] == sizes["forward"] + sizes["backward"]


def test_scan_bench_reference_skip_rules():
    bench = load_benchmark("bench_cuda_scan")
    gib = 2**30
    # First shape: measured unless its temporaries take more than half the free memory.
    assert bench.predict_reference(None, 1000, 64, 80 * gib, 20.0) == (None, None)
    _, reason = bench.predict_reference(None, 2 * 1024 * 512 * 640, 1536, 80 * gib, 20.0)
    assert reason and "GiB" in reason
    # Later shapes: scaled from the last measured one by elements or scan lines, whichever grew more.
    seconds, reason = bench.predict_reference((1000, 64, 2.0), 4000, 128, 80 * gib, 20.0)
    assert seconds == pytest.approx(8.0) and reason is None
    seconds, reason = bench.predict_reference((1000, 64, 2.0), 2000, 1280, 80 * gib, 20.0)
    assert seconds == pytest.approx(40.0) and "predicted" in reason


def test_scan_bench_cli():
    bench = load_benchmark("bench_cuda_scan")
    args = bench.parse_args([])
    assert [bench.parse_shape(s) for s in args.shapes] == [
        (1280, 32, 32),
        (640, 64, 64),
        (640, 128, 128),
        (320, 256, 256),
        (640, 1024, 512),
    ]
    assert args.gate_divisors == [1, 8] and args.batch == 2 and args.dtype == "bf16"
    args = bench.parse_args(["--shapes", "640:64x64", "--peak-gbps", "3350", "--out", "somewhere"])
    assert args.peak_gbps == 3350 and args.out == Path("somewhere")
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "320:64x64", "--gate-divisors", "3"])
    with pytest.raises(SystemExit, match="C:HxW"):
        bench.parse_shape("640-64x64")


def test_hires_unet_bench_sizes_and_windows():
    bench = load_benchmark("bench_hires_unet")
    args = bench.parse_args(["--sizes", "16384x8192", "1024x512"])
    assert args.sizes == [(64, 128), (1024, 2048)]  # latent (H, W), smallest first
    # DemoFusion's 128x128 windows at stride 64 over a 2048x1024 latent: 15 x 31 windows, 16 per call.
    assert bench.window_calls(1024, 2048, 16) == math_ceil(15 * 31, 16)
    assert bench.window_calls(128, 128, 16) == 1
    assert bench.predicted_seconds((64 * 128, 0.5), 4 * 64 * 128) == pytest.approx(2.0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "1000x510"])


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("name", ["bench_cuda_scan", "bench_hires_unet"])
def test_gpu_benchmarks_say_they_need_a_gpu(name, tmp_path):
    bench = load_benchmark(name)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_gpu_check_writes_a_summary_when_out_of_time(tmp_path):
    """With no time left every step is skipped, and summary.json still names each step and the commit."""
    env = {
        **os.environ,
        "GSPN_CHECK_SECONDS": "0",
        "GSPN_GIT_COMMIT": "given-commit",  # used where the tree has no .git
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["wheels", "build", "pytest", "bench", "tiles", "hires"]
    assert all(s["status"].startswith("skipped") for s in summary["steps"])
    assert summary["git_commit"] == "given-commit" or len(summary["git_commit"]) == 40
    assert summary["torch"] == torch.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "summary.json"]


def test_tile_sweep_times_the_kernel_itself_at_each_tile():
    """The sweep calls the binding directly (no reference fallback inside the op), with the op's argument order: on
    the host emulation it matches the fused reference at every tile, and a tile the kernel refuses raises."""
    from gspn_diffusers.ops import cuda, extension, gspn_scan_fused_reference

    if cuda.find_cuda_home() is None:
        pytest.skip("the emulation needs the CUDA headers (nvcc's toolkit), which this machine lacks")
    module = extension.load_emulation()
    assert module is not None, extension.load_error("emulation")
    bench = load_benchmark("bench_cuda_scan")
    gen = torch.Generator().manual_seed(0)
    b, h, w, c = 1, 5, 6, 16
    inputs = (
        torch.randn(b, h, w, c, generator=gen),
        torch.rand(b, h, w, c, generator=gen) + 0.1,
        torch.randn(b, h, w, 4, 3, c, generator=gen),
        torch.rand(b, h, w, c, generator=gen),
        torch.rand(4, c, generator=gen),
        torch.rand(c, generator=gen),
    )
    expected = gspn_scan_fused_reference(*inputs, None, True)
    for tile in (0, 1, 4, 16):
        torch.testing.assert_close(bench.forward_at_tile(module, inputs, tile)(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="power of two"):
        bench.forward_at_tile(module, inputs, 3)()


def test_cpu_meter_times_and_reads_resident_memory():
    """The dry run's meter: wall-clock milliseconds, and a peak that a large allocation raises and a reset lowers."""
    from gspn_diffusers.benchmarking import GIB, CpuMeter, call_seconds_and_memory, median_ms

    meter = CpuMeter()
    assert meter.name == "cpu (dry run)" and meter.device.type == "cpu"
    assert 15.0 <= median_ms(meter, lambda: time.sleep(0.02), warmup=1, repeats=3) < 1000.0
    size = 256 * 2**20

    def allocate():
        torch.ones(size, dtype=torch.uint8)  # touched pages: resident, then freed

    seconds, peak_gib, before_gib = call_seconds_and_memory(meter, allocate, repeats=1)
    assert seconds > 0 and peak_gib - before_gib >= 0.9 * size / GIB
    meter.reset_peak()
    assert meter.peak_bytes() < meter.allocated_bytes() + size // 2
    assert meter.free_bytes() > 0


def test_the_benchmarks_time_through_the_meter_only():
    """No torch.cuda timing or memory call of their own: what the dry run executes is what the GPU run executes."""
    for name in ("bench_cuda_scan", "bench_hires_unet"):
        tree = ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())
        calls = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "cuda"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "torch"
        }
        assert calls == {"is_available"}, (name, calls)  # only to refuse a GPU run without a GPU


def test_patch_parallel_bench_quick_run(tmp_path):
    """The patch-parallel benchmark end to end (2 gloo processes, --quick): its counted bytes equal the model, sync
    is exact, stale beats naive, and the SD-XL rows carry the fields the README quotes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_patch_parallel.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "patch_parallel.json").read_text())
    measured = {(e["attention"], e["mode"]): e for e in result["measured_n2"]}
    for entry in measured.values():
        for kind in ("exact", "stale", "naive"):
            if f"bytes_{kind}_call" in entry:
                assert entry[f"bytes_{kind}_call"] == entry[f"model_{kind}_call"], (entry["mode"], kind)
    for attention in ("gspn", "softmax"):
        assert measured[attention, "sync"]["latent_max_abs_error"] < 1e-4
        stale, naive = (measured[attention, mode]["latent_mean_abs_error"] for mode in ("stale", "naive"))
        assert stale < naive / 3, (attention, stale, naive)
    for row in result["sdxl_model"]:
        assert row["ratio_attn1_layers_kv_value_lines"] == pytest.approx(2 * row["ratio_attn1_layers_kv"])
        assert row["estimated_nccl_ms"]
    assert {r["world_size"] for r in result["sdxl_gspn_band_layer_memory"]} == {2, 4, 8}
    for name in ("patch_parallel_bytes.png", "patch_parallel_row_error.png"):
        assert (tmp_path / name).stat().st_size > 1000
