"""Nothing a user owns is lost by the trainer (issue 17): output folders that hold inputs, --overwrite_output_dir,
honest resume (finished runs, older checkpoints, corrupt checkpoints, other settings), damaged data, and failures
that end in one line. One trainer run (module fixture) gives the checkpoints the resume tests work on."""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from diffusers import DDPMScheduler
from PIL import Image
from test_distill import sample_images, train_argv, write_files, write_metadata, write_webdataset

from gspn_diffusers.cli import main as cli_main
from gspn_diffusers.distill.args import parse_args
from gspn_diffusers.distill.cache import COMPLETE_MARKER as CACHE_COMPLETE
from gspn_diffusers.distill.checkpoints import checkpoints, resolve_resume, save_checkpoint
from gspn_diffusers.distill.conditioning import encode_text, prepare_inputs, sample_timesteps
from gspn_diffusers.distill.data import UnreadableReport, check_readable, open_image
from gspn_diffusers.distill.failures import out_of_memory_hint, resume_command
from gspn_diffusers.distill.layouts import find_records
from gspn_diffusers.distill.records import TextEncodingError, UnsafePathError
from gspn_diffusers.distill.run_dir import FINISHED_MARKER, REPLACED_PREFIX, STALE_PREFIX, finished_step, plan_run
from gspn_diffusers.distill.train import check_args, main
from gspn_diffusers.errors import GSPNUserError
from gspn_diffusers.serialization import CONFIG_NAME, WEIGHTS_NAME, save_gspn
from gspn_diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")  # conftest.py

RUN_FLAGS = ("--use_ema", "--checkpointing_steps", "1", "--cache_latents")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """(data, output folder) of a finished 4-step run with a checkpoint every step, EMA and the latent cache,
    written under umask 022. Tests copy the folder (:func:`_copy_run`) before changing it."""
    root = tmp_path_factory.mktemp("finished_run")
    data = write_files(root / "data")
    previous = os.umask(0o022)
    try:
        result = main(parse_args(train_argv(root / "out", "sd15", "--train_data_dir", str(data), *RUN_FLAGS)))
    finally:
        os.umask(previous)
        reset_accelerate()
    assert result.global_step == 4
    return data, root / "out"


