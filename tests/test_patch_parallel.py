"""Patch parallelism on real torch.distributed (gloo, 2 and 3 processes, tiny models, one thread each).

``sync`` must give the single-process latent; ``stale`` must stay far closer to it than ``naive``; a CFG split is
exact; failures stop every process with one message. Pure functions (band plan, GroupNorm statistics, GSPN band
scans with the true boundary lines) are tested in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from patch_parallel_cases import build_pipe, pipe_key, run_case, spawn

from gspn_diffusers.ops import DIRECTIONS, gspn_scan
from gspn_diffusers.parallel import ParallelConfigError, downsampling_factor, plan_bands
from gspn_diffusers.parallel.gspn import Band, band_scan, edge_pack, vertical_state_needed
from gspn_diffusers.parallel.layers import band_group_stats, combine_stats
from gspn_diffusers.parallel.traffic import call_bytes, layer_inventory, traffic_table

SYNC_TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- in-process
@pytest.mark.parametrize("height,bands,factor", [(64, 2, 8), (100, 3, 8), (13, 3, 2), (9, 4, 2), (128, 8, 4)])
def test_band_plan(height, bands, factor):
    plan = plan_bands(height, 40, bands, factor)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == height
    assert all(edge % factor == 0 for edge in plan.bounds[1:-1])
    groups = [-(-h // factor) for h in plan.heights()]
    assert max(groups) - min(groups) <= 1 and min(groups) >= 1
    for level in range(plan.levels):  # each level's bands tile that level's rows (rows halved, rounded up)
        assert sum(plan.heights(level)) == plan.level_height(level)


def test_band_plan_too_small():
    with pytest.raises(ParallelConfigError, match="cannot be split into 3 bands"):
        plan_bands(16, 16, 3, 8)


def test_group_stats_combine_to_whole_image():
    x = torch.randn(2, 8, 11, 5, dtype=torch.float64) * 3 + 1
    parts = [x[:, :, :4], x[:, :, 4:6], x[:, :, 6:]]
    mean, var = combine_stats([band_group_stats(p, 4) for p in parts])
    whole = x.reshape(2, 4, -1)
    torch.testing.assert_close(mean, whole.mean(-1))
    torch.testing.assert_close(var, whole.var(-1, correction=0))


@pytest.mark.parametrize("chunk", [None, 2, 3, 4])
@pytest.mark.parametrize("bounds", [(0, 4, 8, 11), (0, 2, 6, 11)])
def test_gspn_band_scans_with_true_boundary_lines_equal_the_whole_scan(chunk, bounds):
    torch.manual_seed(0)
    b, h, w, c, g = 2, 11, 5, 6, 3
    x, lam = torch.randn(b, h, w, c, dtype=torch.float64), torch.rand(b, h, w, c, dtype=torch.float64) + 0.1
    gates = [torch.randn(b, h, w, 3, g, dtype=torch.float64) for _ in DIRECTIONS]
    whole = [gspn_scan(x, lam, gt, d, chunk) for gt, d in zip(gates, DIRECTIONS, strict=True)]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        needed = (start > 0 and vertical_state_needed(start, chunk), end < h and vertical_state_needed(end, chunk))
        lines = [s[:, [max(start - 1, 0), min(end, h - 1)]] for s in whole]
        above = edge_pack(lines, 0, "top_to_bottom" if needed[0] else None)
        below = edge_pack(lines, 1, "bottom_to_top" if needed[1] else None)
        band = Band((start, end), h, above if start > 0 else None, below if end < h else None)
        for gt, d, want in zip(gates, DIRECTIONS, whole, strict=True):
            got = band_scan(x[:, start:end], lam[:, start:end], gt[:, start:end], d, chunk, band)
            torch.testing.assert_close(got, want[:, start:end], msg=f"{d} band {start}:{end}")


def test_traffic_table_floor_is_the_value_lines():
    """The exact-exchange floor is the value scan's lines alone: half of what a normalising GSPN layer sends, and the
    ratio to DistriFusion's K/V gather grows with the latent height (band edges stay one line, bands grow)."""
    unet = build_pipe("sd15", True, False).unet
    small, tall = (traffic_table(unet, h, 64, [2, 4], batch=2, element_size=2) for h in (64, 256))
    for row in small + tall:
        assert row["gspn_attn1_bytes"] == 2 * row["gspn_attn1_value_lines_bytes"] > 0
        assert row["attention_attn1_bytes"] > row["gspn_attn1_bytes"]
    ratio = [row["attention_attn1_bytes"] / row["gspn_attn1_value_lines_bytes"] for row in small + tall]
    assert ratio[2] > 3 * ratio[0] and ratio[3] > 3 * ratio[1]


