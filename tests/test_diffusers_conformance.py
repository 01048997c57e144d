"""A converted pipeline is a Diffusers pipeline: it saves, reloads, composes, and never loses GSPN silently.

Every test runs on tiny SD-1.5 / SD-XL pipelines whose GSPN weights are perturbed from their start values
(as distilled ones are), so that a pipeline which dropped GSPN gives a visibly different image, and each
asserts on outputs: equal to the GSPN pipeline's own, or different from the original model's.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPAGPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import gspn_diffusers
from gspn_diffusers import GSPNConfig, GSPNControlNetModel, GSPNUNet2DConditionModel
from gspn_diffusers.convert import gspn_config_of
from gspn_diffusers.errors import GSPNUserError
from gspn_diffusers.models import gspn_components, self_attention_layers
from gspn_diffusers.processor import GSPNAttnProcessor, GSPNPAGCFGIdentitySelfAttnProcessor
from gspn_diffusers.tiny import tiny_pipeline

PROMPT = "a lighthouse at dawn"
TOLERANCE = 1e-5  # the perturbed GSPN moves the image by > 0.05: far above it


def convert_perturbed(model, seed: int = 1) -> None:
    """Convert, then move every GSPN weight off its start value, as distillation does (the same on every call:
    the gate down-projection's random start comes from the global generator)."""
    torch.manual_seed(seed)
    gspn_diffusers.convert(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in gspn_diffusers.gspn_modules(model).values():
            for param in module.parameters():
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def images(pipe, steps: int = 2, **kwargs) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(kind, one_thread):
    """(the original model's image, the GSPN pipeline's image) for this kind."""
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    original = images(pipe)
    convert_perturbed(pipe)
    gspn = images(pipe)
    assert np.abs(gspn - original).max() > 0.05  # dropping GSPN must be visible
    return original, gspn


@pytest.fixture
def gspn_pipe(kind, reference):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    convert_perturbed(pipe)
    return pipe


def assert_gspn_output(pipe, reference, atol: float = TOLERANCE, **kwargs) -> None:
    original, gspn = reference
    out = images(pipe, **kwargs)
    np.testing.assert_allclose(out, gspn, atol=atol, rtol=0)
    assert np.abs(out - original).max() > 0.05


# ----------------------------------------------------------------------------------------------- saving, loading
def test_save_pretrained_round_trip_is_the_same_gspn_pipeline(gspn_pipe, reference, tmp_path):
    gspn_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["gspn_diffusers.models", "GSPNUNet2DConditionModel"]
    unet_config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "GSPNUNet2DConditionModel"
    assert GSPNConfig.from_dict(unet_config["gspn_config"]) == gspn_config_of(gspn_pipe)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, GSPNUNet2DConditionModel) and gspn_diffusers.is_converted(loaded)
    assert_gspn_output(loaded, reference)
    gspn_diffusers.restore(loaded)
    np.testing.assert_allclose(images(loaded), reference[0], atol=TOLERANCE, rtol=0)


def test_load_gspn_into_a_pipeline_then_save_pretrained_keeps_gspn(kind, gspn_pipe, reference, tmp_path):
    gspn_diffusers.save_gspn(gspn_pipe, tmp_path / "adapter")
    base = tiny_pipeline(kind)
    gspn_diffusers.load_gspn(base, tmp_path / "adapter")
    base.save_pretrained(tmp_path / "full")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "full")
    loaded.set_progress_bar_config(disable=True)
    assert_gspn_output(loaded, reference)


def test_version_1_checkpoints_still_load(kind, gspn_pipe, reference, tmp_path):
    """Before GSPN moved onto the layer, save_gspn stored its weights under attn1.processor.* (format 1)."""
    from safetensors.torch import load_file, save_file

    gspn_diffusers.save_gspn(gspn_pipe, tmp_path)
    weights = tmp_path / "gspn_weights.safetensors"
    save_file({k.replace(".gspn.", ".processor."): v for k, v in load_file(weights).items()}, weights)
    document = json.loads((tmp_path / "gspn_config.json").read_text())
    (tmp_path / "gspn_config.json").write_text(json.dumps({**document, "format_version": 1}))
    base = tiny_pipeline(kind)
    base.set_progress_bar_config(disable=True)
    gspn_diffusers.load_gspn(base, tmp_path)
    assert_gspn_output(base, reference)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_unet_alone_round_trips_with_variant_dtype_and_device_map(gspn_pipe, tmp_path, safe_serialization):
    unet = gspn_pipe.unet
    unet.save_pretrained(tmp_path, safe_serialization=safe_serialization, variant="v1")
    loaded = GSPNUNet2DConditionModel.from_pretrained(
        tmp_path, variant="v1", torch_dtype=torch.bfloat16, device_map="cpu"
    )
    assert loaded.dtype == torch.bfloat16 and gspn_diffusers.is_converted(loaded)
    expected = {k: v.to(torch.bfloat16) for k, v in unet.state_dict().items()}
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0)
    fp32 = GSPNUNet2DConditionModel.from_pretrained(tmp_path, variant="v1", low_cpu_mem_usage=False)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        torch.testing.assert_close(fp32(sample, 10, text, **kwargs).sample, unet(sample, 10, text, **kwargs).sample)