def _copy_run(finished_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    data, out = finished_run
    shutil.copytree(out, tmp_path / "out")
    return data, tmp_path / "out"


def _argv(out: Path, data: Path, *extra: str) -> list[str]:
    return train_argv(out, "sd15", "--train_data_dir", str(data), *RUN_FLAGS, *extra)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (what "left untouched" means)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# --- The output folder ----------------------------------------------------------------------------------------


def test_an_output_dir_holding_an_input_is_refused_without_suggesting_overwrite(tmp_path):
    data = write_files(tmp_path / "data")
    weights = save_gspn(_converted(), tmp_path / "run" / "weights")
    cases = {
        "same weights": (["--gspn_weights", str(weights)], weights, "is --gspn_weights"),
        "weights inside": (["--gspn_weights", str(weights)], tmp_path / "run", "holds --gspn_weights"),
        "data inside": ([], tmp_path, "holds --train_data_dir"),
        "inside the data": ([], data / "out", "lies inside --train_data_dir"),
    }
    before = _snapshot(tmp_path)
    for name, (flags, out, phrase) in cases.items():
        for overwrite in ([], ["--overwrite_output_dir"]):
            args = parse_args(train_argv(out, "sd15", "--train_data_dir", str(data), *flags, *overwrite))
            with pytest.raises(GSPNUserError, match="an input of this run") as error:
                check_args(args)
            assert phrase in str(error.value), name
            assert "--overwrite_output_dir" not in str(error.value), name
    assert _snapshot(tmp_path) == before


def _converted():
    from gspn_diffusers import GSPNConfig, convert

    torch.manual_seed(0)
    return convert(tiny_pipeline("sd15"), GSPNConfig.from_preset("sd15", gate_rank=2))


def test_an_output_dir_that_cannot_be_written_is_refused_before_models_load(tmp_path):
    (tmp_path / "a_file").write_text("")
    args = parse_args(train_argv(tmp_path / "a_file" / "out", "sd15", "--train_data_dir", str(tmp_path / "data")))
    with pytest.raises(GSPNUserError, match="--output_dir .* cannot be written"):
        check_args(args)


def test_resume_latest_with_final_weights_and_no_checkpoint_is_refused(tmp_path, caplog):
    out = save_gspn(_converted(), tmp_path / "out")
    argv = train_argv(out, "sd15", "--train_data_dir", str(tmp_path / "data"), "--resume_from_checkpoint", "latest")
    argv = ["distill", *argv]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert "holds final GSPN weights but no usable checkpoint" in caplog.text
    assert f"--gspn_weights {out} with another --output_dir" in caplog.text
    assert "starting a new run" not in caplog.text
    # An empty folder has nothing to lose: `latest` starts a new run there, as in Diffusers' trainers.
    assert (
        check_args(parse_args(train_argv(tmp_path / "new", "sd15", "--resume_from_checkpoint", "latest"))).resume
        is None
    )


def test_overwrite_with_a_bad_dataset_keeps_the_old_run(finished_run, tmp_path, caplog):
    _, out = _copy_run(finished_run, tmp_path)
    (tmp_path / "empty").mkdir()
    before = _snapshot(out)
    argv = ["distill", *_argv(out, tmp_path / "empty", "--overwrite_output_dir")]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert "Expected one of" in caplog.text
    assert _snapshot(out) == before


def test_overwrite_moves_the_old_run_aside_until_the_first_new_checkpoint(finished_run, tmp_path, caplog):
    data, out = _copy_run(finished_run, tmp_path)
    old_weights = (out / WEIGHTS_NAME).read_bytes()
    argv = _argv(out, data, "--overwrite_output_dir", "--max_train_steps", "1", "--learning_rate", "1e-2")
    with caplog.at_level(logging.INFO):
        assert main(parse_args(argv)).global_step == 1
    assert "moved the previous run's results to" in caplog.text
    assert "Removed the replaced run's results" in caplog.text
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"]
    assert not list(out.glob(f"{REPLACED_PREFIX}*"))
    assert (out / WEIGHTS_NAME).read_bytes() != old_weights
    assert finished_step(out) == 1
    assert any(p.name == CACHE_COMPLETE for p in (out / "latent_cache").rglob("*")), "the cache is kept"


def test_ctrl_c_says_what_is_saved_and_how_to_resume(finished_run, tmp_path, caplog, monkeypatch):
    """A real SIGINT mid-run (after --overwrite_output_dir moved the old run aside, before a new checkpoint)."""
    data, out = _copy_run(finished_run, tmp_path)
    argv = _argv(out, data, "--overwrite_output_dir", "--max_train_steps", "200", "--checkpointing_steps", "1000")
    monkeypatch.setattr(sys, "argv", ["distill/train_gspn_distill.py", *argv])

    def interrupt_once_moved_aside() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob(f"{REPLACED_PREFIX}*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_moved_aside, daemon=True)
    thread.start()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        main(parse_args(argv))
    thread.join()
    assert exit_info.value.code == 130
    lines = [r.getMessage() for r in caplog.records if "Interrupted:" in r.getMessage()]
    assert len(lines) == 1 and "no checkpoint was saved yet" in lines[0]
    assert "Resume with: python distill/train_gspn_distill.py" in lines[0]
    assert lines[0].endswith("--resume_from_checkpoint latest") and "--overwrite_output_dir" not in lines[0]
    (aside,) = out.glob(f"{REPLACED_PREFIX}*")
    assert {"checkpoint-4", WEIGHTS_NAME} <= {p.name for p in aside.iterdir()}
    assert f"are kept in {aside}" in caplog.text


def test_resume_command_is_the_same_command_continuing():
    argv = ["train.py", "--output_dir", "o", "--overwrite_output_dir", "--resume_from_checkpoint=checkpoint-2", "-x"]
    assert resume_command(argv) == "python train.py --output_dir o -x --resume_from_checkpoint latest"
    argv = ["/usr/bin/gspn-diffusers", "distill", "--resume_from_checkpoint", "3", "--output_dir", "my run"]
    assert resume_command(argv) == "gspn-diffusers distill --output_dir 'my run' --resume_from_checkpoint latest"


# --- Resume -------------------------------------------------------------------------------------------------------


def test_a_finished_run_resumed_with_its_target_does_nothing(finished_run, tmp_path, caplog):
    data, out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    with caplog.at_level(logging.WARNING):
        result = main(parse_args(_argv(out, data, "--resume_from_checkpoint", "latest")))
    assert result.global_step == 4 and result.pipe is None
    assert "Nothing to train: checkpoint-4 is at step 4, the target is --max_train_steps 4" in caplog.text
    assert _snapshot(out) == before
    # A target below the finished one: nothing to train either (it would have trained past the target before).
    reset_accelerate()
    assert main(parse_args(_argv(out, data, "--resume_from_checkpoint", "2", "--max_train_steps", "2"))).pipe is None
    assert _snapshot(out) == before


def test_resuming_an_older_checkpoint_moves_the_old_timeline_aside(finished_run, tmp_path, caplog):
    data, out = _copy_run(finished_run, tmp_path)
    final_before = (out / WEIGHTS_NAME).read_bytes()
    argv = _argv(
        out, data, "--resume_from_checkpoint", "2", "--max_train_steps", "3", "--checkpoints_total_limit", "2"
    )
    with caplog.at_level(logging.WARNING):
        assert main(parse_args(argv)).global_step == 3
    lines = [r.getMessage() for r in caplog.records if "abandons the later results" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint-3, checkpoint-4, gspn_weights.safetensors" in lines[0]
    # Pruning kept the one resumed from and the new one (by highest step it kept the old 3 and 4 and deleted both).
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    (stale,) = out.glob(f"{STALE_PREFIX}*")
    assert {"checkpoint-3", "checkpoint-4", WEIGHTS_NAME, CONFIG_NAME, FINISHED_MARKER} <= {
        p.name for p in stale.iterdir()
    }
    assert (stale / WEIGHTS_NAME).read_bytes() == final_before
    assert finished_step(out) == 3 and (out / WEIGHTS_NAME).read_bytes() != final_before
    # After a crash `latest` continues this timeline.
    assert resolve_resume("latest", out) == out / "checkpoint-3"


def test_later_checkpoints_are_stale_also_when_resuming_from_one_elsewhere(finished_run, tmp_path):
    _, out = finished_run
    shutil.copytree(out / "checkpoint-2", tmp_path / "copied" / "checkpoint-2")
    plan = plan_run(out, str(tmp_path / "copied" / "checkpoint-2"), overwrite=False)
    assert plan.resume == tmp_path / "copied" / "checkpoint-2" and plan.step == 2
    assert {"checkpoint-3", "checkpoint-4", WEIGHTS_NAME} <= {p.name for p in plan.stale}
    assert plan.finished(4) is None  # the final weights are of the abandoned timeline: train again


def test_a_corrupt_newest_checkpoint_falls_back_or_is_refused(finished_run, tmp_path, caplog):
    data, out = _copy_run(finished_run, tmp_path)
    optimizer = out / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", out) == out / "checkpoint-3"
    assert "checkpoint-4: optimizer.bin is truncated" in caplog.text
    argv = ["distill", *_argv(out, data, "--resume_from_checkpoint", str(out / "checkpoint-4"))]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2  # refused before any model loads
    assert "optimizer.bin is truncated" in caplog.text and "Traceback" not in caplog.text
    # Without the completion marker's file list (an older trainer's checkpoint) the headers still tell.
    weights = out / "checkpoint-3" / "gspn" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8])
    (out / "checkpoint-3" / "checkpoint_complete.json").write_text('{"step": 3}\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("latest", out) == out / "checkpoint-2"
    assert "gspn/gspn_weights.safetensors is corrupt" in caplog.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "checkpoint-4 was saved with --use_ema; pass --use_ema"),
        (["--gate_rank", "4"], "checkpoint-4 was trained with --gate_rank 2, this run asks for 4: pass --gate_rank 2"),
        (["--chunk_size", "8"], "trained with --chunk_size global, this run asks for 8: pass --chunk_size global"),
        (["--train_projections"], "checkpoint-4 was trained without --train_projections; drop --train_projections"),
        (["--resume_from_checkpoint", "checkpoint-9"], "'checkpoint-9': no such checkpoint"),
        (["--resume_from_checkpoint", "DATA"], "no such checkpoint"),
    ],
)
def test_a_resume_with_other_settings_is_refused_before_models_load(finished_run, flags, message):
    data, out = finished_run
    argv = _argv(out, data, "--resume_from_checkpoint", "latest", *[str(data) if f == "DATA" else f for f in flags])
    if not flags:
        argv.remove("--use_ema")
    with pytest.raises(GSPNUserError) as error:
        check_args(parse_args(argv))
    assert message in str(error.value)
    assert "restore()" not in str(error.value)


