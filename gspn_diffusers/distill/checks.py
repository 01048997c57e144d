"""Everything a distillation run can check before a model loads: flags, files, the output folder, the resume.

A mistake found here costs milliseconds and is one line that says what to pass instead; found after
the models load it would cost minutes (SD-XL), and found mid-run a user's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..config import GSPNConfig
from ..errors import GSPNUserError, probe_writable
from ..loading import check_model_source
from ..serialization import CONFIG_NAME, check_gspn
from .checkpoints import uses_ema
from .run_dir import RunPlan, check_inputs_outside, plan_run
from .state import GSPN_SUBFOLDER

# The GSPN config fields a flag sets, by the flag's name in the trainer's spelling.
CONFIG_FIELD_FLAGS = {
    "preset": "--preset",
    "gate_rank": "--gate_rank",
    "gate_channels": "--gate_channels",
    "chunk_size": "--chunk_size",
    "layer_chunk_sizes": "--chunk_size",
    "train_projections": "--train_projections",
}


def check_run(args: argparse.Namespace, requested_config: Callable[[str], GSPNConfig]) -> RunPlan:
    """Fail on impossible settings before anything is loaded, each with what to do instead; returns what the run
    will do with --output_dir (resume from which checkpoint, what it moves aside).

    ``requested_config``: the GSPN config the conversion flags ask for on top of a preset name (given by the entry
    point, which owns the argument helpers: library modules do not import them).
    """
    positive = ["train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"]
    positive += ["max_train_steps", "checkpoints_total_limit", "resolution", "num_validation_inference_steps"]
    positive += ["logging_steps"]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1; got {value}.")
    non_negative = ["teacher_loss_weight", "feature_loss_weight", "learning_rate", "lr_warmup_steps"]
    non_negative += ["validation_steps", "dataloader_num_workers", "adam_weight_decay"]
    for name in non_negative:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative; got {getattr(args, name)}.")
    if args.resolution is not None and args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE's downscaling); got {args.resolution}.")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ValueError(f"--caption_dropout is a probability in [0, 1]; got {args.caption_dropout}.")
    if not 0.0 < args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1]; got {args.ema_decay}.")
    if args.max_grad_norm <= 0:
        raise ValueError(f"--max_grad_norm must be positive; got {args.max_grad_norm}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name} must be in [0, 1); got {getattr(args, name)}.")
    if args.adam_epsilon <= 0:
        raise ValueError(f"--adam_epsilon must be positive; got {args.adam_epsilon}.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag).")
    if args.model is not None:
        check_model_source(args.model)  # a local folder holds a pipeline; a hub name offline is cached
    if args.gspn_weights is not None:
        check_gspn(args.gspn_weights)  # the folder (or hub repo), its config and the weights header
    for tracker in ("wandb", "comet_ml"):
        if args.report_to == tracker and importlib.util.find_spec(tracker) is None:
            raise ValueError(
                f"--report_to {tracker} needs it installed: pip install {tracker} (or --report_to tensorboard)."
            )
    output_dir = Path(args.output_dir)
    inputs = {"--gspn_weights": args.gspn_weights, "--train_data_dir": args.train_data_dir}
    inputs.update({"--dataset_name": args.dataset_name, "--model": args.model})
    check_inputs_outside(output_dir, inputs)
    plan = plan_run(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if plan.resume is not None:
        check_resume_matches(args, plan.resume, requested_config)
    probe_writable(output_dir, "--output_dir")
    if args.cache_latents and args.cache_dir is not None:
        probe_writable(Path(args.cache_dir), "--cache_dir")
    return plan


def _saved_config(folder: Path) -> GSPNConfig:
    return GSPNConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text())["config"])


def _shown(name: str, value: Any) -> str:
    return "global" if name == "chunk_size" and value is None else str(value)


def check_resume_matches(
    args: argparse.Namespace, checkpoint: Path, requested_config: Callable[[str], GSPNConfig]
) -> None:
    """A resume needs the settings the checkpoint was saved with: --use_ema and the GSPN config flags.

    Refused here, before the models load, naming the flag and the value the checkpoint needs (the
    library's own error, after loading, would speak of ``restore()``).
    """
    if uses_ema(checkpoint) != args.use_ema:
        had = "with" if uses_ema(checkpoint) else "without"
        fix = "pass --use_ema" if uses_ema(checkpoint) else "drop --use_ema"
        raise GSPNUserError(
            f"{checkpoint.name} was saved {had} --use_ema; {fix} to resume it (or start a new run in another "
            "--output_dir to change it)."
        )
    saved = _saved_config(checkpoint / GSPN_SUBFOLDER)
    if args.gspn_weights is not None:
        asked, source = _saved_config(check_gspn(args.gspn_weights)), f"--gspn_weights {args.gspn_weights}"
        asked = dataclasses.replace(asked, train_projections=asked.train_projections or args.train_projections)
    elif args.preset is None and saved.preset is None:
        return  # a config without a preset: the model decides (load_gspn checks it once loaded)
    else:
        asked, source = requested_config(args.preset or saved.preset), "this run"
    # Compared as JSON, the form the checkpoint holds them in (tuples become lists, keys strings).
    saved_values, asked_values = (json.loads(json.dumps(c.to_dict())) for c in (saved, asked))
    for name, value in saved_values.items():
        wanted = asked_values.get(name)
        if wanted == value:
            continue
        flag = CONFIG_FIELD_FLAGS.get(name)
        if flag is None or args.gspn_weights is not None:
            raise GSPNUserError(
                f"{checkpoint.name} was saved with the GSPN setting {name}={value!r}, {source} gives {wanted!r}: "
                "resume with the settings the run started with, or start a new run in another --output_dir."
            )
        if name == "train_projections":
            had, fix = ("with", "pass") if value else ("without", "drop")
            raise GSPNUserError(
                f"{checkpoint.name} was trained {had} {flag}; {fix} {flag} to resume it (or start a new run in "
                "another --output_dir)."
            )
        raise GSPNUserError(
            f"{checkpoint.name} was trained with {flag} {_shown(name, value)}, this run asks for "
            f"{_shown(name, wanted)}: pass {flag} {_shown(name, value)} to resume it (or start a new run in another "
            "--output_dir)."
        )


def check_distributed(accelerator: Accelerator, args: argparse.Namespace) -> None:
    if accelerator.distributed_type == DistributedType.FSDP and args.use_ema:
        raise ValueError(
            "--use_ema keeps a full copy of the trained weights per process; it is not supported with "
            "FSDP (use DDP or DeepSpeed ZeRO-2, whose parameters are not sharded)."
        )
