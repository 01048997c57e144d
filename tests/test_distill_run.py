"""The trainer's run-level behaviour: entry script, checkpoints that survive interruption, the output-folder
guard, the latent cache, SD-XL's unconditional input, the block feature loss and validation under FSDP."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from safetensors.torch import load_file
from test_distill import _free_port, data_flags, train_argv, write_files

from gspn_diffusers import GSPNConfig, convert, load_gspn
from gspn_diffusers.cli import main as cli_main
from gspn_diffusers.cli_args import config_flags_given
from gspn_diffusers.distill.args import parse_args
from gspn_diffusers.distill.cache import COMPLETE_MARKER as CACHE_COMPLETE
from gspn_diffusers.distill.checkpoints import INCOMPLETE_PREFIX, resolve_resume, save_checkpoint
from gspn_diffusers.distill.conditioning import encode_text, latent_moments, prepare_inputs
from gspn_diffusers.distill.data import ImageCaptionDataset
from gspn_diffusers.distill.layouts import find_records
from gspn_diffusers.distill.losses import FeatureRecorder, LossWeights, distillation_losses
from gspn_diffusers.distill.run_dir import plan_run
from gspn_diffusers.distill.train import check_args, main
from gspn_diffusers.serialization import WEIGHTS_NAME
from gspn_diffusers.tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")  # conftest.py

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def test_entry_script_trains_two_steps_and_refuses_a_used_output_dir(tmp_path):
    """distill/train_gspn_distill.py as Diffusers' examples are run, with the default data workers."""
    data = write_files(tmp_path / "data")
    argv = train_argv(tmp_path / "out", "sd15", "--train_data_dir", str(data), "--max_train_steps", "2")
    i = argv.index("--dataloader_num_workers")
    del argv[i : i + 2]  # the default: min(4, CPUs) workers
    command = [sys.executable, str(REPO / "distill" / "train_gspn_distill.py"), *argv, "--checkpointing_steps", "1"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    load_gspn(tiny_pipeline("sd15"), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "holds another run's results" in again.stderr and "--resume_from_checkpoint" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the [deepspeed] extra)")
def test_deepspeed_config_takes_the_trainer_s_gradient_accumulation(tmp_path):
    """deepspeed_zero2.yaml says 1; --gradient_accumulation_steps 2 must still run (one CPU process)."""
    data = write_files(tmp_path / "data")
    argv = train_argv(tmp_path / "out", "sd15", "--train_data_dir", str(data), "--max_train_steps", "2")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "distill" / "configs" / "deepspeed_zero2.yaml"), "--num_processes", "1"]
    launch += ["--mixed_precision", "no", "--main_process_port", str(_free_port())]
    command = [*launch, str(REPO / "distill" / "train_gspn_distill.py"), *argv, "--gradient_accumulation_steps", "2"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 4 (per device 2 x 1 processes x 2 accumulation)" in result.stderr
    load_gspn(tiny_pipeline("sd15"), tmp_path / "out")


def _tiny_accelerator(tmp_path: Path) -> tuple[Accelerator, torch.nn.Module]:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_an_interrupted_checkpoint_save_loses_nothing(tmp_path):
    accelerator, _ = _tiny_accelerator(tmp_path)
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, limit=2)

    def interrupted(models, weights, output_dir):
        raise KeyboardInterrupt

    handle = accelerator.register_save_state_pre_hook(interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 3, limit=2)
    handle.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{INCOMPLETE_PREFIX}checkpoint-3",
        "checkpoint-1",
        "checkpoint-2",
    ]
    (tmp_path / "checkpoint-4").mkdir()  # written in place by an older trainer and cut off: no completion marker
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)
    save_checkpoint(accelerator, tmp_path, 3, limit=2)  # old ones deleted only once the new one is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-3"


def test_output_dir_of_another_run_is_refused_before_any_model_loads(tmp_path, caplog):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / WEIGHTS_NAME).write_bytes(b"")
    argv = ["distill", *train_argv(out, "sd15", "--train_data_dir", str(tmp_path / "missing"))]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == 2
    assert "holds another run's results (checkpoint-5, gspn_weights.safetensors)" in caplog.text
    with pytest.raises(ValueError, match="pass one"):
        plan_run(out, "latest", overwrite=True)
    # Final weights and only an unfinished checkpoint: nothing to resume, and the weights are not overwritten.
    with pytest.raises(ValueError, match="holds final GSPN weights but no usable checkpoint"):
        plan_run(out, "latest", overwrite=False)
    plan = plan_run(out, None, overwrite=True)
    assert sorted(p.name for p in plan.replace) == ["checkpoint-5", WEIGHTS_NAME]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", WEIGHTS_NAME]  # planning moves nothing


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolution", "60"], "multiple of 8"),
        (["--logging_steps", "0"], "--logging_steps must be at least 1"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be positive"),
        (["--dataloader_num_workers", "-1"], "must not be negative"),
        (["--ema_decay", "1.5"], "--ema_decay"),
        (["--gspn_weights", str(Path(__file__).parent)], "gspn_config.json is missing"),
        (["--gspn_weights", "no_such_weights"], "'no_such_weights' does not exist"),
        (["--gspn_weights", "JUNK_CONFIG"], "gspn_config.json is not valid JSON"),
    ],
)
def test_bad_arguments_are_refused_before_loading(tmp_path, flags, message):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "gspn_config.json").write_text("{not json")
    (junk / "gspn_weights.safetensors").write_bytes(b"")
    flags = [str(junk) if flag == "JUNK_CONFIG" else flag for flag in flags]
    args = parse_args([*train_argv(tmp_path / "out", "sd15", "--train_data_dir", "x"), *flags])
    with pytest.raises(ValueError, match=message):
        check_args(args)