def test_files_the_trainer_writes_are_readable_by_others(finished_run):
    """Weights, checkpoints and the latent cache get the umask's permissions (0644 under 022), not 0600."""
    _, out = finished_run
    files = [out / WEIGHTS_NAME, *(out / "checkpoint-4").rglob("*"), *(out / "latent_cache").rglob("*")]
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files if p.is_file()}
    assert len(modes) > 10
    assert set(modes.values()) == {"0o644"}, modes


# --- Failures as one line -----------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_names_the_folder_and_keeps_the_others(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 1, limit=None)

    def fill_the_disk(models, weights, output_dir):
        Path(output_dir, "partial.bin").write_bytes(b"x" * 100)
        with open("/dev/full", "wb") as full:  # a real ENOSPC from the kernel
            full.write(b"x" * 100)
            full.flush()

    handle = accelerator.register_save_state_pre_hook(fill_the_disk)
    with pytest.raises(GSPNUserError, match=f"No space left on the disk of {tmp_path}") as error:
        save_checkpoint(accelerator, tmp_path, 2, limit=None)
    handle.remove()
    assert "checkpoint checkpoint-2" in str(error.value) and "--resume_from_checkpoint latest" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # the half-written one is removed
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-1"
    del model


def test_out_of_memory_names_the_flags_that_lower_it():
    args = parse_args(train_argv(Path("out"), "sd15", "--train_data_dir", "x"))
    for allocate in (lambda: torch.empty(2**62, dtype=torch.uint8), lambda: np.empty(2**62, dtype=np.uint8)):
        with pytest.raises(GSPNUserError) as error, out_of_memory_hint(args, [64]):
            allocate()  # a real allocation failure (an exabyte), from torch's allocator and from numpy
        message = str(error.value)
        assert message.startswith("Out of host memory")
        assert "--resolution (now 64)" in message and "--train_batch_size (now 2 per device)" in message
        assert "--gradient_checkpointing" in message and "--mixed_precision bf16" in message
    with pytest.raises(RuntimeError, match="not memory"), out_of_memory_hint(args, [64]):
        raise RuntimeError("not memory")


