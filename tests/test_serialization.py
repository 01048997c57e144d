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
from gspn_diffusers.errors import GSPNFileExistsError, GSPNUserError
from gspn_diffusers.serialization import CONFIG_NAME, WEIGHTS_NAME, check_gspn
from gspn_diffusers.tiny import tiny_pipeline


def _perturb(pipe):
    """Give the GSPN weights non-default values, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gspn_diffusers.gspn_parameters(pipe).values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _processors(pipe) -> dict[str, int]:
    """attn processor object ids by layer: equal before and after means nothing was swapped in or left behind."""
    return {name: id(proc) for name, proc in pipe.unet.attn_processors.items()}


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
    assert all(".attn1.gspn." in k for k in keys)
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
    target = tiny_pipeline("sd15")
    before = _processors(target)
    with pytest.raises(ValueError, match=f"gspn_weights.safetensors: shape mismatch for {key}"):
        gspn_diffusers.load_gspn(target, shapes)
    # The failed load converted first, then found the bad shape: the pipe is back exactly as it was.
    assert not gspn_diffusers.is_converted(target) and _processors(target) == before

    keys = gspn_diffusers.save_gspn(pipe, tmp_path / "keys")
    state = load_file(keys / WEIGHTS_NAME)
    state.pop(key)
    save_file(state, keys / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="1 missing keys"):
        gspn_diffusers.load_gspn(tiny_pipeline("sd15"), keys)

    other_config = gspn_diffusers.convert(tiny_pipeline("sd15"), GSPNConfig(gate_rank=2))
    with pytest.raises(ValueError, match="different GSPN config"):
        gspn_diffusers.load_gspn(other_config, good)


def _edit_config(directory, edit) -> None:
    document = json.loads((directory / CONFIG_NAME).read_text())
    edit(document)
    (directory / CONFIG_NAME).write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("config"), "has no 'config' object"),
        (lambda d: d["config"].update(gate_rank="four"), "field 'gate_rank' must be a positive integer; got 'four'"),
        (lambda d: d["config"].update(normalize="false"), "field 'normalize' must be true or false"),
        (lambda d: d["config"].update(chunk_size=0), "field 'chunk_size' must be null or a positive chunk size"),
        (lambda d: d["config"]["layer_chunk_sizes"].update({"up_blocks.*": 2.5}), "layer_chunk_sizes\\['up_blocks"),
        (lambda d: d.update(layers=[1, 2]), "has no 'layers' object"),
    ],
)
def test_bad_config_names_the_file_and_the_field(tmp_path, edit, message):
    saved = gspn_diffusers.save_gspn(gspn_diffusers.convert(tiny_pipeline("sd15")), tmp_path)
    _edit_config(saved, edit)
    target = tiny_pipeline("sd15")
    with pytest.raises(GSPNUserError, match=message) as info:
        gspn_diffusers.load_gspn(target, saved)
    assert CONFIG_NAME in str(info.value)
    assert not gspn_diffusers.is_converted(target)


def test_config_types_are_checked_in_code_too():
    with pytest.raises(ValueError, match="'use_skip' must be true or false"):
        GSPNConfig(use_skip="yes")
    with pytest.raises(ValueError, match="'gate_rank' must be a positive integer; got True"):
        GSPNConfig(gate_rank=True)
    assert GSPNConfig(chunk_size=8, layer_chunk_sizes={"up_*": None}).chunk_size_for("up_blocks.0") is None


def test_truncated_weights_are_named_and_leave_the_pipe_alone(tmp_path):
    saved = gspn_diffusers.save_gspn(gspn_diffusers.convert(tiny_pipeline("sd15")), tmp_path)
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    target = tiny_pipeline("sd15")
    with pytest.raises(GSPNUserError, match=f"{WEIGHTS_NAME} is not a readable safetensors file.*truncated"):
        gspn_diffusers.load_gspn(target, saved)
    assert not gspn_diffusers.is_converted(target)


def test_save_refuses_to_replace_weights_unless_asked(tmp_path):
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    gspn_diffusers.save_gspn(pipe, tmp_path)
    first = (tmp_path / WEIGHTS_NAME).read_bytes()
    _perturb(pipe)
    with pytest.raises(GSPNFileExistsError, match="already holds GSPN weights .*pass overwrite=True"):
        gspn_diffusers.save_gspn(pipe, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == first
    gspn_diffusers.save_gspn(pipe, tmp_path, overwrite=True)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() != first
    # Written under temporary names and renamed: nothing else is left in the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])


def test_model_card_beside_the_weights(tmp_path):
    pipe = gspn_diffusers.convert(tiny_pipeline("sdxl"), GSPNConfig(gate_rank=2))
    gspn_diffusers.save_gspn(
        pipe,
        tmp_path,
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        training={"dataset": "laion-169k", "steps": 20000},
        metrics={"FID": 21.5},
    )
    card = (tmp_path / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: gspn-diffusers" in meta and "base_model: stabilityai/stable-diffusion-xl-base-1.0" in meta
    assert "- gspn" in meta and "- stable-diffusion-xl" in meta
    assert '"gate_rank": 2' in card and "- steps: 20000" in card and "- FID: 21.5" in card
    bare = gspn_diffusers.save_gspn(gspn_diffusers.convert(tiny_pipeline("sd15")), tmp_path / "bare")
    card = (bare / "README.md").read_text()
    assert "base_model:" not in card and "not distilled" in card and "Not measured." in card


def test_a_foreign_readme_is_kept(tmp_path, caplog):
    """A folder that holds no GSPN checkpoint but has its own README.md keeps it; our own card is replaced."""
    (tmp_path / "README.md").write_text("# my project\n")
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    gspn_diffusers.save_gspn(pipe, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my project\n"
    assert "Kept the existing README.md" in caplog.text
    (tmp_path / "README.md").unlink()
    gspn_diffusers.save_gspn(pipe, tmp_path, overwrite=True)
    gspn_diffusers.save_gspn(pipe, tmp_path, overwrite=True, training={"steps": 7})
    assert "- steps: 7" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(
    ("repo_id", "message"),
    [(None, "needs repo_id"), ("bad id!", "not a valid hub repo id"), ("org/name", "HF_HUB_OFFLINE is set")],
)
def test_push_to_hub_arguments_are_checked_before_writing(tmp_path, repo_id, message):
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    with pytest.raises(GSPNUserError, match=message):
        gspn_diffusers.save_gspn(pipe, tmp_path / "out", push_to_hub=True, repo_id=repo_id)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("part", [CONFIG_NAME, WEIGHTS_NAME])
def test_a_folder_holding_part_of_a_checkpoint_counts_as_a_checkpoint(tmp_path, part):
    """Half a checkpoint (a crash, a copy cut short) is still someone's: refused without overwrite, replaced with."""
    (tmp_path / part).write_text("half")
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    with pytest.raises(GSPNFileExistsError, match="already holds GSPN weights"):
        gspn_diffusers.save_gspn(pipe, tmp_path)
    assert (tmp_path / part).read_text() == "half"
    gspn_diffusers.save_gspn(pipe, tmp_path, overwrite=True)
    assert check_gspn(tmp_path) == tmp_path  # a whole, readable checkpoint now


def test_model_card_names_no_hub_base_model_for_a_local_folder(tmp_path, monkeypatch):
    """A base loaded from a folder is not a hub model: the card's YAML must not claim one (the hub would link it),
    even when the folder's relative path looks like ``org/name``."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    for base in ("org/name", str(tmp_path / "org" / "name")):
        card = (
            gspn_diffusers.save_gspn(pipe, tmp_path / "w", base_model=base, overwrite=True) / "README.md"
        ).read_text()
        assert "base_model:" not in card.split("---")[1]
        assert f"`{base}`" in card  # still named in the text
    card = gspn_diffusers.save_gspn(pipe, tmp_path / "w", base_model="org/hub-model", overwrite=True) / "README.md"
    assert "base_model: org/hub-model" in card.read_text().split("---")[1]


def test_an_interrupted_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    """Ctrl-C after the new weights are written but before the config is: nothing of the new save is in place."""
    pipe = gspn_diffusers.convert(tiny_pipeline("sd15"))
    gspn_diffusers.save_gspn(pipe, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        next(iter(gspn_diffusers.gspn_modules(pipe).values())).merge.add_(1.0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gspn_diffusers.serialization.json.dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gspn_diffusers.save_gspn(pipe, tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries left either