def test_conversion_flags_take_underscores_like_every_trainer_flag(tmp_path):
    argv = train_argv(tmp_path / "out", "sd15", "--train_data_dir", "x")
    args = parse_args([*argv, "--gate_rank", "8", "--gate_channels", "4", "--chunk_size", "global"])
    assert (args.gate_rank, args.gate_channels, args.chunk_size) == (8, 4, None)
    assert config_flags_given(args) == ["--gate-rank", "--gate-channels", "--chunk-size"]


def test_missing_local_model_is_named(tmp_path):
    argv = train_argv(tmp_path / "out", "sd15", "--train_data_dir", "x")
    argv[argv.index("--tiny") : argv.index("--tiny") + 2] = ["--model", "./no/such/model"]
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        check_args(parse_args(argv))
    # A folder that is not a Diffusers pipeline is refused here too, not after the dataset is indexed.
    argv[argv.index("--model") + 1] = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        check_args(parse_args(argv))


def test_cache_latents_encodes_once_and_trains(tmp_path, caplog):
    flags = data_flags("files", tmp_path / "data")
    argv = _without_max_steps(train_argv(tmp_path / "out", "sdxl", *flags, "--cache_latents"))
    argv += ["--num_train_epochs", "2", "--caption_dropout", "0.5"]
    result = main(parse_args(argv))
    assert result.global_step == 6  # 6 images, batch 2: 3 steps an epoch
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    (cache,) = (tmp_path / "out" / "latent_cache").iterdir()
    assert (cache / CACHE_COMPLETE).is_file()
    items = sorted(cache.glob("*.safetensors"))
    assert len(items) == 6
    first = load_file(items[0])
    assert set(first) == {"latent_mean", "latent_std", "prompt_embeds", "pooled", "original_size", "crop_top_left"}
    # The cached item is the first epoch's crop of image 0, encoded by the VAE and both text encoders.
    pipe = tiny_pipeline("sdxl")
    dataset = ImageCaptionDataset(find_records(train_data_dir=flags[1]), 64, seed=0)
    sample = dataset[0]
    mean, _ = latent_moments(pipe, sample["pixel_values"][None])
    torch.testing.assert_close(first["latent_mean"], mean[0])
    text = encode_text(pipe, [sample["caption"]], torch.device("cpu"))
    torch.testing.assert_close(first["prompt_embeds"], text["prompt_embeds"][0])
    assert first["crop_top_left"].tolist() == sample["crop_top_left"].tolist()

    reset_accelerate()
    with caplog.at_level(logging.INFO):
        again = main(parse_args([*argv, "--overwrite_output_dir", "--max_train_steps", "1"]))
    assert again.global_step == 1
    assert "Reusing the latent cache" in caplog.text


def _without_max_steps(argv: list[str]) -> list[str]:
    i = argv.index("--max_train_steps")
    return argv[:i] + argv[i + 2 :]


