"""The gspn-diffusers command line on the built-in tiny models."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from gspn_diffusers.cli import main
from gspn_diffusers.serialization import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_convert_then_generate(tmp_path, kind):
    weights = tmp_path / "weights"
    assert main(["convert", "--tiny", kind, "--output", str(weights), "--gate-rank", "2"]) == 0
    assert (weights / CONFIG_NAME).is_file() and (weights / WEIGHTS_NAME).is_file()
    image_path = tmp_path / "out" / "image.png"
    args = [
        "generate",
        "--tiny",
        kind,
        "--gspn-weights",
        str(weights),
        "--prompt",
        "a lighthouse",
        "--height",
        "64",
        "--width",
        "128",
        "--steps",
        "2",
        "--output",
        str(image_path),
    ]
    assert main(args) == 0
    assert Image.open(image_path).size == (128, 64)


def test_generate_original_attention(tmp_path):
    image_path = tmp_path / "original.png"
    args = [
        "generate",
        "--tiny",
        "sd15",
        "--original",
        "--prompt",
        "x",
        "--height",
        "128",
        "--width",
        "64",
        "--steps",
        "1",
        "--output",
        str(image_path),
    ]
    assert main(args) == 0
    assert Image.open(image_path).size == (64, 128)


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    args = [
        "generate",
        "--tiny",
        "sd15",
        "--gspn-weights",
        str(tmp_path / "missing"),
        "--prompt",
        "x",
        "--output",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    assert "does not exist" in caplog.text
    caplog.clear()
    assert (
        main(
            [
                "generate",
                "--tiny",
                "sd15",
                "--prompt",
                "x",
                "--height",
                "100",
                "--width",
                "64",
                "--output",
                str(tmp_path / "y.png"),
            ]
        )
        == 2
    )
    assert "divisible by 8" in caplog.text
    caplog.clear()
    assert main(["convert", "--model", str(tmp_path / "no_such_model"), "--output", str(tmp_path / "w")]) == 2
    assert "does not exist" in caplog.text
