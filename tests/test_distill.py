"""The distillation trainer on tiny models and tiny datasets written here in every supported layout."""

from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reset_accelerate, run_pipe
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from gspn_diffusers import GSPNConfig, convert, gspn_parameters, load_gspn, save_gspn
from gspn_diffusers.cli import main as cli_main
from gspn_diffusers.convert import gspn_config_of
from gspn_diffusers.distill.args import parse_args
from gspn_diffusers.distill.conditioning import drop_captions, prepare_inputs, sdxl_time_ids, text_conditioning
from gspn_diffusers.distill.data import ImageCaptionDataset, UnreadableReport, collate
from gspn_diffusers.distill.layouts import find_records
from gspn_diffusers.distill.losses import FeatureRecorder, LossWeights, diffusion_target, distillation_losses
from gspn_diffusers.distill.records import DatasetLayoutError
from gspn_diffusers.distill.train import main
from gspn_diffusers.serialization import WEIGHTS_NAME
from gspn_diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")  # conftest.py

RESOLUTION = 64
SIZES = [(96, 64), (64, 80), (72, 72), (128, 64), (64, 64), (80, 112)]  # (width, height): several aspect ratios
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


def sample_images() -> list[tuple[Image.Image, str]]:
    """Real images: colour gradients with a shape drawn on them, at several aspect ratios."""
    samples = []
    for i, ((width, height), color) in enumerate(zip(SIZES, COLORS, strict=True)):
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        shape = draw.ellipse if i % 2 else draw.rectangle
        shape((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=color)
        samples.append((image, f"a {color} {'circle' if i % 2 else 'square'} on a gradient"))
    return samples


def _encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


CORRUPT = {"truncated": None, "garbage": b"this is not an image"}


def write_webdataset(root: Path, corrupt: bool = False) -> Path:
    """img2dataset's webdataset output: two shards of KEY.jpg / KEY.txt / KEY.json."""
    root.mkdir(parents=True)
    samples = sample_images()
    entries = [(f"{i:09d}", _encoded(image), caption) for i, (image, caption) in enumerate(samples)]
    if corrupt:  # one broken file in each shard, never adjacent to another
        entries.insert(1, ("900000000", _encoded(samples[0][0])[:200], "truncated jpeg"))
        entries.insert(5, ("900000001", CORRUPT["garbage"], "not an image"))
    half = len(entries) // 2
    for shard, part in enumerate([entries[:half], entries[half:]]):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for key, data, caption in part:
                meta = json.dumps({"caption": caption, "key": key}).encode()
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (root / f"{shard:05d}_stats.json").write_text("{}")
    return root


def write_files(root: Path) -> Path:
    """img2dataset's files output: 00000/000000000.jpg + .txt."""
    for i, (image, caption) in enumerate(sample_images()):
        folder = root / f"{i // 4:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:09d}.jpg")
        (folder / f"{i:09d}.txt").write_text(caption)
    return root