def test_sdxl_unconditional_input_is_zeros_as_at_inference():
    pipe = tiny_pipeline("sdxl")
    embeddings = encode_text(pipe, ["a red square", ""], torch.device("cpu"))
    for key in ("prompt_embeds", "pooled"):
        assert torch.count_nonzero(embeddings[key][1]) == 0, key
        assert torch.count_nonzero(embeddings[key][0]) > 0, key
    # What the pipeline gives for the negative (unconditional) input with force_zeros_for_empty_prompt:
    _, negative, _, negative_pooled = pipe.encode_prompt(
        "a red square", device="cpu", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(embeddings["prompt_embeds"][1], negative[0])
    torch.testing.assert_close(embeddings["pooled"][1], negative_pooled[0])
    sd15 = encode_text(tiny_pipeline("sd15"), [""], torch.device("cpu"))
    assert torch.count_nonzero(sd15["prompt_embeds"]) > 0  # SD-1.5's unconditional input is the encoded ""


def test_dropped_captions_reach_the_unet_as_zero_embeddings():
    pipe = tiny_pipeline("sdxl")
    batch = {
        "pixel_values": torch.zeros(2, 3, 64, 64),
        "captions": ["a", "b"],
        "original_sizes": torch.tensor([[64, 64]] * 2),
        "crops_top_left": torch.zeros(2, 2, dtype=torch.long),
    }
    scheduler = copy.deepcopy(pipe.scheduler)
    inputs = prepare_inputs(pipe, scheduler, batch, 64, torch.float32, caption_dropout=1.0)
    assert torch.count_nonzero(inputs.unet_kwargs["encoder_hidden_states"]) == 0
    assert torch.count_nonzero(inputs.unet_kwargs["added_cond_kwargs"]["text_embeds"]) == 0


def test_block_feature_loss_reads_the_unet_blocks():
    pipe = tiny_pipeline("sd15")
    teacher = copy.deepcopy(pipe.unet)
    torch.manual_seed(0)
    convert(pipe, GSPNConfig.from_preset("sd15", gate_rank=2))
    recorders = FeatureRecorder(pipe.unet, "blocks"), FeatureRecorder(teacher, "blocks")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = {"encoder_hidden_states": torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))}
    terms = {}
    for reduction in ("mean", "sum"):
        weights = LossWeights(feature_reduction=reduction)
        with torch.no_grad():
            terms[reduction] = distillation_losses(
                pipe.unet, teacher, *recorders, latents, torch.tensor([500]), latents, conditioning, weights
            )["feature"]
        names = set(recorders[0].outputs)
    assert names == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert terms["mean"] > 0
    torch.testing.assert_close(terms["sum"], terms["mean"] * 5)


FSDP_SCRIPT = """
import sys, torch
from pathlib import Path
from types import SimpleNamespace
from accelerate import Accelerator
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from gspn_diffusers import GSPNConfig, convert, gspn_parameters, load_gspn, save_gspn
from gspn_diffusers.distill.validation import Validation, full_parameters
from gspn_diffusers.tiny import tiny_pipeline

accelerator = Accelerator(cpu=True)  # gloo process group of the two processes
out = sys.argv[1]
pipe = tiny_pipeline("sd15")
teacher = pipe.unet.__class__.from_config(pipe.unet.config)
teacher.load_state_dict(pipe.unet.state_dict())
torch.manual_seed(0)
convert(pipe, GSPNConfig.from_preset("sd15", gate_rank=2))
for param in gspn_parameters(pipe).values():
    torch.nn.init.normal_(param, std=0.02)  # weights that differ from the initial ones
save_gspn(pipe, f"{out}/before_sharding_{accelerator.process_index}")
# What Accelerate's FSDP does on GPUs (it does not offer FSDP on the CPU): FSDP2 shards in place into DTensors,
# each BasicTransformerBlock on its own as distill/configs/fsdp.yaml's wrap policy asks, then the rest; FSDP1
# wraps and leaves the UNet's parameters as views of a flat shard (empty on one of the processes).
if sys.argv[2] == "2":
    from diffusers.models.attention import BasicTransformerBlock

    for block in [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]:
        fully_shard(block)
    fully_shard(pipe.unet)
    prepared = pipe.unet
    assert type(next(pipe.unet.parameters())).__name__ == "DTensor"
else:
    pipe.unet.requires_grad_(False)
    for param in gspn_parameters(pipe).values():
        param.requires_grad_(True)
    prepared = FullyShardedDataParallel(pipe.unet, use_orig_params=True, device_id=torch.device("cpu"))
    assert pipe.unet.conv_in.weight.dim() == 1
args = SimpleNamespace(validation_prompts=["a red square"], seed=0, num_validation_inference_steps=1, output_dir=out)
path = Validation(pipe, teacher, args, accelerator, 64)(1, prepared)
with full_parameters(prepared):
    if accelerator.is_main_process:
        save_gspn(pipe.unet, f"{out}/gathered")
accelerator.wait_for_everyone()
# One file per process: the two processes' prints interleave on the shared stdout.
Path(out, f"done_{accelerator.process_index}").write_text(str(path))
"""


@pytest.mark.parametrize("fsdp_version", ["1", "2"])
def test_validation_and_saving_under_fsdp_two_processes(tmp_path, fsdp_version):
    script = tmp_path / "fsdp_validation.py"
    script.write_text(FSDP_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(script), str(tmp_path), fsdp_version,
    ]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "done_0").is_file() and (tmp_path / "done_1").is_file()
    assert (tmp_path / "validation" / "step-0000001.png").is_file()
    gathered = load_file(tmp_path / "gathered" / WEIGHTS_NAME)
    for rank in range(2):
        before = load_file(tmp_path / f"before_sharding_{rank}" / WEIGHTS_NAME)
        assert gathered.keys() == before.keys()
        for key in before:
            torch.testing.assert_close(gathered[key], before[key], rtol=0, atol=0, msg=key)
