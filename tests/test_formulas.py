"""Tests that pin the distillation's formulas: each fails if its formula changes.

Every expected value here is computed by hand (numbers in the test, or an independent re-derivation),
not by calling the code under test a second time.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention
from PIL import Image

from gspn_diffusers.attention import to_gspn_attention
from gspn_diffusers.distill.conditioning import drop_captions, drop_embeddings, drop_mask
from gspn_diffusers.distill.data import ImageCaptionDataset, ImageRecord, resize_and_crop
from gspn_diffusers.distill.losses import LossWeights, combine_losses, convert_prediction, diffusion_target
from gspn_diffusers.distill.train import optimizer_step
from gspn_diffusers.module import GSPNModule
from gspn_diffusers.ops import DIRECTIONS, NUM_GATES, gspn_scan_fused_reference


def _fixed_terms():
    student = torch.full((1, 1, 2, 2), 1.0)
    teacher = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[3.0, 1.0], [1.0, 1.0]]]])  # MSE(student, target) = 4 / 4 = 1
    features_s = {"a": torch.ones(2), "b": torch.full((3,), 3.0)}
    features_t = {"a": torch.zeros(2), "b": torch.ones(3)}  # per-layer MSE: a = 1, b = 4
    return student, teacher, target, features_s, features_t


def test_every_loss_term_and_the_total_on_fixed_tensors():
    losses = combine_losses(*_fixed_terms(), LossWeights())
    assert {k: v.item() for k, v in losses.items()} == {
        "target": 1.0,
        "teacher": 1.0,
        "feature": 2.5,  # mean of 1 and 4
        "loss": 1.0 + 0.5 * 1.0 + 0.5 * 2.5,
    }
    summed = combine_losses(*_fixed_terms(), LossWeights(teacher=0.25, feature=0.1, feature_reduction="sum"))
    assert summed["feature"].item() == 5.0
    assert summed["loss"].item() == pytest.approx(1.0 + 0.25 * 1.0 + 0.1 * 5.0)


def test_teacher_prediction_converted_to_the_students_type():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 900])
    a = scheduler.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().reshape(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    torch.testing.assert_close(
        convert_prediction(scheduler, eps, x_t, t, "epsilon", "v_prediction"), v, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(convert_prediction(scheduler, v, x_t, t, "v_prediction", "epsilon"), eps)
    torch.testing.assert_close(
        convert_prediction(scheduler, eps, x_t, t, "epsilon", "sample"), x0, rtol=1e-4, atol=1e-3
    )
    assert convert_prediction(scheduler, eps, x_t, t, "epsilon", "epsilon") is eps
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    torch.testing.assert_close(diffusion_target(v_scheduler, x0, eps, t), v)


def test_gspn_processor_against_a_hand_computation():
    torch.manual_seed(0)
    channels, height, width = 16, 3, 4
    attn = Attention(query_dim=channels, heads=2, dim_head=8, residual_connection=True, rescale_output_factor=2.0)
    processor = GSPNModule(channels, gate_rank=2, gate_channels=8, chunk_size=None)
    torch.nn.init.normal_(processor.gate_up.weight, std=0.5)  # zero at init: make the gates matter
    torch.nn.init.normal_(processor.gate_up.bias, std=0.5)
    torch.nn.init.normal_(processor.skip, std=0.5)
    to_gspn_attention(attn, processor)
    processor.latent_size = (height, width)
    x = torch.randn(2, height * width, channels)
    with torch.no_grad():
        out = attn(x)

        def spatial(t):
            return t.reshape(2, height, width, -1)

        v = spatial(attn.to_v(x))
        lam = F.softplus(spatial(attn.to_k(x)))
        u = torch.sigmoid(spatial(attn.to_q(x)))
        gates = processor.gate_up(processor.gate_down(x)).reshape(2, height, width, len(DIRECTIONS), NUM_GATES, 8)
        scanned = gspn_scan_fused_reference(v, lam, gates, u, processor.merge, processor.skip, None, normalize=True)
        expected = attn.to_out[0](scanned.reshape(2, height * width, channels))
        expected = (expected + x) / 2.0
    torch.testing.assert_close(out, expected)


def _solid(width: int, height: int, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), rgb)


def test_pixels_are_scaled_to_minus_one_one(tmp_path):
    _solid(64, 64, (0, 255, 51)).save(tmp_path / "a.png")
    record = ImageRecord("c", "a.png", tmp_path / "a.png")
    pixels = ImageCaptionDataset([record], 64, center_crop=True)[0]["pixel_values"]
    assert pixels.shape == (3, 64, 64)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert torch.equal(pixels, pixels[:, :1, :1].expand_as(pixels))


def test_crop_corner_under_a_flip_is_the_corner_in_the_flipped_image():
    """Diffusers' SD-XL trainer flips, then crops, and records that crop's corner: the same here."""
    y, x = np.mgrid[0:64, 0:128]
    image = Image.fromarray(np.stack([x * 2, y * 4, (x + y) % 256], axis=-1).astype(np.uint8))  # 128 wide
    seed = 3
    rng = random.Random(seed)  # the draw order: top (in 0..0), then left
    rng.randint(0, 0)
    left_unflipped = rng.randint(0, 64)
    crop, size, (top, left) = resize_and_crop(image, 64, center_crop=False, flip=True, rng=random.Random(seed))
    assert size == (64, 128) and top == 0
    assert left == 128 - left_unflipped - 64
    flipped = np.asarray(image)[:, ::-1]
    np.testing.assert_array_equal(np.asarray(crop), flipped[:, left : left + 64])
    assert left != left_unflipped  # the seed gives an off-centre crop, so the two conventions differ


def test_caption_dropout_at_a_fractional_rate():
    torch.manual_seed(0)
    mask = drop_mask(20000, 0.3)
    assert abs(mask.float().mean().item() - 0.3) < 0.015
    torch.manual_seed(1)
    captions = [f"c{i}" for i in range(1000)]
    dropped = drop_captions(captions, 0.25)
    assert all(d in ("", c) for d, c in zip(dropped, captions, strict=True))
    assert 200 < dropped.count("") < 300
    torch.manual_seed(2)
    embeddings = {"prompt_embeds": torch.ones(400, 3, 2), "pooled": torch.ones(400, 2)}
    unconditional = {"prompt_embeds": torch.zeros(1, 3, 2), "pooled": torch.zeros(1, 2)}
    out = drop_embeddings(embeddings, unconditional, 0.5)
    rows = out["prompt_embeds"].flatten(1)
    assert set(rows.sum(1).tolist()) == {0.0, 6.0}  # whole rows replaced, never parts
    assert torch.equal(rows.sum(1) == 0, out["pooled"].sum(1) == 0)  # prompt and pooled dropped together
    assert 150 < int((rows.sum(1) == 0).sum()) < 250


def test_gradient_clipping_is_applied():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1, bias=False)
    frozen = torch.nn.Linear(2, 1)
    frozen.requires_grad_(False)
    model.frozen = frozen  # a frozen parameter has no gradient and does not count
    model.weight.data.zero_()
    optimizer = torch.optim.SGD([model.weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0)
    torch.testing.assert_close(model.weight.data, torch.tensor([[-0.6, -0.8]]))
    assert model.weight.grad is None
    model.weight.grad = torch.tensor([[0.3, 0.4]])  # norm 0.5: below the limit, unchanged
    optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0)
    torch.testing.assert_close(model.weight.data, torch.tensor([[-0.9, -1.2]]))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
