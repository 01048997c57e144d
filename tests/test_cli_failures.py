"""What a user owns is never lost (DESIGN.md section 9, issue 17): the command line checks arguments and output
locations before any model loads, every failure is one line (out of memory, a full disk, Ctrl-C), written files
get a new file's permissions, long work says what it will cost before the first step, and an evaluation resumed
after a crash regenerates the images it left damaged.
"""

from __future__ import annotations

import _thread
import argparse
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_evaluation
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from gspn_diffusers.cli import build_parser, main
from gspn_diffusers.cli_args import MAX_SEED
from gspn_diffusers.evaluation.files import (
    readable_image,
    save_npz_atomically,
    save_png_atomically,
    write_text_atomically,
)
from gspn_diffusers.safe_write import atomic_path
from gspn_diffusers.serialization import CONFIG_NAME, WEIGHTS_NAME

coco = test_evaluation.coco  # six JPEG photos and their COCO captions file
ROOT = Path(__file__).resolve().parents[1]


def error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def one_error(caplog, argv: list[str], code: int) -> str:
    """Run the CLI; it must return ``code`` after exactly one error line and no traceback."""
    caplog.clear()
    assert main(argv) == code
    lines = error_lines(caplog)
    assert len(lines) == 1 and "Traceback" not in caplog.text, lines
    return lines[0]


# ------------------------------------------------------------------------------ output locations, arguments


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into: immutable for root (who ignores permissions), mode 0555 for others."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("running as root without chattr: no folder here is read-only")

        def undo():
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)

        def undo():
            folder.chmod(0o755)

    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        pass
    else:
        undo()
        pytest.skip("this filesystem lets the folder be written anyway")
    yield folder
    undo()


def test_every_output_location_is_proven_writable_before_any_model_loads(tmp_path, read_only_dir, caplog):
    """Each command names a model folder that does not exist: the output check answering first proves it runs
    before loading; a check after the work (the old one) would have lost the render."""
    caplog.set_level(logging.ERROR)
    no_model = str(tmp_path / "no_such_model")
    generate = ["generate", "--model", no_model, "--prompt", "x"]
    cases = {
        "--output": [
            [*generate, "--output", str(read_only_dir / "image.png")],
            [*generate, "--height", "2048", "--save-stages", "--output", str(read_only_dir / "new" / "hires.png")],
            ["convert", "--model", no_model, "--output", str(read_only_dir / "weights")],
        ],
        "--output-dir": [
            ["evaluate", "--model", no_model, "--original", "--captions", "c.txt", "--coco-images", "images"]
            + ["--fid-cache", str(tmp_path / "cache"), "--output-dir", str(read_only_dir / "run")]
        ],
        "--fid-cache": [
            ["evaluate", "--model", no_model, "--original", "--captions", "c.txt", "--coco-images", "images"]
            + ["--fid-cache", str(read_only_dir / "cache"), "--output-dir", str(tmp_path / "run")]
        ],
    }
    for flag, commands in cases.items():
        for argv in commands:
            message = one_error(caplog, argv, 2)
            assert message.startswith(f"{flag} '{read_only_dir}") and "cannot be written" in message, message
    assert list(read_only_dir.iterdir()) == []