def test_out_of_memory_in_training_is_one_line(tmp_path, caplog):
    """The whole trainer under an address-space limit (1 GiB above what the process maps), with images too large
    for it: a real MemoryError in the data pipeline, reported as one line with exit status 2."""
    data = write_files(tmp_path / "data")
    argv = train_argv(tmp_path / "out", "sd15", "--train_data_dir", str(data), "--max_train_steps", "1")
    argv[argv.index("--resolution") + 1] = "8192"  # 0.8 GiB of float pixels per image, beside the image itself
    mapped = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, hard))
    try:
        with caplog.at_level(logging.ERROR):
            status = cli_main(["distill", *argv])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert status == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is None and record.getMessage().startswith("Out of host memory")
    assert "--resolution (now 8192)" in record.getMessage()


# --- Data -----------------------------------------------------------------------------------------------------------


def _saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_every_image_mode_becomes_the_right_rgb():
    ramp = np.linspace(0.0, 1.0, 64 * 32).reshape(32, 64)
    expected_grey = np.rint(ramp * 255).astype(np.uint8)
    cases = {
        "16-bit PNG": _saved(Image.fromarray((ramp * 65535).round().astype(np.uint16)), "PNG"),
        "float TIFF": _saved(Image.fromarray(ramp.astype(np.float32)), "TIFF"),
    }
    for name, data in cases.items():
        assert Image.open(io.BytesIO(data)).mode in ("I;16", "I", "F"), name
        rgb = np.asarray(open_image(data))
        assert rgb.shape == (32, 64, 3), name
        np.testing.assert_allclose(rgb[..., 0], expected_grey, atol=1, err_msg=name)
        assert (rgb == 255).mean() < 0.01, name  # PIL's own conversion: 99.6 % white
    wide = Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32))  # beyond 16 bits: its own range
    np.testing.assert_allclose(np.asarray(open_image(_saved(wide, "TIFF")))[..., 1], expected_grey, atol=1)

    red_on_clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    red_on_clear.paste((255, 0, 0, 255), (0, 0, 4, 8))
    rgb = np.asarray(open_image(_saved(red_on_clear, "PNG")))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 7].tolist() == [255, 255, 255]  # clear is white, not black
    grey_alpha = Image.merge("LA", [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)])
    assert np.asarray(open_image(_saved(grey_alpha, "PNG"))).min() == 255
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 255, 0, 0, 0] + [0] * 762)
    assert np.asarray(open_image(_saved(palette, "PNG", transparency=1)))[0, 0].tolist() == [255, 255, 255]
    cyan = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    assert np.asarray(open_image(_saved(cyan, "JPEG", quality=100)))[0, 0].tolist() == pytest.approx(
        [0, 255, 255], abs=3
    )
    assert np.asarray(open_image(_saved(Image.new("1", (4, 4), 1), "PNG"))).min() == 255