def write_metadata(root: Path, kind: str) -> Path:
    """A folder of PNG images with metadata.jsonl or metadata.csv (file_name, text)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (image, caption) in enumerate(sample_images()):
        image.save(root / "images" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "text": caption})
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def write_hf(root: Path) -> Path:
    import datasets

    samples = sample_images()
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"picture": [image for image, _ in samples], "caption": [c for _, c in samples]}, features=features
    )
    dataset.save_to_disk(str(root))
    return root


def data_flags(fmt: str, root: Path) -> list[str]:
    if fmt == "webdataset":
        return ["--train_data_dir", str(write_webdataset(root, corrupt=True))]
    if fmt == "files":
        return ["--train_data_dir", str(write_files(root))]
    if fmt in ("jsonl", "csv"):
        return ["--train_data_dir", str(write_metadata(root, fmt))]
    return ["--dataset_name", str(write_hf(root)), "--image_column", "picture", "--caption_column", "caption"]


def train_argv(output_dir: Path, kind: str = "sd15", *extra: str) -> list[str]:
    return [
        "--tiny", kind, "--output_dir", str(output_dir), "--resolution", str(RESOLUTION),
        "--train_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "3e-3", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "100", "--validation_prompts", "--report_to", "none", "--caption_dropout", "0",
        "--gate-rank", "2", "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


def initial_weights(kind: str, directory: Path) -> Path:
    """A freshly converted student, saved: the trainer starts from it (--gspn_weights) and the test measures it."""
    pipe = tiny_pipeline(kind)
    torch.manual_seed(0)
    return save_gspn(convert(pipe, GSPNConfig.from_preset(kind, gate_rank=2)), directory)


def fixed_batch_losses(kind: str, records, weights_dir: Path) -> dict[str, float]:
    """The loss terms of the student saved in ``weights_dir`` on a fixed batch, noise and timesteps."""
    pipe = tiny_pipeline(kind)
    teacher = copy.deepcopy(pipe.unet)
    load_gspn(pipe, weights_dir)
    batch = collate([ImageCaptionDataset(records, RESOLUTION, center_crop=True)[i] for i in range(4)])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    inputs = prepare_inputs(
        pipe, scheduler, batch, RESOLUTION, torch.float32, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        losses = distillation_losses(
            pipe.unet, teacher, FeatureRecorder(pipe.unet), FeatureRecorder(teacher), inputs.noisy_latents,
            inputs.timesteps, inputs.target, inputs.unet_kwargs, LossWeights(),
        )  # fmt: skip
    return {term: value.item() for term, value in losses.items()}


def _records(flags: list[str]):
    if flags[0] == "--train_data_dir":
        return find_records(train_data_dir=flags[1])
    return find_records(dataset_name=flags[1], image_column="picture", caption_column="caption")


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [
        ("webdataset", "sd15"),
        ("files", "sd15"),
        ("jsonl", "sd15"),
        ("csv", "sd15"),
        ("hf", "sd15"),
        ("webdataset", "sdxl"),
    ],
)
def test_a_few_steps_reduce_the_distillation_loss(tmp_path, fmt, kind):
    flags = data_flags(fmt, tmp_path / "data")
    records = _records(flags)
    start = initial_weights(kind, tmp_path / "start")
    before = fixed_batch_losses(kind, records, start)
    result = main(parse_args(train_argv(tmp_path / "out", kind, *flags, "--gspn_weights", str(start))))
    assert result.global_step == 4
    assert set(result.losses) == {"loss", "loss/target", "loss/teacher", "loss/feature"}
    assert all(np.isfinite(v) for v in result.losses.values())
    assert result.images_per_second > 0
    # A whole epoch (8 samples) went by: each broken file of the webdataset was skipped exactly once.
    assert result.skipped_images == (2 if fmt == "webdataset" else 0)
    after = fixed_batch_losses(kind, records, tmp_path / "out")
    assert after["teacher"] < before["teacher"]
    assert after["feature"] < before["feature"]
    assert after["loss"] < before["loss"]


def test_conversion_flags_beside_gspn_weights_are_named_in_the_warning(tmp_path, caplog):
    """The saved config wins; the warning names every flag given as typed, ``--chunk-size global`` (None) too."""
    from accelerate import PartialState

    from gspn_diffusers.distill.models import build_models
    from gspn_diffusers.distill.train import student_config, warn_ignored_config_flags

    PartialState()  # Accelerate's logger needs the state
    start = initial_weights("sd15", tmp_path / "start")
    args = parse_args(
        train_argv(
            tmp_path / "out", "sd15", "--train_data_dir", "x", "--gspn_weights", str(start), "--chunk-size", "global"
        )
    )
    with caplog.at_level(logging.WARNING):
        warn_ignored_config_flags(args)
        pipe, _, _ = build_models(args, torch.float32, torch.device("cpu"), lambda unet: student_config(args, unet))
    assert "--gate-rank, --chunk-size would be ignored" in caplog.text
    assert gspn_config_of(pipe) == GSPNConfig.from_preset("sd15", gate_rank=2)


def test_saved_weights_reproduce_the_student(tmp_path):
    flags = data_flags("jsonl", tmp_path / "data")
    argv = train_argv(tmp_path / "out", "sd15", *flags, "--train_projections", "--use_ema", "--ema_decay", "0.5")
    result = main(parse_args([*argv, "--max_train_steps", "2"]))
    saved = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert any(".attn1.to_q." in key for key in saved), "--train_projections must save the attn1 projections"
    fresh = tiny_pipeline("sd15")
    load_gspn(fresh, tmp_path / "out")
    fresh.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run_pipe(result.pipe), run_pipe(fresh))
    original = tiny_pipeline("sd15")
    original.set_progress_bar_config(disable=True)
    assert not np.allclose(run_pipe(original), run_pipe(fresh)), "the trained student must differ from the teacher"


def _state(checkpoint: Path) -> dict:
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    scheduler = torch.load(checkpoint / "scheduler.bin", weights_only=False)
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    return {
        "optimizer": optimizer,
        "scheduler": scheduler,
        "ema": ema["shadow_params"],
        "ema_step": ema["optimization_step"],
    }


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert a == b


def test_resume_continues_exactly(tmp_path):
    flags = data_flags("files", tmp_path / "data")
    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--use_ema", "--checkpointing_steps", "1"]
    full = tmp_path / "full"
    argv = train_argv(full, "sd15", *flags, *schedule, "--checkpoints_total_limit", "3")
    assert main(parse_args(argv)).global_step == 4
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    reset_accelerate()
    result = main(parse_args([*train_argv(resumed, "sd15", *flags, *schedule), "--resume_from_checkpoint", "latest"]))
    assert result.global_step == 4
    expected, actual = _state(full / "checkpoint-4"), _state(resumed / "checkpoint-4")
    assert actual["ema_step"] == 4
    assert actual["scheduler"]["last_epoch"] == 4
    _assert_same(expected, actual)
    _assert_same(load_file(full / WEIGHTS_NAME), load_file(resumed / WEIGHTS_NAME))
    # Each checkpoint holds the GSPN weights in the save_gspn format (and the EMA weights).
    for name in ("gspn", "gspn_ema"):
        load_gspn(tiny_pipeline("sd15"), resumed / "checkpoint-4" / name)


def test_validation_grid_and_tensorboard(tmp_path):
    flags = data_flags("csv", tmp_path / "data")
    argv = train_argv(tmp_path / "out", "sd15", *flags, "--max_train_steps", "2", "--prediction_type", "v_prediction")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    argv += ["--validation_steps", "1", "--num_validation_inference_steps", "1"]
    argv += ["--gradient_accumulation_steps", "2", "--gradient_checkpointing"]
    argv += ["--validation_prompts", "a red square", "a blue circle"]  # the last occurrence wins
    result = main(parse_args(argv))
    grids = sorted((tmp_path / "out" / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000001.png", "step-0000002.png"]
    grid = np.asarray(Image.open(grids[-1]))
    assert grid.shape == (2 * RESOLUTION, 2 * RESOLUTION, 3)  # two prompts; teacher on top, student below
    assert not np.array_equal(grid[:RESOLUTION], grid[RESOLUTION:])
    np.testing.assert_array_equal(np.asarray(Image.open(grids[0]))[:RESOLUTION], grid[:RESOLUTION])
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    assert np.isfinite(result.losses["loss"])
    # --prediction_type: the pipeline samples with it (the student's) and the teacher row used the original.
    assert result.pipe.scheduler.config.prediction_type == "v_prediction"
    assert tiny_pipeline("sd15").scheduler.config.prediction_type == "epsilon"


def test_feature_loss_gradients_are_the_same_with_gradient_checkpointing():
    """The attn1 outputs are recorded in the forward pass; recomputation during backward must not change them."""
    grads = []
    for checkpointing in (False, True):
        pipe = tiny_pipeline("sd15")
        teacher = copy.deepcopy(pipe.unet)
        torch.manual_seed(0)  # the gate projection is initialised randomly
        convert(pipe, GSPNConfig.from_preset("sd15", gate_rank=2))
        pipe.unet.requires_grad_(False)
        params = gspn_parameters(pipe)
        for param in params.values():
            param.requires_grad_(True)
        if checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        conditioning = text_conditioning(pipe, ["a red square"], torch.device("cpu"))
        recorders = FeatureRecorder(pipe.unet), FeatureRecorder(teacher)
        weights = LossWeights(teacher=0.0, feature=1.0)
        losses = distillation_losses(
            pipe.unet, teacher, *recorders, latents, torch.tensor([500]), latents, conditioning, weights
        )
        losses["feature"].backward()
        grads.append({name: param.grad.clone() for name, param in params.items()})
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_caption_dropout():
    captions = ["a", "b", "c", "d"]
    assert drop_captions(captions, 0.0) == captions
    assert drop_captions(captions, 1.0) == ["", "", "", ""]


def test_v_prediction_target():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    torch.testing.assert_close(
        diffusion_target(scheduler, latents, noise, timesteps), scheduler.get_velocity(latents, noise, timesteps)
    )
    assert diffusion_target(DDPMScheduler(), latents, noise, timesteps) is noise


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    root = write_webdataset(tmp_path / "shards", corrupt=True)
    dataset = ImageCaptionDataset(find_records(train_data_dir=str(root)), RESOLUTION)
    assert len(dataset) == 8
    report = UnreadableReport()
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):  # every epoch skips them again; the log names each file once
            dataset.set_epoch(epoch)
            samples = [dataset[i] for i in range(len(dataset))]
            report.update(collate(samples)["unreadable"])
    assert report.skipped == 6
    assert caplog.text.count("Skipping unreadable image") == 2
    assert "900000000.jpg" in caplog.text and "900000001.jpg" in caplog.text
    assert all(torch.isfinite(s["pixel_values"]).all() and s["pixel_values"].shape == (3, 64, 64) for s in samples)


def test_caption_lists_and_missing_captions(tmp_path, caplog):
    sample_images()[0][0].save(tmp_path / "a.png")
    rows = [
        {"file_name": "a.png", "text": ["one", "two"]},
        {"file_name": "a.png", "text": None},
        {"file_name": "a.png", "text": ["", "three"]},
        {"file_name": "a.png", "text": "  "},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        records = find_records(train_data_dir=str(tmp_path))
    assert len(records) == 2
    assert "2 of the 4 images in" in caplog.text and "have no caption" in caplog.text
    dataset = ImageCaptionDataset(records, RESOLUTION)
    picked = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        picked.add(dataset[0]["caption"])
        assert dataset[1]["caption"] == "three"
    assert picked == {"one", "two"}


def test_data_workers_see_every_new_epoch(tmp_path):
    """Augmentation is drawn per (seed, epoch, index) inside the workers: each epoch's set_epoch must reach them."""
    import argparse

    from gspn_diffusers.distill.data import make_dataloader

    sample_images()[0][0].save(tmp_path / "a.png")
    captions = [f"caption {i}" for i in range(8)]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": captions}) + "\n")
    dataset = ImageCaptionDataset(find_records(train_data_dir=str(tmp_path)), RESOLUTION)
    args = argparse.Namespace(dataloader_num_workers=1, train_batch_size=1, seed=0)
    loader = make_dataloader(args, dataset, collate)
    picked = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        picked += [batch["captions"][0] for batch in loader]
    assert picked == [dataset.set_epoch(epoch) or dataset[0]["caption"] for epoch in range(4)]
    assert len(set(picked)) > 1