def test_a_writable_output_folder_is_created_and_the_probe_removed(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    out = tmp_path / "new" / "deeper"
    message = one_error(
        caplog, ["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--output", str(out / "a.png")], 2
    )
    assert "no such folder" in message  # the output passed; the model check answered
    assert out.is_dir() and list(out.iterdir()) == []


BAD_DEVICES = ["gpu", "cuda:x", "meta", "cuda:0 ", "CPU", "cuda:-1", "xpu"]


# ids that are not the bare word "gpu": conftest skips tests with that keyword where no GPU is present
@pytest.mark.parametrize("device", BAD_DEVICES, ids=[f"device={d!r}" for d in BAD_DEVICES])
def test_device_strings_that_are_not_cpu_cuda_or_mps_are_refused(tmp_path, caplog, device):
    caplog.set_level(logging.ERROR)
    argv = ["generate", "--tiny", "sd15", "--prompt", "x", "--device", device, "--output", str(tmp_path / "a.png")]
    message = one_error(caplog, argv, 2)
    assert message == f"--device {device!r}: use cpu, cuda, cuda:N (N = 0, 1, ...) or mps."


def test_a_cuda_index_beyond_the_visible_devices_is_refused(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    argv = ["generate", "--tiny", "sd15", "--prompt", "x", "--device", f"cuda:{count}", "--output", str(tmp_path)]
    message = one_error(caplog, [*argv[:-1], str(tmp_path / "a.png")], 2)
    assert ("sees no CUDA GPU" if count == 0 else f"only {count} CUDA GPU(s) visible") in message


@pytest.mark.parametrize("command", ["generate", "evaluate"])
@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--seed", "-1", "must be in 0..2**64-1"),
        ("--seed", str(2**64), "must be in 0..2**64-1"),
        ("--seed", "1.5", "expected an integer in 0..2**64-1"),
        ("--guidance-scale", "nan", "must be a finite number"),
        ("--guidance-scale", "inf", "must be a finite number"),
        ("--guidance-scale", "-inf", "must be a finite number"),
    ],
)
def test_seed_and_guidance_are_checked_by_the_parser(capsys, command, flag, value, message):
    argv = [command, "--tiny", "sd15", "--prompt", "x"] if command == "generate" else [command, "--tiny", "sd15"]
    with pytest.raises(SystemExit) as info:
        build_parser(command).parse_args([*argv, f"{flag}={value}"])
    assert info.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_the_largest_seed_is_accepted_and_torch_takes_it():
    args = build_parser("generate").parse_args(
        ["generate", "--tiny", "sd15", "--prompt", "x", "--seed", str(MAX_SEED)]
    )
    assert args.seed == 2**64 - 1
    torch.Generator().manual_seed(args.seed)  # the range is torch's own


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:  # the header still opens: only decoding finds it
        assert image.size


def test_an_fid_reference_image_that_does_not_decode_stops_evaluate_before_generating(coco, tmp_path, caplog):
    _, folder = coco
    bad = sorted(folder.glob("*.jpg"))[2]
    _truncate(bad)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red bus\ntwo dogs\n")
    run = tmp_path / "run"
    argv = ["evaluate", "--tiny", "sd15", "--original", "--tiny-metrics", "--captions", str(captions)]
    argv += ["--coco-images", str(folder), "--fid-reference", "folder", "--output-dir", str(run)]
    argv += ["--steps", "1", "--height", "64", "--width", "64", "--fid-size", "32", "--num-workers", "0"]
    argv += ["--fid-cache", str(tmp_path / "cache")]
    caplog.set_level(logging.ERROR)
    message = one_error(caplog, argv, 2)
    assert message.startswith(f"FID reference image {bad} cannot be decoded") and "Nothing was generated" in message
    assert not (run / "images").exists()


# ------------------------------------------------------------------------------ out of memory, disk full


def _cpu_allocator_error() -> RuntimeError:
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as error:  # not a MemoryError: the CPU allocator raises a RuntimeError
        return error
    pytest.skip("this machine allocated 4 EiB")


@pytest.mark.parametrize("kind", ["CPU allocator", "torch.OutOfMemoryError", "MemoryError"])
def test_out_of_memory_is_one_line_that_names_what_to_lower(tmp_path, caplog, monkeypatch, kind):
    error = {
        "CPU allocator": _cpu_allocator_error,
        "torch.OutOfMemoryError": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "MemoryError": MemoryError,
    }[kind]()

    def forward(*args, **kwargs):
        raise error

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    caplog.set_level(logging.ERROR)
    argv = ["generate", "--tiny", "sd15", "--original", "--prompt", "x", "--output", str(tmp_path / "a.png")]
    message = one_error(caplog, argv, 1)
    assert message.startswith("Out of memory (") and "lower --height/--width" in message
    assert "--local-denoising windows" in message and not (tmp_path / "a.png").exists()
    with pytest.raises(type(error)):  # -v: the traceback
        main(["-v", *argv])


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces for a real, tiny full disk")
def test_a_full_disk_is_one_line_naming_the_folder_and_keeps_what_was_there(tmp_path):
    """A real full disk: a 12 KiB tmpfs in a private mount namespace. The image (about 50 KB) and the weights do
    not fit; each command says so in one line naming the folder, and the previous file is intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    python = shlex.quote(sys.executable)
    script = f"""
        mount -t tmpfs -o size=12k tmpfs {disk} || exit 99
        mkdir {disk}/out && printf previous > {disk}/out/image.png
        {python} -m gspn_diffusers.cli generate --tiny sd15 --original --prompt x --steps 1 \\
            --output {disk}/out/image.png 2> {tmp_path}/generate.err
        echo "generate=$?"
        {python} -m gspn_diffusers.cli convert --tiny sd15 --output {disk}/weights 2> {tmp_path}/convert.err
        echo "convert=$?"
        echo "image=$(cat {disk}/out/image.png)"
        echo "files=$(ls -A {disk}/out {disk}/weights | tr '\\n' ' ')"
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    report = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert (report["generate"], report["convert"], report["image"]) == ("1", "1", "previous"), report
    assert report["files"].split() == [f"{disk}/out:", "image.png", f"{disk}/weights:"]  # no temporary left
    for name, folder in (("generate", disk / "out"), ("convert", disk / "weights")):
        stderr = (tmp_path / f"{name}.err").read_text()
        errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert errors[0].startswith(f"ERROR No space left on the disk of {folder}"), errors[0]