def test_loading_a_gspn_pipeline_without_the_package_names_it(gspn_pipe, tmp_path):
    gspn_pipe.save_pretrained(tmp_path)
    script = (
        "import sys; sys.modules['gspn_diffusers'] = None\n"  # as if the package were not installed
        "from diffusers import DiffusionPipeline\n"
        f"DiffusionPipeline.from_pretrained({str(tmp_path)!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "gspn_diffusers" in run.stderr.splitlines()[-1]


def test_push_to_hub_uploads_what_from_pretrained_rebuilds(gspn_pipe, reference, tmp_path, monkeypatch):
    """push_to_hub is save_pretrained into a temporary folder, then an upload of that folder: the upload (the one
    step that needs a network) is replaced by a copy, and the copy loads as the same GSPN pipeline."""
    from diffusers.utils import hub_utils

    uploaded = tmp_path / "uploaded"

    def copy_instead_of_upload(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, **kw):
        shutil.copytree(working_dir, uploaded)

    monkeypatch.setattr(hub_utils.PushToHubMixin, "_upload_folder", copy_instead_of_upload)
    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **k: type("Repo", (), {"repo_id": "me/gspn"})())
    gspn_pipe.push_to_hub("me/gspn")
    index = json.loads((uploaded / "model_index.json").read_text())
    assert index["unet"] == ["gspn_diffusers.models", "GSPNUNet2DConditionModel"]
    loaded = DiffusionPipeline.from_pretrained(uploaded)
    loaded.set_progress_bar_config(disable=True)
    assert_gspn_output(loaded, reference)


# --------------------------------------------------------------------------------------------- processor swaps
@pytest.mark.parametrize(
    "swap",
    [
        lambda p: p.unet.set_attn_processor(AttnProcessor2_0()),
        lambda p: p.unet.set_attn_processor({name: AttnProcessor() for name in p.unet.attn_processors}),
        lambda p: p.unet.set_default_attn_processor(),
        lambda p: p.enable_attention_slicing(),
        lambda p: (p.enable_attention_slicing(1), p.disable_attention_slicing()),
        lambda p: p.unet.set_use_memory_efficient_attention_xformers(False),
        lambda p: p.fuse_qkv_projections(),
        lambda p: (p.fuse_qkv_projections(), p.unfuse_qkv_projections()),
        lambda p: [setattr(a, "processor", AttnProcessor2_0()) for a in self_attention_layers(p.unet).values()],
    ],
    ids=[
        "set_attn_processor",
        "set_attn_processor_dict",
        "set_default_attn_processor",
        "attention_slicing",
        "slicing_on_off",
        "xformers_off",
        "fuse_qkv",
        "fuse_unfuse_qkv",
        "assign_processor",
    ],
)
def test_processor_swaps_keep_gspn_on_attn1(gspn_pipe, reference, swap, caplog):
    with caplog.at_level(logging.INFO, logger="gspn_diffusers.attention"):
        swap(gspn_pipe)
    assert gspn_diffusers.is_converted(gspn_pipe)
    layers = self_attention_layers(gspn_pipe.unet)
    assert all(isinstance(a.processor, GSPNAttnProcessor) for a in layers.values())
    assert_gspn_output(gspn_pipe, reference, atol=1e-4)