def test_images_without_caption_are_counted_in_every_layout(tmp_path, caplog):
    shards = write_webdataset(tmp_path / "shards")
    with tarfile.open(shards / "00000.tar", "a") as tar:  # an image with neither .txt nor .json
        info = tarfile.TarInfo("nocaption.jpg")
        payload = _encoded(sample_images()[0][0])
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    files = write_files(tmp_path / "files")
    sample_images()[1][0].save(files / "00000" / "extra.jpg")
    for root in (shards, files):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert len(find_records(train_data_dir=str(root))) == 6
        assert "have no caption and are left out" in caplog.text, root


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_row_without_a_caption_column_names_file_and_line(tmp_path, kind):
    root = write_metadata(tmp_path / "data", kind)
    if kind == "jsonl":
        lines = (root / "metadata.jsonl").read_text().splitlines()
        lines[2] = json.dumps({"file_name": "images/2.png", "caption": "wrong key"})
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        where = "metadata.jsonl line 3 has no 'text'"
    else:
        (root / "metadata.csv").write_text("file_name\nimages/0.png\n")
        where = "metadata.csv line 2 has no 'text'"
    with pytest.raises(DatasetLayoutError, match=where):
        find_records(train_data_dir=str(root))


def test_sdxl_records_original_size_and_crop(tmp_path):
    image = Image.new("RGB", (128, 64), "white")  # width 128, height 64
    image.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide image")
    sample = ImageCaptionDataset(find_records(train_data_dir=str(tmp_path)), RESOLUTION, center_crop=True)[0]
    assert sample["original_size"].tolist() == [64, 128]
    assert sample["crop_top_left"].tolist() == [0, 32]
    batch = collate([sample, sample])
    time_ids = sdxl_time_ids(batch["original_sizes"], batch["crops_top_left"], RESOLUTION)
    assert time_ids.tolist() == [[64, 128, 0, 32, 64, 64]] * 2
    pipe = tiny_pipeline("sdxl")
    conditioning = text_conditioning(pipe, ["a", ""], torch.device("cpu"), **{
        "original_sizes": batch["original_sizes"], "crops_top_left": batch["crops_top_left"], "resolution": RESOLUTION,
    })  # fmt: skip
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 64)  # both text encoders, concatenated
    assert conditioning["added_cond_kwargs"]["text_embeds"].shape == (2, 32)  # pooled, from text_encoder_2
    assert conditioning["added_cond_kwargs"]["time_ids"].tolist() == time_ids.tolist()
    assert "added_cond_kwargs" not in text_conditioning(tiny_pipeline("sd15"), ["a"], torch.device("cpu"))