def test_a_library_s_disk_full_error_is_named_by_atomic_path(tmp_path):
    """safetensors raises its own error type for ENOSPC; the write aside turns it into a disk-full error with the
    folder, and the previous file survives."""
    from safetensors import SafetensorError

    from gspn_diffusers.errors import GSPNDiskFullError

    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(GSPNDiskFullError, match=f"No space left on the disk of {tmp_path}"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"part")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ------------------------------------------------------------------------------ permissions, temporary names


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_a_new_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "weights.safetensors") as path:
            path.write_bytes(b"w")
        write_text_atomically(tmp_path / "results.json", "{}")
        save_png_atomically(Image.new("RGB", (4, 4)), tmp_path / "0.png")
        save_npz_atomically(tmp_path / "stats.npz", mu=np.zeros(2))
        assert main(["convert", "--tiny", "sd15", "--output", str(tmp_path / "gspn")]) == 0
    finally:
        os.umask(previous)
    written = [
        "weights.safetensors",
        "results.json",
        "0.png",
        "stats.npz",
        f"gspn/{CONFIG_NAME}",
        f"gspn/{WEIGHTS_NAME}",
    ]
    assert {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in written} == {
        name: oct(mode) for name in written
    }


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """Two evaluations sharing the FID cache write the same file at once; with one temporary name per process the
    second would write into (and rename away) the first one's half-written file."""
    target = tmp_path / "stats.npz"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


# ------------------------------------------------------------------------------ Ctrl-C, resume, damaged images


def test_ctrl_c_in_evaluate_says_what_is_saved_and_how_to_resume_and_a_damaged_image_is_redone(coco, tmp_path, caplog):
    _, folder = coco
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"caption number {i}\n" for i in range(6)))
    run = tmp_path / "run"
    images = run / "images"
    argv = ["evaluate", "--tiny", "sd15", "--original", "--tiny-metrics", "--captions", str(captions)]
    argv += ["--coco-images", str(folder), "--fid-reference", "folder", "--output-dir", str(run), "--steps", "1"]
    argv += ["--height", "64", "--width", "64", "--fid-size", "32", "--num-workers", "0"]
    argv += ["--fid-cache", str(tmp_path / "cache")]

    def pngs() -> list[Path]:
        return sorted(p for p in images.glob("*.png") if not p.name.startswith(".")) if images.is_dir() else []

    running, stop = threading.Event(), threading.Event()

    def press_ctrl_c_after_the_first_image() -> None:
        while not stop.is_set():
            if running.is_set() and pngs():
                _thread.interrupt_main()  # what Ctrl-C does: SIGINT's handler raises KeyboardInterrupt in main
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=press_ctrl_c_after_the_first_image, daemon=True)
    watcher.start()
    caplog.set_level(logging.ERROR)
    running.set()
    try:
        code = main(argv)
    finally:
        running.clear()
        stop.set()
        watcher.join()
    assert code == 130
    lines = error_lines(caplog)
    saved = len(pngs())
    assert len(lines) == 1 and 1 <= saved < 6, (lines, saved)
    assert lines[0].startswith(f"Interrupted: {saved} of 6 generated images are saved in {images}; to resume")
    assert lines[0].endswith(f"evaluate {shlex.join(argv[1:])}")

    # A crash left one of them truncated: the resume decodes, not only lists, and makes it again.
    damaged = pngs()[0]
    _truncate(damaged)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    assert "did not decode as 64x64 PNGs" in caplog.text and damaged.name in caplog.text
    assert f"{6 - saved + 1} of 6 images to generate ({saved - 1} already written)" in caplog.text
    assert len(pngs()) == 6 and all(readable_image(p, (64, 64)) for p in pngs())
    assert (run / "results.json").is_file()


# ------------------------------------------------------------------------------ the cost, before the work


