"""GSPN weights from the hub like PEFT adapters: ``load_gspn("org/name")`` resolved offline from a hub cache laid
out in a temporary folder (HF_HUB_OFFLINE=1, as in every test)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import run_pipe
from huggingface_hub import constants

import gspn_diffusers
from gspn_diffusers.cli import main
from gspn_diffusers.errors import GSPNFileNotFoundError
from gspn_diffusers.hub import CONFIG_NAME, WEIGHTS_NAME, looks_like_repo_id
from gspn_diffusers.tiny import tiny_pipeline

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub reads (its cache folder is resolved at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _publish(cache, repo_id: str, folder, files=(CONFIG_NAME, WEIGHTS_NAME, "README.md")):
    """Lay out ``folder``'s files as the hub cache does after a download: snapshots/<rev>/ and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(folder / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def published(tmp_path, hub_cache):
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    gspn_diffusers.convert(pipe, gspn_diffusers.GSPNConfig(gate_rank=2))
    for param in gspn_diffusers.gspn_parameters(pipe).values():
        param.data.add_(0.1)
    gspn_diffusers.save_gspn(pipe, tmp_path / "local")
    _publish(hub_cache, "org/sd15-gspn", tmp_path / "local")
    return pipe


def test_load_gspn_from_a_hub_repo_offline(published):
    other = tiny_pipeline("sd15")
    other.set_progress_bar_config(disable=True)
    gspn_diffusers.load_gspn(other, "org/sd15-gspn")
    np.testing.assert_array_equal(run_pipe(other), run_pipe(published))


def test_generate_with_hub_weights(tmp_path, published):
    image = tmp_path / "hub.png"
    argv = ["generate", "--tiny", "sd15", "--gspn-weights", "org/sd15-gspn", "--prompt", "x", "--steps", "1"]
    assert main([*argv, "--height", "64", "--width", "64", "--output", str(image)]) == 0
    assert image.is_file()


def test_missing_repo_or_files_are_clear(tmp_path, hub_cache):
    target = tiny_pipeline("sd15")
    with pytest.raises(GSPNFileNotFoundError, match="no such repo in the Hugging Face cache"):
        gspn_diffusers.load_gspn(target, "org/absent")
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    gspn_diffusers.save_gspn(pipe, tmp_path / "local")
    _publish(hub_cache, "org/config-only", tmp_path / "local", files=(CONFIG_NAME,))
    with pytest.raises(GSPNFileNotFoundError, match=f"has no {WEIGHTS_NAME}: it is not a GSPN checkpoint"):
        gspn_diffusers.load_gspn(target, "org/config-only")
    assert not gspn_diffusers.is_converted(target)


def test_repo_ids_and_paths_are_told_apart():
    assert looks_like_repo_id("org/name") and looks_like_repo_id("my-org/sd15_gspn.v2")
    for path in ("./org/name", "/abs/name", "a/b/c", "~/w", "name", "../x", "org/"):
        assert not looks_like_repo_id(path), path
