"""The evaluation protocol, pinned: CLIP-T on known embeddings, the COCO caption choice, the presets, the FID
reference cache key, the clean-fid backend, resuming by the weights' content, the safety checker, captions
files, and the checks that run before any model (or any image) is made."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import test_evaluation
import torch
from accelerate import PartialState
from PIL import Image
from test_evaluation import CAPTIONS, _config, _never_load
from torch import nn

from gspn_diffusers.cli import main
from gspn_diffusers.convert import gspn_parameters
from gspn_diffusers.evaluation import (
    PROTOCOLS,
    ClipModel,
    ClipTScore,
    EvaluationConfig,
    evaluate,
    load_fid_backend,
    load_results,
    read_captions_file,
    read_manifest,
    resolve_protocol,
    select_captions,
)
from gspn_diffusers.evaluation.fid import custom_fid_backend, fid_image
from gspn_diffusers.evaluation.reference import reference_files, reference_statistics
from gspn_diffusers.evaluation.tiny_metrics import TinyFeatureExtractor, register_tiny_clip, tiny_clip
from gspn_diffusers.serialization import load_gspn, save_gspn
from gspn_diffusers.tiny import tiny_pipeline

coco = test_evaluation.coco  # the COCO-format captions file and photos, shared

# ---------------------------------------------------------------- CLIP-T


class _KnownEmbeddings(nn.Module):
    """CLIP towers with known outputs: an image's embedding is its 'pixels', a caption's is looked up by index."""

    def __init__(self, text_vectors: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("text_vectors", text_vectors)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_vectors[tokens]


def test_clip_t_is_the_mean_cosine_of_known_embeddings():
    # Pairs with cosines 0.5 (60 degrees), 0.6 (3-4-5 triangle, not unit length) and -1 (opposite: not clipped).
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0], [1.0, 1.0, 0.0]])
    texts = torch.tensor([[0.5, math.sqrt(3) / 2, 0.0], [0.0, 2.0, 0.0], [-2.0, -2.0, 0.0]])
    captions = ["sixty degrees", "three four five", "opposite"]
    seen: list[str] = []

    def tokenizer(batch: list[str]) -> torch.Tensor:
        seen.extend(batch)
        return torch.tensor([captions.index(text.removeprefix("A photo depicts ")) for text in batch])

    clip = ClipModel(_KnownEmbeddings(texts), lambda image: image, tokenizer, "known", "embeddings")
    score = ClipTScore(clip, prefix="A photo depicts ")
    score.update(images[:2], captions[:2])
    score.update(images[2:], captions[2:])
    assert score.compute() == pytest.approx((0.5 + 0.6 - 1.0) / 3, abs=1e-6)
    assert seen == ["A photo depicts " + caption for caption in captions]


# ---------------------------------------------------------------- COCO caption choice


def test_coco_caption_choice_is_spread_over_all_captions_and_deterministic(tmp_path):
    """Every caption of an image is equally likely to be its evaluation caption; a seed fixes the choice."""
    num_images, per_image, num_seeds = 60, 5, 60
    rng = random.Random(0)
    annotations = [
        {"id": image_id * 10 + k, "image_id": image_id, "caption": f"image {image_id} caption {k}"}
        for image_id in range(1, num_images + 1)
        for k in range(per_image)
    ]
    rng.shuffle(annotations)  # the file's order must not matter
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(1, num_images + 1)]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))

    positions: Counter[int] = Counter()
    chosen: dict[int, set[int]] = {}
    for seed in range(num_seeds):
        records = select_captions(path, num_images, seed)
        assert records == select_captions(path, num_images, seed)
        assert select_captions(path, 7, seed) == records[:7]
        for record in records:
            positions[record.caption_id % 10] += 1
            chosen.setdefault(record.image_id, set()).add(record.caption_id % 10)
    expected = num_images * num_seeds / per_image  # 720 each; one standard deviation is 24
    assert sorted(positions) == list(range(per_image))
    assert all(abs(count - expected) < 5 * 24 for count in positions.values()), positions
    assert all(found == set(range(per_image)) for found in chosen.values())


# ---------------------------------------------------------------- presets


def test_presets_set_every_choice_and_record_overrides():
    linfusion = {
        "height": None,
        "width": None,
        "num_inference_steps": 25,
        "guidance_scale": 7.5,
        "num_captions": 30000,
        "clip_model": "ViT-g-14",
        "clip_pretrained": "laion2b_s12b_b42k",
        "clip_prefix": "A photo depicts ",
        "clip_image_size": 256,
        "fid_backend": "clean-fid",
        "fid_size": 256,
        "fid_resize": "lanczos",
        "fid_reference": "folder",
    }
    assert PROTOCOLS == {"gspn-paper": {**linfusion, "height": 1024, "width": 1024}, "linfusion": linfusion}
    settings, overrides = resolve_protocol("gspn-paper", {"num_inference_steps": 50, "guidance_scale": 7.5})
    assert settings == {**PROTOCOLS["gspn-paper"], "num_inference_steps": 50}
    assert overrides == {"num_inference_steps": {"protocol": 25, "used": 50}}  # 7.5 is the preset's: no override
    assert resolve_protocol(None, {"fid_size": 64}) == ({"fid_size": 64}, {})
    with pytest.raises(ValueError, match="gspn-paper, linfusion"):
        resolve_protocol("dall-e", {})

    config = EvaluationConfig.from_protocol("gspn-paper", None, "val2014", "run", captions_file="c.txt", fid_size=64)
    assert (config.height, config.width, config.fid_backend, config.fid_size) == (1024, 1024, "clean-fid", 64)
    assert config.protocol == "gspn-paper" and config.protocol_overrides == {"fid_size": {"protocol": 256, "used": 64}}
    plain = EvaluationConfig("ann.json", "val2014", "run")
    assert (plain.fid_backend, plain.fid_size, plain.clip_pretrained, plain.safety_checker) == (
        "torchmetrics",
        299,
        "laion2b_s12b_b42k",
        False,
    )


@pytest.fixture
def captions_and_folder(tmp_path, coco):
    """A captions file (with a blank line) and a folder of 6 reference photos (the COCO fixture's)."""
    path = tmp_path / "captions.txt"
    path.write_text("a red bus\n\n  two dogs in the snow  \na bowl of oranges\na man surfing\n")
    return path, coco[1]


def test_cli_protocol_run_records_every_setting(captions_and_folder, tmp_path):
    captions, folder = captions_and_folder
    run = tmp_path / "run"
    args = ["evaluate", "--tiny", "sd15", "--original", "--protocol", "linfusion", "--tiny-metrics"]
    args += ["--captions", str(captions), "--coco-images", str(folder), "--output-dir", str(run)]
    args += ["--num-captions", "3", "--steps", "1", "--fid-size", "32", "--num-workers", "0"]
    assert main(args + ["--fid-cache", str(tmp_path / "cache")]) == 0

    results = load_results(run)
    assert results["format_version"] == 2
    assert results["protocol"] == {
        "name": "linfusion",
        "overrides": {
            "num_captions": {"protocol": 30000, "used": 3},
            "num_inference_steps": {"protocol": 25, "used": 1},
            "fid_size": {"protocol": 256, "used": 32},
        },
    }
    settings = results["settings"]
    for key in ("guidance_scale", "clip_model", "clip_pretrained", "clip_prefix", "clip_image_size", "fid_resize"):
        assert settings[key] == PROTOCOLS["linfusion"][key], key
    native = 128  # the tiny SD-1.5's size: LinFusion generates at the model's native size
    assert (settings["height"], settings["width"], settings["steps"], settings["num_captions"]) == (
        native,
        native,
        1,
        3,
    )
    assert settings["safety_checker"] is False and settings["captions_file"] == "captions.txt"
    assert results["metrics"]["clip_t"]["caption_prefix"] == "A photo depicts "
    assert results["metrics"]["clip_t"]["image_preprocessing"] == "center square crop, lanczos resize to 256"
    fid = results["metrics"]["fid"]
    assert fid["reference"]["set"] == "folder" and (fid["num_real"], fid["num_generated"]) == (len(CAPTIONS), 3)
    assert fid["reference"]["cached"] is False and "lanczos resize to 32x32" in fid["preprocessing"]
    manifest = read_manifest(run / "images")
    assert [(r.caption, r.seed, r.image_id) for r in manifest] == [
        ("a red bus", 0, None),
        ("two dogs in the snow", 1, None),
        ("a bowl of oranges", 2, None),
    ]
    assert main(args + ["--fid-cache", str(tmp_path / "cache")]) == 0
    assert load_results(run)["metrics"]["fid"]["reference"]["cached"] is True


def test_captions_file_reading_and_its_errors(captions_and_folder, tmp_path):
    captions, _ = captions_and_folder
    records = read_captions_file(captions)
    assert [(r.index, r.seed, r.caption) for r in records] == [
        (0, 0, "a red bus"),
        (1, 1, "two dogs in the snow"),
        (2, 2, "a bowl of oranges"),
        (3, 3, "a man surfing"),
    ]
    assert read_captions_file(captions, 2) == records[:2]
    with pytest.raises(ValueError, match="has 4 non-empty lines"):
        read_captions_file(captions, 5)
    with pytest.raises(FileNotFoundError, match="one caption a line"):
        read_captions_file(tmp_path / "none.txt")
    folder, run = str(captions.parent / "val2014"), str(tmp_path / "run")
    # A captions file names no images: its FID reference defaults to the whole folder; "selected" is refused.
    assert EvaluationConfig(None, folder, run, captions_file=str(captions)).fid_reference == "folder"
    assert EvaluationConfig("captions.json", folder, run).fid_reference == "selected"
    config = EvaluationConfig(None, folder, run, captions_file=str(captions), fid_reference="selected")
    with pytest.raises(ValueError, match="--fid-reference folder"):
        evaluate(_never_load, config, fid_feature_extractor=TinyFeatureExtractor(), clip=tiny_clip())


# ---------------------------------------------------------------- FID reference cache


def test_reference_cache_key_changes_with_the_images_and_the_preprocessing(coco, tmp_path):
    _, folder = coco
    files = reference_files("folder", folder, [])
    assert [p.name for p in files] == sorted(p.name for p in folder.iterdir())
    state, cache = PartialState(cpu=True), tmp_path / "cache"
    backend = custom_fid_backend(TinyFeatureExtractor())

    def stats(size=32, resize="bicubic", model=backend, images=None):
        return reference_statistics(images or files, model, size, resize, cache, state)

    mu, sigma, count, info = stats()
    assert (count, info["cached"]) == (len(files), False) and (cache / f"{info['key']}.npz").is_file()
    with torch.no_grad():
        features = torch.cat(
            [backend.model(backend.prepare(fid_image(Image.open(f), 32, "bicubic"))[None]) for f in files]
        )
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-7)

    mu2, sigma2, _, again = stats()
    assert again["cached"] is True and again["key"] == info["key"]
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    keys = {info["key"]}
    for changed in (
        stats(size=48),
        stats(resize="lanczos"),
        stats(model=custom_fid_backend(TinyFeatureExtractor(seed=1))),
        stats(images=files[:-1]),
    ):
        assert changed[3]["cached"] is False and changed[3]["key"] not in keys
        keys.add(changed[3]["key"])
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))  # the image changed
    assert stats()[3]["key"] not in keys


