"""The top-level pipelines/ files work as Diffusers community pipelines (custom_pipeline= a local file path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import dynamic_modules_utils

from gspn_diffusers import convert, is_converted
from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline
from gspn_diffusers.tiny import tiny_pipeline

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.parametrize(
    ("kind", "file_name", "expected"),
    [
        ("sdxl", "gspn_demofusion_sdxl.py", GSPNDemoFusionSDXLPipeline),
        ("sd15", "gspn_demofusion_sd15.py", GSPNDemoFusionPipeline),
    ],
)
def test_custom_pipeline_file_loads_and_generates_above_native_size(tmp_path, monkeypatch, kind, file_name, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    tiny_pipeline(kind).save_pretrained(tmp_path / "model")

    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "model", custom_pipeline=str(PIPELINES / file_name), trust_remote_code=True
    )
    assert type(pipe) is expected
    assert (tmp_path / "modules").is_dir()  # Diffusers copied the file there, not into the user's cache
    convert(pipe)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a lighthouse",
        height=128,
        width=256,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        return_stages=True,
    )
    assert is_converted(pipe)
    assert out.images.shape[1:3] == (128, 256)
    assert len(out.stage_images) == 2  # the base image at the native size (128x64), then one 2x stage