def test_attn2_takes_the_new_processor(gspn_pipe):
    gspn_pipe.unet.set_attn_processor(AttnProcessor())
    attn2 = [m for n, m in gspn_pipe.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and all(type(m.processor) is AttnProcessor for m in attn2)


def test_save_gspn_refuses_a_model_whose_gspn_layers_are_gone(gspn_pipe, tmp_path):
    del next(iter(self_attention_layers(gspn_pipe.unet).values())).gspn
    assert not gspn_diffusers.is_converted(gspn_pipe)
    with pytest.raises(GSPNUserError, match="lost the GSPN module of 1 self-attention"):
        gspn_diffusers.save_gspn(gspn_pipe, tmp_path / "w")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------- IP-Adapter
CLIP_DIM = 16


def tiny_ip_adapter(unet, seed: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter state dict in the original format (image projection + to_k_ip/to_v_ip per attn2)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": rand(4 * cross, CLIP_DIM), "proj.bias": rand(4 * cross)}
    image_proj.update({"norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)})
    layers, key_id = {}, 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hidden = module.to_k.out_features
            layers[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross)
            layers[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross)
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


def ip_images(pipe) -> np.ndarray:
    embeds = torch.randn(2, 1, CLIP_DIM, generator=torch.Generator().manual_seed(5))
    return images(pipe, ip_adapter_image_embeds=[embeds])


def load_tiny_ip_adapter(pipe) -> None:
    pipe.load_ip_adapter(tiny_ip_adapter(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)


@pytest.mark.parametrize("order", ["convert_then_load", "load_then_convert"])
def test_ip_adapter_works_with_gspn_in_both_orders(kind, reference, order):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    if order == "load_then_convert":
        load_tiny_ip_adapter(pipe)
        original_ip = ip_images(pipe)
        convert_perturbed(pipe)
    else:
        convert_perturbed(pipe)
        load_tiny_ip_adapter(pipe)
        original_ip = None
    assert gspn_diffusers.is_converted(pipe)
    with_ip = ip_images(pipe)
    assert np.abs(with_ip - reference[1]).max() > 0.01  # the adapter acts
    if original_ip is not None:
        assert np.abs(with_ip - original_ip).max() > 0.05  # and GSPN too
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(ip_images(pipe), reference[1], atol=1e-4, rtol=0)
    pipe.unload_ip_adapter()
    assert gspn_diffusers.is_converted(pipe) and pipe.unet.encoder_hid_proj is None
    assert_gspn_output(pipe, reference, atol=1e-4)


# --------------------------------------------------------------------------------------------------------- PAG
def test_pag_runs_gspn_on_the_guided_branch_and_identity_on_the_perturbed_one(kind, gspn_pipe, reference):
    pag_class = StableDiffusionXLPAGPipeline if kind == "sdxl" else StableDiffusionPAGPipeline
    pag = pag_class.from_pipe(gspn_pipe, pag_applied_layers=["mid", "up"], **gspn_components(gspn_pipe))
    pag.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(images(pag, pag_scale=0.0), reference[1], atol=1e-4, rtol=0)
    guided = images(pag, pag_scale=3.0)
    assert np.isfinite(guided).all() and np.abs(guided - reference[1]).max() > 1e-3
    layers = self_attention_layers(gspn_pipe.unet)
    assert all(isinstance(a.processor, GSPNAttnProcessor) for a in layers.values())  # PAG put them back
    assert_gspn_output(gspn_pipe, reference, atol=1e-4)


def test_gspn_pag_processor_against_its_definition(gspn_pipe):
    attn = next(iter(self_attention_layers(gspn_pipe.unet).values()))
    height, width = 4, 6
    attn.gspn.latent_size = (height, width)
    tokens = torch.randn(3, height * width, attn.to_v.in_features)
    with torch.no_grad():
        out = GSPNPAGCFGIdentitySelfAttnProcessor()(attn, tokens)
        guided = GSPNAttnProcessor()(attn, tokens[:2])
        identity = attn.to_out[0](attn.to_v(tokens[2:]))
    torch.testing.assert_close(out, torch.cat([guided, identity]))


# --------------------------------------------------------------------------------------------------- ControlNet
def control_image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_controlnet_pipelines_run_the_gspn_unet(kind, gspn_pipe, reference):
    plain = ControlNetModel.from_unet(tiny_pipeline(kind).unet)
    with torch.no_grad():
        for block in plain.controlnet_down_blocks:
            block.weight.normal_()  # zero at init: make the control visible
    cls = StableDiffusionXLControlNetPipeline if kind == "sdxl" else StableDiffusionControlNetPipeline
    pipe = cls.from_pipe(gspn_pipe, controlnet=plain, **gspn_components(gspn_pipe))
    pipe.set_progress_bar_config(disable=True)
    off = images(pipe, image=control_image(), controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(off, reference[1], atol=1e-4, rtol=0)
    on = images(pipe, image=control_image())
    assert np.abs(on - off).max() > 1e-3


def test_gspn_controlnet_from_unet_mirrors_the_unet_gspn_weights(gspn_pipe, tmp_path):
    with pytest.raises(RuntimeError, match="Unexpected key"):  # Diffusers' strict load: use GSPNControlNetModel
        ControlNetModel.from_unet(gspn_pipe.unet)
    controlnet = GSPNControlNetModel.from_unet(gspn_pipe.unet)
    assert gspn_diffusers.is_converted(controlnet)
    unet_modules = gspn_diffusers.gspn_modules(gspn_pipe.unet)
    cn_modules = gspn_diffusers.gspn_modules(controlnet)
    assert cn_modules and set(cn_modules) <= set(unet_modules)
    for name, module in cn_modules.items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, unet_modules[name].state_dict()[key], atol=0, rtol=0)
    controlnet.save_pretrained(tmp_path)
    loaded = GSPNControlNetModel.from_pretrained(tmp_path)
    assert gspn_diffusers.is_converted(loaded)
    for key, value in controlnet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)


def test_convert_a_pretrained_controlnet_from_the_unet_gspn(kind, gspn_pipe):
    controlnet = ControlNetModel.from_unet(tiny_pipeline(kind).unet)
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    gspn_diffusers.convert(controlnet, init_from=gspn_pipe.unet)
    assert isinstance(controlnet, GSPNControlNetModel)
    source = gspn_diffusers.gspn_modules(gspn_pipe.unet)
    for name, module in gspn_diffusers.gspn_modules(controlnet).items():
        torch.testing.assert_close(module.merge, source[name].merge, atol=0, rtol=0)
    gspn_diffusers.restore(controlnet)
    assert type(controlnet) is ControlNetModel
    after = controlnet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------- LoRA, compile, atomic
def test_lora_on_a_gspn_unet_changes_and_unloads(gspn_pipe, reference):
    from peft import LoraConfig

    gspn_pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "tiny")
    with torch.no_grad():
        for name, param in gspn_pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_()
    assert np.abs(images(gspn_pipe) - reference[1]).max() > 1e-3
    gspn_pipe.unet.disable_adapters()
    assert_gspn_output(gspn_pipe, reference, atol=1e-4)


def test_compiled_unet_is_accepted_everywhere(kind, gspn_pipe, reference, tmp_path):
    gspn_pipe.unet = torch.compile(gspn_pipe.unet, backend="eager")
    assert gspn_diffusers.is_converted(gspn_pipe)
    gspn_diffusers.save_gspn(gspn_pipe, tmp_path / "w")
    fresh = tiny_pipeline(kind)
    fresh.set_progress_bar_config(disable=True)
    gspn_diffusers.load_gspn(fresh, tmp_path / "w")
    assert_gspn_output(fresh, reference)
    gspn_diffusers.restore(gspn_pipe)
    assert type(gspn_pipe.unet._orig_mod) is UNet2DConditionModel
    np.testing.assert_allclose(images(gspn_pipe), reference[0], atol=1e-4, rtol=0)


def test_convert_checks_every_layer_before_it_changes_any():
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 40),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    processors = dict(unet.attn_processors)
    state = copy.deepcopy(unet.state_dict())
    with pytest.raises(GSPNUserError, match="does not divide the 40 channels"):
        gspn_diffusers.convert(unet, GSPNConfig(gate_channels=16))  # divides the 32 of the first layer only
    assert type(unet) is UNet2DConditionModel and "gspn_config" not in unet.config
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert set(unet.state_dict()) == set(state)
    assert not any(hasattr(a, "gspn") for a in self_attention_layers(unet).values())


# ------------------------------------------------------------------ Diffusers' fast-pipeline contracts, both models
@pytest.fixture(params=["original", "gspn"])
def either_pipe(request, kind, reference):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    if request.param == "gspn":
        convert_perturbed(pipe)
    return pipe


def test_contract_batch_consistency_and_num_images_per_prompt(either_pipe):
    single = images(either_pipe)
    batched = either_pipe(
        [PROMPT, "a red bicycle"],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
    ).images
    np.testing.assert_allclose(batched[:1], single, atol=1e-4, rtol=0)
    assert images(either_pipe, num_images_per_prompt=2).shape == (2, 64, 64, 3)


def test_contract_tuple_output_and_components_rebuild(either_pipe):
    as_dict = images(either_pipe)
    as_tuple = either_pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        return_dict=False,
    )[0]
    np.testing.assert_array_equal(as_tuple, as_dict)
    rebuilt = type(either_pipe)(**either_pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(rebuilt), as_dict)


def test_contract_callback_on_step_end_sees_and_changes_latents(either_pipe):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])}

    changed = images(either_pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert seen == [0, 1] and np.abs(changed - images(either_pipe)).max() > 1e-3


def test_contract_runs_in_bfloat16(either_pipe):
    either_pipe.to(torch.bfloat16)
    out = images(either_pipe)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