def _write_bad_layouts(root: Path) -> dict[str, tuple[dict, str]]:
    """Datasets that cannot be used, each with the phrase its error must contain."""
    (root / "empty").mkdir(parents=True)
    (root / "no_captions").mkdir()
    sample_images()[0][0].save(root / "no_captions" / "a.jpg")
    write_metadata(root / "wrong_columns", "csv")
    (root / "wrong_columns" / "metadata.csv").write_text("path,caption\nimages/0.png,x\n")
    write_metadata(root / "missing_files", "jsonl")
    shutil.rmtree(root / "missing_files" / "images")
    (root / "no_images_tar").mkdir()
    with tarfile.open(root / "no_images_tar" / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("0.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    write_hf(root / "hf")
    return {
        "empty": ({"train_data_dir": str(root / "empty")}, "no images"),
        "no_captions": ({"train_data_dir": str(root / "no_captions")}, "1 images but no .txt caption"),
        "wrong_columns": ({"train_data_dir": str(root / "wrong_columns")}, "line 2 has no 'file_name' or 'text'"),
        "missing_files": ({"train_data_dir": str(root / "missing_files")}, "None of the 6 images listed"),
        "no_images_tar": ({"train_data_dir": str(root / "no_images_tar")}, "No image with a caption"),
        "hf_columns": ({"dataset_name": str(root / "hf")}, "the columns ['image', 'text'] are missing"),
    }


def test_bad_datasets_fail_at_start_with_the_expected_layout(tmp_path):
    for name, (kwargs, phrase) in _write_bad_layouts(tmp_path).items():
        with pytest.raises(DatasetLayoutError) as error:
            find_records(**kwargs)
        assert phrase in str(error.value), name
        assert "Expected one of" in str(error.value), name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_records(train_data_dir=str(tmp_path / "nowhere"))


def test_cli_distill_reports_a_bad_dataset_as_an_error(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    argv = ["distill", *train_argv(tmp_path / "out", "sd15", "--train_data_dir", str(tmp_path / "empty"))]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert "Expected one of" in caplog.text
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main([*argv, "--caption_dropout", "1.5"]) == 2
    assert "--caption_dropout is a probability" in caplog.text
    if importlib.util.find_spec("bitsandbytes") is None:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert cli_main([*argv, "--use_8bit_adam"]) == 2
        assert "pip install bitsandbytes" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def test_two_process_ddp_run_from_the_command_line(tmp_path):
    """The module entry point under torch.distributed (gloo on the CPU): what `accelerate launch` runs on GPUs.

    6 images, batch 1 per process, 2 processes: one epoch is 3 steps per process (counted after the
    loader is sharded, not 6), validation runs on both processes, and each process draws its own noise.
    """
    data = write_files(tmp_path / "data")
    argv = _without(train_argv(tmp_path / "out", "sd15", "--train_data_dir", str(data)), "--max_train_steps")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "gspn_diffusers.distill.train", *argv, "--num_train_epochs", "1", "--checkpointing_steps", "3",
        "--train_batch_size", "1", "--validation_steps", "2", "--num_validation_inference_steps", "1",
        "--validation_prompts", "a red square",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr
    assert "3 steps, 1 epochs of 3 steps" in result.stderr
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert {"random_states_0.pkl", "random_states_1.pkl", "optimizer.bin"} <= {p.name for p in checkpoint.iterdir()}
    states = [torch.load(checkpoint / f"random_states_{i}.pkl", weights_only=False) for i in range(2)]
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
    grids = sorted(p.name for p in (tmp_path / "out" / "validation").glob("*.png"))
    assert grids == ["step-0000002.png", "step-0000003.png"]
    load_gspn(tiny_pipeline("sd15"), tmp_path / "out")
    # Reproducible run to run: the same command again gives the same weights, bit for bit.
    command[command.index("--master_port") + 1] = str(_free_port())
    command[command.index(str(tmp_path / "out"))] = str(tmp_path / "again")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same(load_file(tmp_path / "out" / WEIGHTS_NAME), load_file(tmp_path / "again" / WEIGHTS_NAME))


@pytest.mark.gpu
def test_gpu_bf16_smoke(tmp_path, record_property):
    flags = data_flags("webdataset", tmp_path / "data")
    argv = train_argv(tmp_path / "out", "sdxl", *flags, "--mixed_precision", "bf16", "--gradient_checkpointing")
    argv[argv.index("--max_train_steps") + 1] = "20"
    result = main(parse_args(argv))
    assert result.global_step == 20
    assert all(np.isfinite(v) for v in result.losses.values()), result.losses
    steps_per_second = result.images_per_second / 2
    record_property("steps_per_second", steps_per_second)
    logging.getLogger(__name__).warning("tiny SD-XL bf16 distillation: %.2f steps/s", steps_per_second)
    assert all(torch.isfinite(p).all() for p in load_file(tmp_path / "out" / WEIGHTS_NAME).values())


@pytest.mark.parametrize("layout", ["metadata", "webdataset"])
def test_latent_cache_key_follows_every_image_file(tmp_path, layout):
    """A replaced image in the middle of the dataset (same name, new bytes) gets a new cache folder; an untouched
    dataset keeps its key."""
    from gspn_diffusers.distill.cache import cache_key

    root = write_metadata(tmp_path / "data", "jsonl") if layout == "metadata" else write_webdataset(tmp_path / "data")

    def key() -> str:
        return cache_key("tiny-sd15", ImageCaptionDataset(find_records(str(root)), 64), torch.float32)

    before = key()
    assert key() == before
    if layout == "metadata":
        Image.new("RGB", (40, 24), "red").save(root / "images" / "2.png")  # replaced in place, same name
    else:
        shard = sorted(root.glob("*.tar"))[-1]
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a rewritten shard
    assert key() != before
