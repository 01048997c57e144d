"""FID / CLIP-T evaluation on tiny models: the Frechet distance, caption selection, the end-to-end run,
resuming, comparison and the errors raised before any expensive work."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import linalg

from gspn_diffusers.cli import main
from gspn_diffusers.evaluation import (
    EvaluationConfig,
    GaussianStats,
    evaluate,
    fid_weights,
    format_comparison,
    frechet_distance,
    load_results,
    read_manifest,
    select_captions,
)
from gspn_diffusers.evaluation.clip_t import clip_checkpoint
from gspn_diffusers.evaluation.fid import fid_image, fid_weights_cache_path
from gspn_diffusers.evaluation.tiny_metrics import TinyFeatureExtractor, register_tiny_clip, tiny_clip
from gspn_diffusers.tiny import tiny_pipeline

SIZE = 64
CAPTIONS = {
    11: ["a red bus parked on a street", "a bus by the curb"],
    22: ["two dogs playing in the snow"],
    33: ["a bowl of oranges on a table", "fruit in a bowl", "oranges"],
    44: ["a man riding a surfboard on a wave"],
    55: ["a plate with a sandwich and fries", "lunch on a plate"],
    66: ["a living room with a sofa"],
}


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A real-looking stand-in photo: a smooth gradient with a few shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(120, 255, size=3)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.ellipse((x0, y0, x0 + width // 3, y0 + height // 3), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


@pytest.fixture
def coco(tmp_path):
    """A COCO-format captions file and its JPEG folder (landscape and portrait photos)."""
    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    images, annotations = [], []
    for n, (image_id, captions) in enumerate(CAPTIONS.items()):
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        width, height = (96, 72) if n % 2 else (60, 90)
        _photo(width, height, image_id).save(images_dir / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        annotations += [{"id": image_id * 10 + k, "image_id": image_id, "caption": c} for k, c in enumerate(captions)]
    annotation_file = tmp_path / "captions_val2014.json"
    annotation_file.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return annotation_file, images_dir


def _config(coco, output_dir, **overrides) -> EvaluationConfig:
    """Tiny settings; the FID reference cache goes beside the run (never the user's cache)."""
    annotation_file, images_dir = coco
    values = dict(num_captions=4, seed=3, height=SIZE, width=SIZE, num_inference_steps=2, batch_size=3, fid_size=32)
    values.update(fid_cache=str(output_dir) + "-fid-cache", **overrides)
    return EvaluationConfig(str(annotation_file), str(images_dir), str(output_dir), **values)


def _closed_form(mu1, sigma1, mu2, sigma2) -> float:
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def test_frechet_distance_matches_scipy_closed_form():
    dim, n = 6, 20000
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim) + 1.0
    sigma1, sigma2 = a @ a.T / dim + 0.1 * np.eye(dim), b @ b.T / dim + 0.1 * np.eye(dim)
    x = rng.multivariate_normal(mu1, sigma1, size=n)
    y = rng.multivariate_normal(mu2, sigma2, size=n)
    real, fake = GaussianStats(dim), GaussianStats(dim)
    for stats, samples in ((real, x), (fake, y)):
        for chunk in np.array_split(samples, 7):  # streamed in batches, as the metric pass does
            stats.update(torch.from_numpy(chunk))
    (mu_x, cov_x, n_x), (mu_y, cov_y, _) = real.mean_cov(), fake.mean_cov()
    assert n_x == n
    np.testing.assert_allclose(cov_x, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    fid = frechet_distance(mu_x, cov_x, mu_y, cov_y)
    # Exactly the Frechet distance of the samples' Gaussians ...
    empirical = _closed_form(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fid == pytest.approx(empirical, rel=1e-6)
    # ... which converges to that of the true Gaussians.
    assert fid == pytest.approx(_closed_form(mu1, sigma1, mu2, sigma2), rel=0.05)
    assert fid > 1.0

    assert abs(frechet_distance(mu_x, cov_x, mu_x, cov_x)) < 1e-6
    # A singular covariance (fewer samples than dimensions) still gives a finite distance.
    few = GaussianStats(dim)
    few.update(torch.from_numpy(x[:3]))
    mu_f, cov_f, _ = few.mean_cov()
    assert np.isfinite(frechet_distance(mu_f, cov_f, mu_y, cov_y))


def test_caption_selection_is_seeded_distinct_and_a_prefix(coco):
    annotation_file, _ = coco
    five = select_captions(annotation_file, 5, seed=1)
    assert five == select_captions(annotation_file, 5, seed=1)
    assert select_captions(annotation_file, 3, seed=1) == five[:3]
    assert [r.index for r in five] == list(range(5))
    assert len({r.image_id for r in five}) == 5
    for record in five:
        assert record.caption in CAPTIONS[record.image_id]
        assert record.caption_id // 10 == record.image_id
        assert record.file_name == f"COCO_val2014_{record.image_id:012d}.jpg"
    assert [r.image_id for r in select_captions(annotation_file, 6, seed=2)] != [
        r.image_id for r in select_captions(annotation_file, 6, seed=1)
    ]
    with pytest.raises(ValueError, match="between 1 and 6"):
        select_captions(annotation_file, 7)


@pytest.mark.parametrize("resize", ["bicubic", "lanczos"])
def test_fid_image_keeps_the_center_square(resize):
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    ImageDraw.Draw(image).rectangle((30, 0, 89, 59), fill=(0, 0, 255))  # the centered square is blue
    out = np.asarray(fid_image(image, 32, resize))
    assert out.shape == (32, 32, 3)
    assert out[..., 2].min() > 240 and out[..., 0].max() < 15
    portrait = Image.new("RGB", (40, 100), (0, 255, 0))
    ImageDraw.Draw(portrait).rectangle((0, 30, 39, 69), fill=(0, 0, 255))
    assert np.asarray(fid_image(portrait, 40, resize))[..., 1].max() == 0  # 40x40 crop of the blue middle, as is


def _count_unet_calls(pipe) -> list[int]:
    calls = [0]
    pipe.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_end_to_end_run_resumes_without_regenerating(coco, tmp_path):
    pipe = tiny_pipeline("sd15")
    calls = _count_unet_calls(pipe)
    config = _config(coco, tmp_path / "run")
    extractor, clip = TinyFeatureExtractor(), tiny_clip()
    results = evaluate(pipe, config, model_name="tiny-sd15", fid_feature_extractor=extractor, clip=clip)

    image_dir = tmp_path / "run" / "images"
    pngs = sorted(p.name for p in image_dir.glob("*.png"))
    assert pngs == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert not [p.name for p in image_dir.iterdir() if p.name.startswith(".")]  # no temporary left
    assert all(Image.open(image_dir / name).size == (SIZE, SIZE) for name in pngs)
    assert calls[0] == 2 * 2  # 4 images in batches of 3 and 1, 2 steps each (CFG batched in one call)
    manifest = read_manifest(image_dir)
    assert manifest == select_captions(config.annotation_file, 4, seed=3)
    assert len({r.seed for r in manifest}) == 4

    saved = load_results(tmp_path / "run")
    assert saved == json.loads(json.dumps(results))
    assert np.isfinite(saved["metrics"]["fid"]["value"]) and saved["metrics"]["fid"]["value"] > 0
    assert -1 <= saved["metrics"]["clip_t"]["value"] <= 1 and saved["metrics"]["clip_t"]["scale"] == "cosine"
    assert saved["metrics"]["fid"]["num_real"] == saved["metrics"]["fid"]["num_generated"] == 4
    assert saved["settings"]["safety_checker"] is False and saved["protocol"] == {"name": None, "overrides": {}}
    settings = saved["settings"]
    assert (settings["model"], settings["num_captions"], settings["seed"]) == ("tiny-sd15", 4, 3)
    assert (settings["height"], settings["width"], settings["steps"], settings["guidance_scale"]) == (64, 64, 2, 7.5)
    assert settings["original"] is True and settings["gspn_weights"] is None
    assert saved["metrics"]["clip_t"]["model"] == "tiny-random-clip/random"
    assert saved["settings"]["annotation_file"] == config.annotation_file
    assert all(saved["versions"][name] for name in ("torch", "diffusers", "clean-fid", "open_clip_torch"))
    assert saved["run"]["started"] <= saved["run"]["finished"]

    mtimes = {name: (image_dir / name).stat().st_mtime_ns for name in pngs}
    again = evaluate(pipe, config, model_name="tiny-sd15", fid_feature_extractor=extractor, clip=clip)
    assert calls[0] == 4, "a finished run must not call the UNet again"
    assert {name: (image_dir / name).stat().st_mtime_ns for name in pngs} == mtimes
    assert again["metrics"]["fid"]["value"] == pytest.approx(results["metrics"]["fid"]["value"])

    # A killed run: one image missing, a stale temporary file left behind; only the missing one is redone.
    first = np.asarray(Image.open(image_dir / "000001.png"), dtype=np.int16)
    (image_dir / "000001.png").unlink()
    (image_dir / ".000001.png.tmp").write_bytes(b"truncated")
    evaluate(pipe, config, model_name="tiny-sd15", fid_feature_extractor=extractor, clip=clip)
    assert calls[0] == 4 + 2
    # Its own seed: the same image as before, made in a batch of 1 instead of 3 (up to CPU rounding).
    assert np.abs(np.asarray(Image.open(image_dir / "000001.png"), dtype=np.int16) - first).max() <= 2
    assert {n: (image_dir / n).stat().st_mtime_ns for n in pngs if n != "000001.png"} == {
        n: t for n, t in mtimes.items() if n != "000001.png"
    }
    assert not [p.name for p in image_dir.iterdir() if p.name.startswith(".")]  # no temporary left

    # More captions with the same seed extend the selection: only the new image is generated.
    more = evaluate(
        pipe,
        _config(coco, tmp_path / "run", num_captions=5),
        model_name="tiny-sd15",
        fid_feature_extractor=extractor,
        clip=clip,
    )
    assert calls[0] == 4 + 2 + 2 and more["settings"]["num_captions"] == 5
    assert len(read_manifest(image_dir)) == 5 and (image_dir / "000004.png").is_file()

    with pytest.raises(ValueError, match=r"other settings \(steps: 2 -> 3\)"):
        evaluate(
            pipe,
            _config(coco, tmp_path / "run", num_inference_steps=3),
            model_name="tiny-sd15",
            fid_feature_extractor=extractor,
            clip=clip,
        )


def test_compare_two_runs(coco, tmp_path, capsys):
    extractor, clip = TinyFeatureExtractor(), tiny_clip()
    pipe = tiny_pipeline("sd15")
    a = evaluate(pipe, _config(coco, tmp_path / "a", num_captions=2), fid_feature_extractor=extractor, clip=clip)
    b = evaluate(
        pipe,
        _config(coco, tmp_path / "b", num_captions=2, guidance_scale=2.0),
        fid_feature_extractor=extractor,
        clip=clip,
    )
    table = format_comparison(a, b, names=("sd", "gspn"))
    delta = b["metrics"]["fid"]["value"] - a["metrics"]["fid"]["value"]
    assert f"{delta:+.3f}" in table
    assert "guidance_scale *" in table and "steps *" not in table
    assert main(["evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "b" / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "CLIP-T" in out and f"{a['metrics']['clip_t']['value']:.4f}" in out


def _never_load():
    pytest.fail("the pipeline must not be loaded when the inputs are bad")


@pytest.mark.parametrize(
    "break_input, error, message",
    [
        (lambda ann, img: ann.unlink(), FileNotFoundError, "annotation file .* does not exist"),
        (lambda ann, img: ann.write_text("not json"), ValueError, "not a JSON file"),
        (lambda ann, img: ann.write_text("[1, 2]"), ValueError, "not in COCO captions format"),
        (
            lambda ann, img: ann.write_text(json.dumps({"images": [{"id": 1}], "annotations": []})),
            ValueError,
            "lacks 'file_name'",
        ),
        (lambda ann, img: shutil.rmtree(img), FileNotFoundError, "folder .* does not exist"),
        (lambda ann, img: [p.unlink() for p in list(img.iterdir())[:2]], FileNotFoundError, "of the 4 selected"),
        (lambda ann, img: [p.write_bytes(b"<html>") for p in img.iterdir()], ValueError, "cannot be read as an image"),
    ],
)
def test_bad_inputs_fail_before_loading_the_pipeline(coco, tmp_path, break_input, error, message):
    break_input(*coco)
    with pytest.raises(error, match=message):
        evaluate(
            _never_load,
            _config(coco, tmp_path / "run"),
            fid_feature_extractor=TinyFeatureExtractor(),
            clip=tiny_clip(),
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "backend, file_name",
    [("torchmetrics", "weights-inception-2015-12-05-6726825d.pth"), ("clean-fid", "inception-2015-12-05.pt")],
)
def test_missing_metric_weights_fail_fast_with_the_file_to_provide(coco, tmp_path, monkeypatch, backend, file_name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / file_name
    assert fid_weights_cache_path(backend) == expected
    with pytest.raises(FileNotFoundError) as info:
        evaluate(_never_load, _config(coco, tmp_path / "run", fid_backend=backend), clip=tiny_clip())
    assert str(expected) in str(info.value) and "--fid-weights" in str(info.value)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        fid_weights(backend, tmp_path / "nowhere.pth")
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"")
    assert fid_weights(backend) == expected

    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-g-14-laion2B-s12B-b42K.*--clip-pretrained"):
        evaluate(_never_load, _config(coco, tmp_path / "run"), fid_feature_extractor=TinyFeatureExtractor())
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        clip_checkpoint("ViT-B-32", "no_such_tag")
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        clip_checkpoint("ViT-Q-99", "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_checkpoint("ViT-B-32", str(tmp_path / "clip.safetensors"))


def test_cli_smoke_run_and_errors(coco, tmp_path, caplog, capsys):
    annotation_file, images_dir = coco
    run = tmp_path / "cli_run"
    base = [
        "evaluate",
        "--annotations",
        str(annotation_file),
        "--coco-images",
        str(images_dir),
        "--output-dir",
        str(run),
    ]
    weights = tmp_path / "gspn"
    assert main(["convert", "--tiny", "sd15", "--output", str(weights)]) == 0
    tiny = [
        "--tiny",
        "sd15",
        "--gspn-weights",
        str(weights),
        "--tiny-metrics",
        "--fid-cache",
        str(tmp_path / "fid_cache"),
        "--fid-size",
        "32",
        "--num-captions",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "1",
        "--num-workers",
        "0",
    ]
    assert main(base + tiny) == 0
    assert sorted(p.name for p in (run / "images").glob("*.png")) == ["000000.png", "000001.png"]
    settings = load_results(run)["settings"]
    assert settings["model"] == "tiny-sd15" and settings["gspn_weights"] == str(weights)
    assert settings["original"] is False and settings["gspn_config"]["preset"] == "sd15"
    assert "FID" in capsys.readouterr().out

    caplog.set_level(logging.ERROR)
    assert main(["evaluate", "--tiny", "sd15", "--original"]) == 2
    assert "--annotations" in caplog.text
    caplog.clear()
    assert main(base + ["--tiny", "sd15", "--tiny-metrics"]) == 2
    assert "--gspn-weights FOLDER" in caplog.text
    caplog.clear()
    assert main(["evaluate", "--compare", str(run), str(tmp_path / "missing")]) == 2
    assert "No evaluation results" in caplog.text


def test_clip_weights_load_from_a_local_file(tmp_path):
    """The offline route for real CLIP weights (--clip-pretrained FILE), on a tiny registered open_clip config."""
    import open_clip
    from safetensors.torch import save_file

    from gspn_diffusers.evaluation import load_clip

    register_tiny_clip(tmp_path, "gspn-test-tiny-clip")
    torch.manual_seed(1)
    source = open_clip.create_model("gspn-test-tiny-clip")
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)

    clip = load_clip("gspn-test-tiny-clip", str(weights))
    assert (clip.name, clip.pretrained) == ("gspn-test-tiny-clip", str(weights))
    tokens = clip.tokenizer(["a red bus"])
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_text(tokens), source.eval().encode_text(tokens))
    assert clip.preprocess(_photo(50, 40, 0)).shape == (3, 32, 32)
