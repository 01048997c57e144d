"""save_gspn / load_gspn: round trip, only GSPN keys, clear errors for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_pipe
from safetensors.torch import load_file, save_file

import gspn_diffusers
from gspn_diffusers import GSPNConfig
from gspn_diffusers.serialization import CONFIG_NAME, WEIGHTS_NAME
from gspn_diffusers.tiny import tiny_pipeline


def _perturb(pipe):
    """Give the GSPN weights non-default values, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gspn_diffusers.gspn_parameters(pipe).values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_round_trip_reproduces_outputs_exactly(tiny_kind, tmp_path):
    pipe = tiny_pipeline(tiny_kind)
    pipe.set_progress_bar_config(disable=True)
    gspn_diffusers.convert(pipe, GSPNConfig(gate_rank=2, layer_chunk_sizes={"up_blocks.*": 3}))
    _perturb(pipe)
    expected = run_pipe(pipe, 64, 128)
    gspn_diffusers.save_gspn(pipe, tmp_path)

    other = tiny_pipeline(tiny_kind)
    other.set_progress_bar_config(disable=True)
    gspn_diffusers.load_gspn(other, tmp_path)
    np.testing.assert_array_equal(run_pipe(other, 64, 128), expected)
    assert gspn_diffusers.is_converted(other)


def test_only_gspn_keys_are_saved(tmp_path):
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    gspn_diffusers.save_gspn(pipe, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert keys == set(gspn_diffusers.gspn_parameters(pipe))
    assert all(".attn1.processor." in k for k in keys)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert document["config"]["preset"] == "sd15" and len(document["layers"]) == 7


def test_trained_projections_are_saved_and_restored(tmp_path):
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"), GSPNConfig(train_projections=True))
    _perturb(pipe)
    gspn_diffusers.save_gspn(pipe, tmp_path)
    assert any(k.endswith("attn1.to_k.weight") for k in load_file(tmp_path / WEIGHTS_NAME))
    other = gspn_diffusers.load_gspn(tiny_pipeline("sd15"), tmp_path)
    for name, p in gspn_diffusers.gspn_parameters(other).items():
        assert torch.equal(p, gspn_diffusers.gspn_parameters(pipe)[name]), name


def test_load_errors_are_clear(tmp_path):
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gspn_diffusers.load_gspn(tiny_pipeline("sd15"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not converted"):
        gspn_diffusers.save_gspn(tiny_pipeline("sd15"), tmp_path / "x")

    good = gspn_diffusers.save_gspn(pipe, tmp_path / "good")
    with pytest.raises(ValueError, match="different UNet architecture"):
        gspn_diffusers.load_gspn(tiny_pipeline("sdxl"), good)

    missing = gspn_diffusers.save_gspn(pipe, tmp_path / "missing")
    (missing / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} is missing"):
        gspn_diffusers.load_gspn(tiny_pipeline("sd15"), missing)

    shapes = gspn_diffusers.save_gspn(pipe, tmp_path / "shapes")
    state = load_file(shapes / WEIGHTS_NAME)
    key = next(k for k in state if k.endswith("merge"))
    state[key] = torch.zeros(3, 3)
    save_file(state, shapes / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"Shape mismatch for {key}"):
        gspn_diffusers.load_gspn(tiny_pipeline("sd15"), shapes)

    keys = gspn_diffusers.save_gspn(pipe, tmp_path / "keys")
    state = load_file(keys / WEIGHTS_NAME)
    state.pop(key)
    save_file(state, keys / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="1 missing keys"):
        gspn_diffusers.load_gspn(tiny_pipeline("sd15"), keys)

    other_config = gspn_diffusers.convert(tiny_pipeline("sd15"), GSPNConfig(gate_rank=2))
    with pytest.raises(ValueError, match="different GSPN config"):
        gspn_diffusers.load_gspn(other_config, good)