# ---------------------------------------------------------------- metric backends and weights


class _TinyInceptionScript(nn.Module):
    """A TorchScript file laid out as clean-fid's ``inception-2015-12-05.pt`` (``layers`` maps 299 px to 2048-d)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_clean_fid_backend_uses_its_clean_resize_and_a_local_weights_file(coco, tmp_path):
    from cleanfid.resize import build_resizer

    torch.manual_seed(0)
    script = torch.jit.script(_TinyInceptionScript())
    weights = tmp_path / "my-inception.pt"  # any name: clean-fid itself wants inception-2015-12-05.pt
    script.save(str(weights))
    backend = load_fid_backend("clean-fid", weights)
    assert (backend.name, backend.weights) == ("clean-fid", weights)

    image = fid_image(Image.open(next(coco[1].iterdir())), 256, "lanczos")
    prepared = backend.prepare(image)
    expected = build_resizer("clean")(np.asarray(image))
    assert prepared.shape == (3, 299, 299) and prepared.dtype == torch.float32
    np.testing.assert_array_equal(prepared.permute(1, 2, 0).numpy(), expected)
    with torch.no_grad():
        torch.testing.assert_close(backend.model(prepared[None]), script.layers((prepared[None] - 128) / 128))

    config = _config(coco, tmp_path / "run", num_captions=2, fid_backend="clean-fid", fid_weights=str(weights))
    results = evaluate(tiny_pipeline("sd15"), config, clip=tiny_clip())
    fid = results["metrics"]["fid"]
    assert fid["backend"] == "clean-fid" and fid["weights"] == str(weights) and np.isfinite(fid["value"])


def test_torchmetrics_backend_loads_a_local_inception_file(coco, tmp_path):
    """torchmetrics' Inception from a weights file laid out as torch-fidelity's (random values: offline)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}):  # build only, no download
        with mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict"):
            network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(network.state_dict(), weights)

    config = _config(coco, tmp_path / "run", num_captions=2, fid_backend="torchmetrics", fid_weights=str(weights))
    results = evaluate(tiny_pipeline("sd15"), config, clip=tiny_clip())
    fid = results["metrics"]["fid"]
    assert fid["backend"] == "torchmetrics" and fid["weights"] == str(weights) and np.isfinite(fid["value"])
    assert fid["model"].startswith("torchmetrics Inception-v3")


