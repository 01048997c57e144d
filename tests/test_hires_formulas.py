"""The formulas of the high-resolution pipeline against values computed by hand: each test fails on a one-line
change of its formula (a dropped term, a swapped operand, an off-by-one in the schedule), not only on a crash."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import gspn_diffusers
from gspn_diffusers.convert import gspn_config_of
from gspn_diffusers.pipelines import GSPNDemoFusionPipeline
from gspn_diffusers.pipelines.budget import SAFETY_MARGIN, memory_budget
from gspn_diffusers.pipelines.denoising import StageSettings, TextConditioning
from gspn_diffusers.pipelines.memory import GSPN_BACKENDS, LATENT_BUFFERS, estimate_stage_peak
from gspn_diffusers.pipelines.stages import cosine_factor, cosine_weight
from gspn_diffusers.tiny import tiny_pipeline

GIB = 2**30


# ----------------------------------------------------------------------------- memory budget


def test_cuda_budget_is_the_margin_of_free_plus_the_cache_pytorch_holds_unused(monkeypatch):
    """free 10 GiB, reserved 7, allocated 3: 0.85 * (10 + (7 - 3)) = 11.9 GiB. Forgetting the cache (8.5), taking
    reserved or allocated alone (14.45 / 11.05), swapping them (5.1) or the total (71.4) all give other numbers."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * GIB)
    assert SAFETY_MARGIN == 0.85
    assert memory_budget(torch.device("cuda"), None) == pytest.approx(11.9 * GIB, rel=1e-12)
    assert memory_budget(torch.device("cuda:0"), 5 * GIB) == 5 * GIB  # the user's limit wins, even on CUDA
    assert memory_budget(torch.device("cpu"), None) is None


# ----------------------------------------------------------------------------- activations x CFG batch


@pytest.fixture(scope="module")
def tiny_sdxl_unet_config() -> dict:
    return dict(tiny_pipeline("sdxl").unet.config)


@pytest.mark.parametrize("backend", GSPN_BACKENDS)
@pytest.mark.parametrize("gspn", [True, False])
@pytest.mark.parametrize("mode,dilated", [("whole", False), ("whole", True), ("windows", False), ("windows", True)])
def test_stage_activations_scale_with_the_cfg_batch(tiny_sdxl_unet_config, backend, gspn, mode, dilated):
    """Batched CFG (2 samples per view) holds exactly twice the activations of split CFG (1); the stage loop's
    latent buffers do not depend on it. Holds for every GSPN backend and the original attention."""
    gspn_config = gspn_diffusers.GSPNConfig.from_preset("sdxl") if gspn else None
    height, width = 24, 40
    buffers = LATENT_BUFFERS * 4 * height * width * 4  # fp32

    def activations(cfg_batch: int) -> int:
        peak = estimate_stage_peak(
            tiny_sdxl_unet_config,
            height,
            width,
            torch.float32,
            backend,
            mode,
            gspn_config=gspn_config,
            view_batch_size=3,
            cfg_batch=cfg_batch,
            dilated=dilated,
        )
        return peak - buffers

    single = activations(1)
    assert single > 0
    assert activations(2) == pytest.approx(2 * single, rel=1e-9)
    assert activations(4) == pytest.approx(4 * single, rel=1e-9)


def test_windows_estimate_scales_with_the_windows_per_call_up_to_the_number_of_windows(tiny_sdxl_unet_config):
    """A 24x40 latent has 2 x 4 = 8 native (16x16) windows at stride 8: 3 per call hold 3x one window's activations,
    and asking for 16 per call holds 8 (there are no more)."""
    config = gspn_diffusers.GSPNConfig.from_preset("sdxl")
    buffers = LATENT_BUFFERS * 4 * 24 * 40 * 4

    def activations(views: int) -> int:
        return (
            estimate_stage_peak(
                tiny_sdxl_unet_config,
                24,
                40,
                torch.float32,
                "kernel",
                "windows",
                gspn_config=config,
                view_batch_size=views,
                cfg_batch=2,
                dilated=False,
            )
            - buffers
        )

    one = activations(1)
    assert activations(3) == pytest.approx(3 * one, rel=1e-9)
    assert activations(16) == pytest.approx(8 * one, rel=1e-9)


# ----------------------------------------------------------------------------- DemoFusion's cosine factor