def _hires(kind: str, height: int, width: int, **extra):
    from gspn_diffusers import convert
    from gspn_diffusers.pipelines.cli_support import hires_pipeline_for
    from gspn_diffusers.tiny import tiny_pipeline

    base = tiny_pipeline(kind)
    convert(base)
    args = argparse.Namespace(
        prompt="x",
        negative_prompt=None,
        height=height,
        width=width,
        steps=5,
        guidance_scale=7.5,
        skip_ratio=0.6,
        local_denoising="auto",
        save_stages=False,
    )
    vars(args).update(extra)
    pipe, _ = hires_pipeline_for(base, args)
    return base, pipe, args


@pytest.mark.parametrize("local", ["auto", "windows"])
def test_the_tokens_per_step_of_every_stage_by_hand(one_thread, local):
    """Tiny SD-XL (native 128 px, latent window 16, stride 8) at 256x128: base 192x96, then 256x128 (latent 16x32,
    2 kept of 5 steps). Per step and CFG sample: the base's 12x24 latent; the stage's local branch (the whole 16x32,
    or 1x3 windows of 16x16) plus the dilated branch (2x2 sub-latents of 16x16 = 512)."""
    from gspn_diffusers.pipelines.cli_support import plan_costs

    base, pipe, args = _hires("sdxl", 128, 256, local_denoising=local)
    costs = plan_costs(base, pipe, args)
    local_tokens = 16 * 32 if local == "auto" else 3 * 16 * 16
    assert [(c.height, c.width, c.steps, c.mode) for c in costs] == [
        (96, 192, 5, "whole"),
        (128, 256, 2, "whole" if local == "auto" else "windows"),
    ]
    assert [c.unet_tokens_per_step for c in costs] == [2 * 12 * 24, 2 * (local_tokens + 512)]
    per_token = [c.seconds / (c.steps * c.unet_tokens_per_step) for c in costs]
    assert per_token[0] > 0 and per_token[1] == pytest.approx(per_token[0])
    weights = sum(
        p.numel() * p.element_size()
        for m in base.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )
    assert all(c.peak_bytes > weights for c in costs) and costs[1].peak_bytes >= costs[0].peak_bytes


def test_generate_announces_memory_and_time_per_stage_before_the_first_step(tmp_path, caplog, one_thread):
    caplog.set_level(logging.INFO)
    argv = ["generate", "--tiny", "sdxl", "--prompt", "x", "--height", "128", "--width", "256", "--steps", "3"]
    assert main([*argv, "--output", str(tmp_path / "a.png")]) == 0
    messages = [record.getMessage() for record in caplog.records]
    stage0 = next(i for i, m in enumerate(messages) if m.startswith("Stage 0/1 192x96: 3 steps, whole latent, peak"))
    stage1 = next(i for i, m in enumerate(messages) if m.startswith("Stage 1/1 256x128: 1 steps, whole latent, peak"))
    total = next(i for i, m in enumerate(messages) if m.startswith("Estimated UNet time: about"))
    first_step = next(i for i, m in enumerate(messages) if m.startswith("Stages (WxH)"))  # the pipeline's start
    assert stage0 < stage1 < total < first_step
    assert " on cpu, about " in messages[stage0]


def test_a_cpu_run_of_gigapixels_says_it_takes_hours_and_how_to_stop(caplog, one_thread):
    from gspn_diffusers.pipelines.cli_support import LONG_RUN_S, announce_costs

    base, pipe, args = _hires("sd15", 16384, 16384)
    caplog.set_level(logging.INFO)
    costs = announce_costs(base, pipe, args)
    assert sum(c.seconds for c in costs) > LONG_RUN_S
    warning = next(r.getMessage() for r in caplog.records if "Ctrl-C stops it" in r.getMessage())
    assert warning.startswith("This 268-megapixel run will take about ") and " on cpu." in warning
    assert warning.split("about ")[1].split(" on")[0].endswith((" min", " h", " days"))  # units: machine speed


def test_the_measured_step_does_not_change_the_image(tmp_path, one_thread):
    """The cost estimate runs one extra UNet step on the same pipeline (scheduler, processors): the image must be
    the one the pipeline makes without it, for the same seed."""
    from gspn_diffusers.tiny import tiny_pipeline

    out = tmp_path / "a.png"
    argv = ["generate", "--tiny", "sd15", "--original", "--prompt", "a lighthouse", "--steps", "2", "--seed", "3"]
    assert main([*argv, "--height", "64", "--width", "64", "--output", str(out)]) == 0
    pipe = tiny_pipeline("sd15")
    direct = pipe(
        prompt="a lighthouse",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator(device="cpu").manual_seed(3),
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(direct))