@pytest.mark.parametrize("which", ["torchmetrics", "clean-fid", "clip"])
def test_junk_metric_weights_are_refused_before_any_image(coco, tmp_path, which):
    """A truncated or wrong weights file is loaded and refused, naming the file, before the pipeline loads."""
    junk = tmp_path / ("clip.safetensors" if which == "clip" else "inception.pth")
    junk.write_bytes(b"<html>404 Not Found</html>")
    if which == "clip":
        clip_model = register_tiny_clip(tmp_path, "gspn-test-tiny-clip-2")
        config = _config(coco, tmp_path / "run", clip_model=clip_model, clip_pretrained=str(junk))
        kwargs = {"fid_feature_extractor": TinyFeatureExtractor()}
    else:
        config = _config(coco, tmp_path / "run", fid_backend=which, fid_weights=str(junk))
        kwargs = {"clip": tiny_clip()}
    with pytest.raises(ValueError) as info:
        evaluate(_never_load, config, **kwargs)
    assert str(junk) in str(info.value) and ("--clip-pretrained" if which == "clip" else "--fid-weights") in str(
        info.value
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- settings checked first


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_inference_steps": 0}, "--steps must be at least 1"),
        ({"height": 12}, "--height must be a positive multiple of 8"),
        ({"width": -64}, "--width must be a positive multiple of 8"),
        ({"num_captions": 0}, "--num-captions must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"fid_size": 0}, "--fid-size must be at least 16"),
        ({"fid_backend": "tf"}, "--fid-backend must be one of clean-fid, torchmetrics"),
        ({"fid_reference": "train"}, "--fid-reference must be one of selected, folder"),
        ({"captions_file": "c.txt"}, "exactly one caption source"),
    ],
)
def test_bad_settings_fail_before_anything_loads(coco, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluate(_never_load, _config(coco, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_cli_refuses_bad_arguments_before_loading(captions_and_folder, tmp_path, caplog):
    captions, folder = captions_and_folder
    base = ["evaluate", "--tiny", "sd15", "--original", "--captions", str(captions), "--coco-images", str(folder)]
    base += ["--output-dir", str(tmp_path / "run")]
    caplog.set_level(logging.ERROR)
    assert main(base + ["--steps", "0", "--height", "100"]) == 2
    assert "--steps must be at least 1" in caplog.text and "--height must be a positive multiple of 8" in caplog.text
    if not torch.cuda.is_available():
        caplog.clear()
        assert main(base + ["--device", "cuda"]) == 2
        assert "no CUDA GPU" in caplog.text
    assert not (tmp_path / "run").exists()


def test_cli_checks_the_gspn_weights_before_the_metric_models(captions_and_folder, tmp_path, caplog):
    """A broken --gspn-weights or --model is named before the metric weights (minutes for ViT-g) are read."""
    captions, folder = captions_and_folder
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "gspn_config.json").write_text("{not json")
    (weights / "gspn_weights.safetensors").write_bytes(b"")
    argv = ["evaluate", "--tiny", "sd15", "--gspn-weights", str(weights), "--captions", str(captions)]
    argv += ["--coco-images", str(folder), "--fid-reference", "folder", "--output-dir", str(tmp_path / "run")]
    argv += ["--fid-weights", str(tmp_path / "no-inception.pth")]
    caplog.set_level(logging.ERROR)
    assert main(argv) == 2
    assert "gspn_config.json is not valid JSON" in caplog.text and "no-inception" not in caplog.text
    assert list((tmp_path / "run").iterdir()) == []  # proven writable (created, probed), nothing written into it
    caplog.clear()
    argv[argv.index("--tiny") : argv.index("--tiny") + 2] = ["--model", str(tmp_path / "no-such-model")]
    argv[argv.index("--gspn-weights") : argv.index("--gspn-weights") + 2] = ["--original"]
    assert main(argv) == 2
    assert "no-such-model" in caplog.text and "no-inception" not in caplog.text


# ---------------------------------------------------------------- resume by content, safety checker


def _gspn_folder(tmp_path, name: str, shift: float = 0.0):
    """A converted tiny SD-1.5's GSPN weights; ``shift`` stands for another distillation."""
    folder = tmp_path / name
    assert main(["convert", "--tiny", "sd15", "--output", str(folder), "--overwrite"]) == 0
    if shift:
        pipe = load_gspn(tiny_pipeline("sd15"), folder)
        with torch.no_grad():
            for param in gspn_parameters(pipe).values():
                param.add_(shift)
        save_gspn(pipe, tmp_path / f"{name}-new")
        shutil.rmtree(folder)
        (tmp_path / f"{name}-new").rename(folder)
    return folder


def test_resume_is_keyed_by_the_weights_content_not_their_path(coco, tmp_path):
    calls = [0]

    def loader(folder):
        def load():
            pipe = load_gspn(tiny_pipeline("sd15"), folder)
            pipe.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            return pipe

        return load

    extractor, clip = TinyFeatureExtractor(), tiny_clip()
    config = _config(coco, tmp_path / "run", num_captions=2, batch_size=2)
    first = _gspn_folder(tmp_path, "gspn")
    results = evaluate(loader(first), config, gspn_weights=str(first), fid_feature_extractor=extractor, clip=clip)
    assert calls[0] == 2 and len(results["settings"]["gspn_weights_sha256"]) == 64

    moved = tmp_path / "elsewhere" / "gspn"
    shutil.copytree(first, moved)
    again = evaluate(loader(moved), config, gspn_weights=str(moved), fid_feature_extractor=extractor, clip=clip)
    assert calls[0] == 2, "the same weights under another path reuse the images"
    assert again["settings"]["gspn_weights"] == str(moved)
    assert again["settings"]["gspn_weights_sha256"] == results["settings"]["gspn_weights_sha256"]

    redistilled = _gspn_folder(tmp_path, "gspn", shift=0.01)  # new weights in the same folder
    assert redistilled == first
    with pytest.raises(ValueError, match="gspn_weights_sha256"):
        evaluate(loader(first), config, gspn_weights=str(first), fid_feature_extractor=extractor, clip=clip)
    assert calls[0] == 2


class _CountingSafetyChecker:
    """Stands in for SD-1.5's checker (not under test: whether evaluation runs it is); flags nothing."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, clip_input):
        self.calls += 1
        return images, [False] * len(images)


def test_safety_checker_is_off_during_evaluation_unless_kept(coco, tmp_path):
    from transformers import CLIPImageProcessor

    pipe = tiny_pipeline("sd15")
    checker = _CountingSafetyChecker()
    pipe.safety_checker, pipe.feature_extractor = checker, CLIPImageProcessor(size={"shortest_edge": 32})
    extractor, clip = TinyFeatureExtractor(), tiny_clip()

    off = evaluate(pipe, _config(coco, tmp_path / "off", num_captions=2), fid_feature_extractor=extractor, clip=clip)
    assert checker.calls == 0 and off["settings"]["safety_checker"] is False
    assert pipe.safety_checker is checker, "the caller's pipeline gets its checker back"

    kept = _config(coco, tmp_path / "on", num_captions=2, batch_size=1, safety_checker=True)
    on = evaluate(pipe, kept, fid_feature_extractor=extractor, clip=clip)
    assert checker.calls == 2 and on["settings"]["safety_checker"] is True


def test_version_1_results_are_put_on_the_cosine_scale(tmp_path):
    document = {
        "format": "gspn-diffusers-evaluation",
        "metrics": {"fid": {"value": 30.86}, "clip_t": {"value": 30.7, "definition": "100 x mean cosine"}},
        "settings": {},
    }
    (tmp_path / "results.json").write_text(json.dumps(document))
    results = load_results(tmp_path)
    assert results["metrics"]["clip_t"]["value"] == pytest.approx(0.307)
    assert results["metrics"]["fid"]["value"] == 30.86
