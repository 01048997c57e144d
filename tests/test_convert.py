"""Conversion of tiny SD-1.5 / SD-XL pipelines: every attn1 is GSPN, attn2 untouched, reversible."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import run_pipe
from diffusers.models.attention_processor import Attention

import gspn_diffusers
from gspn_diffusers import GSPNAttnProcessor, GSPNConfig
from gspn_diffusers.convert import self_attention_layers
from gspn_diffusers.tiny import tiny_pipeline


def test_every_attn1_is_gspn_and_attn2_untouched(tiny_pipe):
    attn2_before = {n: m.processor for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2")}
    gspn_diffusers.convert(tiny_pipe)
    attns = {n: m for n, m in tiny_pipe.unet.named_modules() if isinstance(m, Attention)}
    attn1 = {n: m for n, m in attns.items() if n.endswith("attn1")}
    assert attn1 and all(isinstance(m.processor, GSPNAttnProcessor) for m in attn1.values())
    for name, processor in attn2_before.items():
        assert attns[name].processor is processor
        assert not isinstance(processor, GSPNAttnProcessor)
    assert len(gspn_diffusers.gspn_modules(tiny_pipe)) == len(attn1)


def test_pretrained_projections_are_reused(tiny_pipe):
    before = {n: copy.deepcopy(m.state_dict()) for n, m in self_attention_layers(tiny_pipe.unet).items()}
    gspn_diffusers.convert(tiny_pipe)
    for name, attn in self_attention_layers(tiny_pipe.unet).items():
        for proj in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(attn, proj).weight, before[name][f"{proj}.weight"])
        assert torch.equal(attn.to_out[0].weight, before[name]["to_out.0.weight"])


@pytest.mark.parametrize("height,width", [(64, 64), (64, 128), (128, 64), (72, 40)])
def test_converted_pipeline_generates_any_aspect_ratio(tiny_pipe, height, width):
    gspn_diffusers.convert(tiny_pipe)
    seen = set()

    def record(module, args, kwargs):
        seen.add(module.gspn.latent_size)

    for attn in self_attention_layers(tiny_pipe.unet).values():
        attn.register_forward_pre_hook(record, with_kwargs=True)
    image = run_pipe(tiny_pipe, height, width)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all()
    # Each transformer level sees exactly its latent size (not a guess from the token count).
    levels = {(-(-height // 8 // 2**i), -(-width // 8 // 2**i)) for i in range(3)}
    assert seen and seen <= levels, (seen, levels)


def test_gspn_changes_the_output_and_restore_is_bit_identical(tiny_pipe):
    reference = run_pipe(tiny_pipe, 64, 128)
    gspn_diffusers.convert(tiny_pipe)
    converted = run_pipe(tiny_pipe, 64, 128)
    assert not np.allclose(converted, reference)
    gspn_diffusers.restore(tiny_pipe)
    assert not gspn_diffusers.is_converted(tiny_pipe)
    restored = run_pipe(tiny_pipe, 64, 128)
    np.testing.assert_array_equal(restored, reference)
    assert not any(".gspn." in k for k in tiny_pipe.unet.state_dict())


def test_local_and_global_layers_follow_the_config():
    pipe = tiny_pipeline("sd15")
    config = GSPNConfig(chunk_size=None, layer_chunk_sizes={"down_blocks.0.*": 3, "up_blocks.1.*": 2})
    gspn_diffusers.convert(pipe, config)
    for name, processor in gspn_diffusers.gspn_modules(pipe).items():
        expected = 3 if name.startswith("down_blocks.0.") else 2 if name.startswith("up_blocks.1.") else None
        assert processor.chunk_size == expected, name


def test_presets_are_picked_from_the_architecture(tiny_pipe, tiny_kind):
    gspn_diffusers.convert(tiny_pipe)
    assert gspn_diffusers.convert.__module__  # the package exposes the function itself
    from gspn_diffusers.convert import gspn_config_of

    assert gspn_config_of(tiny_pipe).preset == tiny_kind


def test_gradients_reach_gspn_parameters_only_where_expected():
    pipe = tiny_pipeline("sd15")
    gspn_diffusers.convert(pipe, GSPNConfig(gate_channels=8))
    unet = pipe.unet
    params = gspn_diffusers.gspn_parameters(unet)
    assert params and all(".gspn." in k for k in params)
    sample = torch.randn(1, 4, 8, 16)
    out = unet(sample, 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    out.square().mean().backward()
    for name, p in params.items():
        assert p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for p in params.values())
    with_proj = gspn_diffusers.gspn_parameters(unet, include_projections=True)
    assert any(k.endswith("to_q.weight") for k in with_proj)


def test_bad_inputs_raise_clear_errors(tiny_pipe):
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        gspn_diffusers.convert(tiny_pipe.vae)
    with pytest.raises(ValueError, match="not converted"):
        gspn_diffusers.restore(tiny_pipe)
    gspn_diffusers.convert(tiny_pipe)
    with pytest.raises(ValueError, match="already converted"):
        gspn_diffusers.convert(tiny_pipe)
    with pytest.raises(ValueError, match="divisible by 8"):
        run_pipe(tiny_pipe, 60, 64)
    with pytest.raises(ValueError, match="Unknown GSPN preset"):
        GSPNConfig.from_preset("sd3")
    with pytest.raises(ValueError, match="chunk size"):
        GSPNConfig(chunk_size=0)
    attn = next(iter(self_attention_layers(tiny_pipe.unet).values()))
    with pytest.raises(RuntimeError, match="latent height and width"):
        attn.gspn.latent_size = None
        GSPNAttnProcessor()(attn, torch.randn(1, 16, attn.to_v.in_features))


def test_deep_copy_of_a_converted_unet_runs_on_its_own_processors():
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    twin = copy.deepcopy(pipe.unet)
    sample, text = torch.randn(1, 4, 8, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(sample, 10, text).sample, pipe.unet(sample, 10, text).sample)
    assert all(p.latent_size is not None for p in gspn_diffusers.gspn_modules(twin).values())