# ---------------------------------------------------------------------- multi-process
SYNC_CASES = [
    dict(name="sd15_attn_odd", kind="sd15", mode="sync", height=104, width=64, steps=3),
    dict(name="sdxl_attn", kind="sdxl", mode="sync", height=96, width=64, steps=3),
    dict(name="sd15_gspn", kind="sd15", gspn=True, mode="sync", height=96, width=72, steps=3),
    dict(name="sdxl_gspn_odd", kind="sdxl", gspn=True, mode="sync", height=104, width=64, steps=3),
    dict(name="sdxl_gspn_hires", kind="sdxl", gspn=True, hires=True, mode="sync", height=128, width=256, steps=4),
    dict(
        name="sd15_attn_hires", kind="sd15", hires=True, mode="sync", height=256, width=128, steps=4, local="windows"
    ),
]
STALE_CASES = [
    dict(
        name=f"{kind}_{attn}_{mode}",
        kind="sd15",
        gspn=attn == "gspn",
        mode=mode,
        height=96,
        width=64,
        steps=10,
        warmup=2,
    )
    for kind in ("sd15",)
    for attn in ("gspn", "attn")
    for mode in ("stale", "naive")
]
HIRES_STALE_CASES = [  # every stage of the high-resolution pipeline after warm-up: whole latent and dilated branch
    dict(
        name=f"sdxl_gspn_hires_{mode}",
        kind="sdxl",
        gspn=True,
        hires=True,
        mode=mode,
        height=128,
        width=256,
        steps=8,
        warmup=2,
    )
    for mode in ("stale", "naive")
]
FAILURE_CASES = [
    dict(name="too_small", kind="sd15", mode="sync", height=32, width=64, steps=2),  # 4 rows = 2 groups
    dict(name="cfg_odd_world", kind="sd15", mode="sync", height=64, width=64, steps=2, split_cfg=True),
]
CFG_CASES = [dict(name="sd15_cfg", kind="sd15", gspn=True, mode="sync", height=96, width=64, steps=3, split_cfg=True)]
CFG_BAND_CASES = [  # 4 processes: two CFG groups of two bands each
    dict(name="sdxl_cfg_bands", kind="sdxl", gspn=True, mode="sync", height=104, width=64, steps=3, split_cfg=True)
]