def test_cosine_factor_at_both_ends_of_the_schedule():
    """(1 + cos(pi (T - t) / T)) / 2 with T = 1000: t = T - 1 gives (1 + cos(pi / 1000)) / 2 = 1 - sin^2(pi / 2000)
    = 0.99999753..., t = 0 gives exactly 0, t = T / 2 gives 1/2."""
    assert cosine_factor(999, 1000) == pytest.approx(1 - math.sin(math.pi / 2000) ** 2, rel=1e-14)
    assert cosine_factor(999, 1000) == pytest.approx(0.9999975326, abs=1e-10)
    assert cosine_factor(torch.tensor(0), 1000) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(500, 1000) == pytest.approx(0.5, abs=1e-15)
    assert cosine_factor(250, 1000) == pytest.approx((1 - math.sqrt(0.5)) / 2, rel=1e-12)  # cos(3 pi / 4)
    assert cosine_weight(0.5, 3.0) == 0.125 and cosine_weight(0.5, None) == 0.0


def test_skip_residual_of_one_step_against_a_hand_computation():
    """Two DDIM steps (t = 801, 601) of one stage on the whole latent, no dilated branch: the first UNet input is
    the clean latent re-noised to 801; the second is ``(1 - c1) z + c1 (sqrt(a) x0 + sqrt(1 - a) eps)`` with z the
    latent after step 1, a = alphas_cumprod[601], eps the stage's noise and c1 = ((1 + cos(pi 399 / 1000)) / 2)^3."""
    base = tiny_pipeline("sd15")
    gspn_diffusers.convert(base)
    pipe = GSPNDemoFusionPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    clean = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(5))
    embeds, negative = pipe.encode_prompt("a lighthouse", "cpu", 1, True, None)
    settings = StageSettings(
        guidance_scale=5.0,
        local_denoising="whole",
        view_batch_size=1,
        stride=8,
        cosine_scale_1=3.0,
        cosine_scale_2=None,
        cosine_scale_3=1.0,
        sigma=0.8,
        split_cfg=False,
        forward_chunking=False,
        final_size=(128, 256),
    )
    timesteps = pipe.stage_timesteps(5, 1.0, torch.device("cpu"))[:2]
    assert timesteps.tolist() == [801, 601]
    inputs, after_step = [], []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: inputs.append(a[0][:1].clone()))

    def callback(p, i, t, tensors):
        after_step.append(tensors["latents"].clone())
        return tensors

    pipe.denoise_stage(
        clean,
        timesteps,
        TextConditioning(negative),
        TextConditioning(embeds),
        settings,
        torch.Generator().manual_seed(7),
        {},
        callback,
    )
    handle.remove()
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    alphas = pipe.scheduler.alphas_cumprod
    torch.testing.assert_close(inputs[0], alphas[801].sqrt() * clean + (1 - alphas[801]).sqrt() * eps)
    c1 = (0.5 * (1 + math.cos(math.pi * 399 / 1000))) ** 3
    assert 0.28 < c1 < 0.29
    expected = (1 - c1) * after_step[0] + c1 * (alphas[601].sqrt() * clean + (1 - alphas[601]).sqrt() * eps)
    torch.testing.assert_close(inputs[1], expected)


@pytest.mark.parametrize("split_cfg,expected", [(False, 4), (True, 2)])
def test_the_stage_plan_is_estimated_for_the_batch_each_unet_call_holds(monkeypatch, split_cfg, expected):
    """Two images with CFG: a batched call holds 2 x 2 samples per view, split CFG 2; the memory plan must ask the
    estimate for exactly that (a plan for fewer samples overcommits the device)."""
    from gspn_diffusers.pipelines import planning

    seen = []

    def estimate(config, height, width, dtype, backend, mode, **kwargs):
        seen.append((height, width, kwargs["cfg_batch"]))
        return 0

    monkeypatch.setattr(planning, "estimate_stage_peak", estimate)
    pipe = GSPNDemoFusionPipeline.from_pipe(tiny_pipeline("sd15"))
    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a lighthouse",
        height=128,
        width=256,
        num_inference_steps=2,
        strength=0.5,
        num_images_per_prompt=2,
        split_cfg=split_cfg,
        max_memory=2**40,
        output_type="latent",
    )
    assert seen and set(seen) == {(16, 32, expected)}


def test_estimating_a_converted_unet_rebuilds_its_plain_architecture_quietly():
    """The estimate traces a meta copy of the UNet from its config; a GSPN UNet's config also names its GSPN config,
    which Diffusers would report to the user as an unexpected attribute on every ``generate``."""
    from gspn_diffusers.pipelines.tracing import meta_unet

    pipe = tiny_pipeline("sd15")
    gspn_diffusers.convert(pipe)
    config = gspn_config_of(pipe.unet)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers.configuration_utils")
    diffusers_logger.addHandler(handler)
    try:
        unet = meta_unet(dict(pipe.unet.config), config, torch.float32)
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "not expected" in r.getMessage()]
    assert gspn_diffusers.is_converted(unet) and unet.device.type == "meta"
