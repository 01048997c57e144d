"""ControlNet under patch parallelism (gloo, 2 processes, tiny models, one thread each).

The ControlNet runs on each process's band of the latent and of the control image (8x finer: its conditioning
embedding convolves at pixel resolution) and hands the band UNet call band-local residuals. ``sync`` must give the
single-process latent, for Diffusers' ControlNet pipelines (softmax and GSPN UNets, GSPN ControlNet, a
MultiControlNetModel, a CFG split) and the high-resolution pipeline; ``stale`` must stay far closer to it than
``naive``. The ControlNets' zero convolutions are made non-zero, so the control image moves the output (checked).
"""

from __future__ import annotations

import pytest
from patch_parallel_cases import build_pipe, pipe_key, run_case, spawn

SYNC_TOL = 1e-4


def _case(name: str, **settings) -> dict:
    """A case of Diffusers' SD-1.5 ControlNet pipeline, in sync mode, 96x64 px, 3 steps, unless ``settings`` say."""
    return dict(name=name, kind="sd15", controlnet="one", mode="sync", height=96, width=64, steps=3) | settings


HIRES = dict(hires=True, height=128, width=256, steps=4)
SYNC_CASES = [
    _case("sd15_attn_cn", height=104),
    _case("sd15_gspn_cn", gspn=True, width=72),
    _case("sdxl_gspn_cn", kind="sdxl", gspn=True),
    _case("sd15_attn_multi", controlnet="multi"),
    _case("sd15_attn_cn_hires", **HIRES),
    _case("sd15_gspn_cn_hires", gspn=True, **HIRES),
    _case("sd15_attn_cn_hires_windows", local="windows", **HIRES),  # windows run whole everywhere, ControlNet too
    _case("sd15_gspn_cn_cfg", gspn=True, split_cfg=True),
    # guess mode: the ControlNet sees the conditional batch alone; the UNet halves its zero-padded residuals
    _case("sd15_attn_cn_guess_cfg", split_cfg=True, guess_mode=True),
]
STALE_CASES = [
    _case(f"sd15_{attn}_cn_{mode}", gspn=attn == "gspn", mode=mode, steps=10, warmup=2)
    for attn in ("gspn", "attn")
    for mode in ("stale", "naive")
]
FAILURE_CASES = [
    # the UNet alone is parallelized: the pipeline's ControlNet hands it whole-image residuals
    _case("whole_residuals", height=64, steps=2, unet_only=True),
    # guess mode, CFG split, two images: the ControlNet's halved conditional batch, zero-padded, fits no half
    _case("guess_cfg_two_images", steps=2, split_cfg=True, guess_mode=True, images=2),
]


@pytest.fixture(scope="module")
def pipes(one_thread):
    cache = {}

    def get(case):
        key = pipe_key(case)
        if key not in cache:
            cache[key] = build_pipe(*key)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def references(pipes):
    return {case["name"]: run_case(pipes(case), case) for case in SYNC_CASES + STALE_CASES}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return spawn(2, SYNC_CASES + STALE_CASES + FAILURE_CASES, tmp_path_factory.mktemp("two"))


def _error(results, references, name):
    return (results[0][name]["latent"] - references[name]).abs()


@pytest.mark.parametrize("case", SYNC_CASES, ids=[c["name"] for c in SYNC_CASES])
def test_the_control_image_moves_the_output(pipes, references, case):
    """Otherwise the sync tests could not tell a wrong band of the control image from the right one."""
    off = run_case(pipes(case), dict(case, control_scale=0.0))
    moved = (references[case["name"]] - off).abs().mean().item()
    print(f"{case['name']}: mean abs latent change by the control image {moved:.4g}")
    assert moved > 0.05


@pytest.mark.parametrize("case", SYNC_CASES, ids=[c["name"] for c in SYNC_CASES])
def test_sync_with_controlnet_equals_single_process(two, references, case):
    name = case["name"]
    err = _error(two, references, name).max().item()
    print(f"{name}: max abs latent error {err:.3g}")
    assert err < SYNC_TOL, f"{name}: max abs latent error {err:.3g}"
    for rank_results in two:  # every process ends with the same latent; the UNet and ControlNet are restored
        assert (rank_results[name]["latent"] == two[0][name]["latent"]).all()
        assert rank_results[name]["restored"]
    controlnet_calls = [c for c in two[0][name]["calls"] if c["model"].startswith("controlnet")]
    assert controlnet_calls
    if not case.get("split_cfg"):  # a CFG split of 2 processes: one band per half, nothing to exchange
        assert all(c["bytes_sent"] > 0 for c in controlnet_calls)


@pytest.mark.parametrize("attn", ["gspn", "attn"])
def test_stale_with_controlnet_is_far_closer_than_naive(two, references, attn):
    stale = _error(two, references, f"sd15_{attn}_cn_stale").mean().item()
    naive = _error(two, references, f"sd15_{attn}_cn_naive").mean().item()
    print(f"{attn}: mean abs latent error stale {stale:.4g}, naive {naive:.4g}, ratio {naive / stale:.1f}")
    assert stale < naive / 3
    calls = two[0][f"sd15_{attn}_cn_stale"]["calls"]
    assert [c["model"] for c in calls[:2]] == ["controlnet", "unet"]  # once per step, before the UNet
    assert all(c["exact"] for c in calls[:4]) and not any(c["exact"] for c in calls[4:])


def test_cfg_split_with_bands_and_controlnet_equals_single_process(pipes, tmp_path):
    """4 processes: two CFG groups of two bands each; the ControlNet's half goes to the same group's UNet."""
    case = dict(SYNC_CASES[1], name="sd15_gspn_cn_cfg_bands", split_cfg=True)
    reference = run_case(pipes(case), case)
    results = spawn(4, [case], tmp_path)
    err = (results[0][case["name"]]["latent"] - reference).abs().max().item()
    print(f"{case['name']}: max abs latent error {err:.3g}")
    assert err < SYNC_TOL
    assert any(c["bytes_sent"] > 0 for c in results[0][case["name"]]["calls"] if c["model"] == "controlnet")


def test_whole_image_residuals_are_refused_on_every_process(two):
    for rank_results in two:
        error = rank_results["whole_residuals"]["error"]
        assert rank_results["whole_residuals"]["type"] == "ParallelConfigError"
        assert "down_block_additional_residuals[0] is 8x8" in error and "has 4 rows" in error
        assert "the pipeline's own controlnet" in error
        guess = rank_results["guess_cfg_two_images"]
        assert guess["type"] == "ParallelConfigError" and "run without split_cfg" in guess["error"]