@pytest.fixture(scope="module")
def references(one_thread):
    refs, pipes = {}, {}
    for case in SYNC_CASES + STALE_CASES + HIRES_STALE_CASES + CFG_CASES + CFG_BAND_CASES:
        key = pipe_key(case)
        pipes.setdefault(key, build_pipe(*key))
        refs[case["name"]] = run_case(pipes[key], case)
    return refs


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return spawn(2, SYNC_CASES + STALE_CASES + HIRES_STALE_CASES + CFG_CASES, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return spawn(3, SYNC_CASES + STALE_CASES + FAILURE_CASES, tmp_path_factory.mktemp("three"))


def _error(results, references, name):
    return (results[0][name]["latent"] - references[name]).abs()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", [c["name"] for c in SYNC_CASES])
def test_sync_equals_single_process(request, references, world, name):
    results = request.getfixturevalue({2: "two", 3: "three"}[world])
    err = _error(results, references, name).max().item()
    assert err < SYNC_TOL, f"{name} on {world} processes: max abs latent error {err:.3g}"
    for rank_results in results:  # every process ends with the same latent, and the UNet is restored
        torch.testing.assert_close(rank_results[name]["latent"], results[0][name]["latent"], rtol=0, atol=0)
        assert rank_results[name]["restored"]
    assert any(call["bytes_sent"] > 0 for call in results[0][name]["calls"])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("attn", ["gspn", "attn"])
def test_stale_is_far_closer_than_naive(request, references, world, attn):
    results = request.getfixturevalue({2: "two", 3: "three"}[world])
    stale = _error(results, references, f"sd15_{attn}_stale").mean().item()
    naive = _error(results, references, f"sd15_{attn}_naive").mean().item()
    print(f"{attn} N={world}: mean abs latent error stale {stale:.4g}, naive {naive:.4g}, ratio {naive / stale:.1f}")
    assert stale < naive / 3
    calls = results[0][f"sd15_{attn}_stale"]["calls"]
    assert [c["exact"] for c in calls[:2]] == [True, True] and not any(c["exact"] for c in calls[2:])


def test_stale_high_res_is_far_closer_than_naive(two, references):
    """Stale exchange on every stage of the high-resolution pipeline: each stage's schedule starts with its own
    exact warm-up, the stale calls follow, and the result stays far closer to one process than naive bands."""
    stale = _error(two, references, "sdxl_gspn_hires_stale").mean().item()
    naive = _error(two, references, "sdxl_gspn_hires_naive").mean().item()
    print(f"high-res GSPN N=2: mean abs latent error stale {stale:.4g}, naive {naive:.4g}, ratio {naive / stale:.1f}")
    assert stale < naive / 3
    exact = [c["exact"] for c in two[0]["sdxl_gspn_hires_stale"]["calls"]]
    assert exact.count(False) > 0 and exact[:2] == [True, True]
    stage_starts = [i for i in range(1, len(exact)) if exact[i] and not exact[i - 1]]
    assert stage_starts, f"the second stage did not start with its own warm-up: {exact}"


@pytest.mark.parametrize("attn", ["gspn", "attn"])
def test_traffic_model_matches_the_counted_bytes(two, attn):
    """The layer-shape model (used for SD-XL at 16384x8192) counts exactly what the communication layer counted."""
    unet = build_pipe("sd15", attn == "gspn", False).unet
    layers = layer_inventory(unet)
    plan = plan_bands(12, 8, 2, downsampling_factor(unet.config))  # the stale cases' 96x64 px latent
    for rank, results in enumerate(two):
        calls = results[f"sd15_{attn}_stale"]["calls"]
        for exact in (True, False):
            call = next(c for c in calls if c["exact"] == exact)
            model = call_bytes(layers, plan, rank, 2, 4, 4, gspn=attn == "gspn", exact=exact)
            assert call["bytes_sent"] == model, (rank, exact)


def test_cfg_split_equals_single_process(two, references):
    err = _error(two, references, "sd15_cfg").max().item()
    assert err < SYNC_TOL


def test_cfg_split_with_bands_equals_single_process(references, tmp_path):
    results = spawn(4, CFG_BAND_CASES, tmp_path)
    err = _error(results, references, "sdxl_cfg_bands").max().item()
    assert err < SYNC_TOL
    for rank_results in results:
        torch.testing.assert_close(rank_results["sdxl_cfg_bands"]["latent"], results[0]["sdxl_cfg_bands"]["latent"])


def test_failures_stop_every_process_with_one_message(three):
    for rank_results in three:
        assert "cannot be split into 3 bands" in rank_results["too_small"]["error"]
        assert "even number of processes" in rank_results["cfg_odd_world"]["error"]


def test_a_failing_process_stops_the_others(tmp_path):
    """Process 1 fails inside the UNet and stays alive (lingers): process 0 stops at once with its message."""
    case = dict(name="fail", kind="sd15", mode="stale", warmup=1, height=64, width=64, steps=3, fail_rank=1, linger=20)
    results = spawn(2, [case], tmp_path, expect_failure=True)
    assert "injected failure" in results[1]["fail"]["error"]
    assert results[0]["fail"]["type"] == "PeerFailedError"
    assert "process 1: RuntimeError: injected failure in conv_in" in results[0]["fail"]["error"]
    assert results[0]["fail"]["seconds"] < 15  # not the 60 s collective timeout, nor the 20 s linger


def _torchrun(nproc: int, *args: str, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if launcher == "accelerate":  # --multi_gpu without GPUs: Accelerate starts torch.distributed.run's processes
        launch = ["accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}"]
    else:
        launch = ["torch.distributed.run", f"--nproc-per-node={nproc}"]
    command = [sys.executable, "-m", *launch, "-m", "gspn_diffusers.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_cli_generate_parallel(tmp_path, launcher):
    out = tmp_path / "img.png"
    run = _torchrun(
        2, "generate", "--tiny", "sd15", "--prompt", "x", "--height", "64", "--width", "64", "--steps", "3",
        "--parallel", "patch", "--warmup-steps", "1", "--output", str(out), launcher=launcher,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.is_file()
    assert run.stderr.count("Saved 64x64 image") == 1  # process 0 saves
    # every process warns (no distilled weights), the others' lines say which process they come from
    assert run.stderr.count("WARNING No --gspn-weights given") == 1
    assert run.stderr.count("WARNING [process 1] No --gspn-weights given") == 1


def test_cli_parallel_failure_is_one_line(tmp_path):
    run = _torchrun(
        3, "generate", "--tiny", "sd15", "--prompt", "x", "--height", "64", "--width", "64", "--steps", "2",
        "--parallel", "cfg", "--output", str(tmp_path / "img.png"),
    )  # fmt: skip
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "even number of processes" in errors[0]  # every process saw it; process 0 says it


def test_cli_parallel_modes_are_the_library_modes():
    from gspn_diffusers.cli_args import PARALLEL_MODES
    from gspn_diffusers.parallel import MODES

    assert PARALLEL_MODES == MODES