def test_a_damaged_shard_is_read_up_to_the_damage_and_reported(tmp_path, caplog):
    root = write_webdataset(tmp_path / "shards")
    shard = root / "00001.tar"
    (root / "00001_stats.json").write_text(json.dumps({"successes": 3}))
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[3]  # the second sample's image
    shard.write_bytes(shard.read_bytes()[: second.offset_data + 100])  # cut inside the second sample's image
    with caplog.at_level(logging.WARNING):
        records = find_records(train_data_dir=str(root))
    assert len(records) == 3 + 1  # the whole first shard, and the sample before the damage
    (lost,) = records.lost
    assert lost.startswith("00001.tar: damaged") and "1 samples read before the damage, 2 lost" in lost
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        UnreadableReport(records.lost).summary(skipped=0)
    assert "Not trained on (damaged shard): 00001.tar" in caplog.text
    # Cut between two samples (no partial member): tar's missing end-of-archive blocks still tell.
    shard.write_bytes(shard.read_bytes()[: second.offset])
    records = find_records(train_data_dir=str(root))
    assert len(records) == 4 and "no tar end-of-archive marker" in records.lost[0]


def test_text_files_are_utf8_with_or_without_bom_or_fail_naming_the_line(tmp_path):
    files = write_files(tmp_path / "files")
    caption = files / "00000" / "000000000.txt"
    caption.write_bytes("\ufeffune photo d'été".encode())
    records = find_records(train_data_dir=str(files))
    assert next(r.caption for r in records if r.where.endswith("000000000.jpg")) == "une photo d'été"
    caption.write_bytes("first line\nune photo d'été".encode("latin-1"))
    with pytest.raises(TextEncodingError, match=r"000000000.txt line 2 is not UTF-8 .*save it as UTF-8"):
        find_records(train_data_dir=str(files))
    for kind, line in (("csv", 3), ("jsonl", 2)):  # the second image's row (csv: after the header)
        root = write_metadata(tmp_path / kind, kind)
        metadata = root / f"metadata.{kind}"
        metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
        assert len(find_records(train_data_dir=str(root))) == 6, kind  # the BOM is not part of the first column
        metadata.write_bytes(metadata.read_bytes()[3:].replace(b"circle", "cercle é".encode("cp1252")))
        with pytest.raises(TextEncodingError, match=rf"metadata.{kind} line {line} is not UTF-8"):
            find_records(train_data_dir=str(root))


def test_metadata_paths_that_leave_the_dataset_are_refused(tmp_path):
    root = write_metadata(tmp_path / "data", "jsonl")
    sample_images()[0][0].save(tmp_path / "outside.png")
    for name in ("../outside.png", str(tmp_path / "outside.png"), "images/../../outside.png"):
        rows = [{"file_name": "images/0.png", "text": "fine"}, {"file_name": name, "text": "escapes"}]
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(UnsafePathError, match="metadata.jsonl line 2: file_name .* leaves the dataset folder"):
            find_records(train_data_dir=str(root))


def test_a_dataset_where_no_image_decodes_fails_at_start(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.jpg").write_bytes(b"not an image")
        (data / f"{i}.txt").write_text("a caption")
    with pytest.raises(GSPNUserError, match="None of the 3 images of the dataset can be decoded"):
        check_readable(find_records(train_data_dir=str(data)))
    argv = ["distill", *train_argv(tmp_path / "out", "sd15", "--train_data_dir", str(data))]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert "can be decoded" in caplog.text and not (tmp_path / "out" / WEIGHTS_NAME).exists()


# --- The timestep distribution ------------------------------------------------------------------------------------


def test_training_timesteps_cover_the_whole_range():
    """Uniform over [0, T): T - 1 and 0 are drawn, T never (an off-by-one either way fails)."""
    drawn = sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert drawn.min() == 0 and drawn.max() == 999
    counts = torch.bincount(drawn, minlength=1000)
    assert counts.shape == (1000,) and counts.min() > 0
    # The same through the batch preparation the loop uses, with a 4-step schedule.
    pipe = tiny_pipeline("sd15")
    scheduler = DDPMScheduler(num_train_timesteps=4)
    embeddings = encode_text(pipe, ["a"], torch.device("cpu"))
    batch = {
        "latent_mean": torch.zeros(256, 4, 8, 8),
        "latent_std": torch.ones(256, 4, 8, 8),
        "prompt_embeds": embeddings["prompt_embeds"].expand(256, -1, -1),
        "original_sizes": torch.full((256, 2), 64),
        "crops_top_left": torch.zeros(256, 2, dtype=torch.long),
    }
    inputs = prepare_inputs(
        pipe, scheduler, batch, 64, torch.float32, generator=torch.Generator().manual_seed(0), unconditional=embeddings
    )
    assert sorted(set(inputs.timesteps.tolist())) == [0, 1, 2, 3]
