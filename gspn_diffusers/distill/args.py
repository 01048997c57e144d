"""The distillation trainer's flags, in a module that imports neither torch nor Diffusers.

``gspn-diffusers distill --help`` and the argument checks answer at once; the trainer itself
(:mod:`.train`) is imported only to run. The flags follow Diffusers' example trainers
(``--name_with_underscores``, also accepted with dashes).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from ..cli_args import TINY_KINDS, add_config_args

# Listed here so that building the parser imports neither torch nor Diffusers; tests keep them equal to
# distill.losses' FEATURE_LOSSES / FEATURE_REDUCTIONS and to diffusers.optimization.SchedulerType.
FEATURE_LOSSES = ("attn1", "blocks")
FEATURE_REDUCTIONS = ("mean", "sum")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
DEFAULT_VALIDATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red fox in the snow, golden hour",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, top view",
)


def _flag(parser: argparse.ArgumentParser | Any, name: str, **kwargs: Any) -> None:
    """``--name_with_underscores`` as in Diffusers' trainers, also accepted as ``--name-with-dashes``."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """Every flag of the trainer; shared by ``parse_args`` and the ``gspn-diffusers distill`` subcommand."""
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", "--pretrained_model_name_or_path", dest="model", help="Hub name or local Diffusers folder."
    )
    source.add_argument("--tiny", choices=TINY_KINDS, help="A built-in tiny random model (tests, smoke runs).")
    add_config_args(model, underscores=True)
    _flag(
        model, "gspn_weights", default=None, help="Start from these GSPN weights (save_gspn folder) instead of Q/K/V."
    )
    _flag(model, "train_projections", action="store_true", help="Also train (and save) the attn1 Q/K/V/out.")
    _flag(model, "teacher_loss_weight", type=float, default=0.5, help="a: weight of MSE(student, teacher).")
    _flag(model, "feature_loss_weight", type=float, default=0.5, help="b: weight of the feature MSE.")
    _flag(
        model,
        "feature_loss",
        choices=FEATURE_LOSSES,
        default="attn1",
        help="Features compared: attn1 outputs (LinFusion) or the UNet's down/mid/up block outputs (BK-SDM).",
    )
    _flag(
        model,
        "feature_loss_reduction",
        choices=FEATURE_REDUCTIONS,
        default="mean",
        help="Mean or sum over the feature layers of their MSE (BK-SDM sums).",
    )
    _flag(
        model,
        "prediction_type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="Student's training target (default: the scheduler config's); the teacher's output is converted to it.",
    )

    data = parser.add_argument_group("data")
    _flag(
        data,
        "train_data_dir",
        default=None,
        help="Shards folder/.tar/glob (img2dataset webdataset), an images+.txt tree (img2dataset files), or a "
        "folder with metadata.jsonl/captions.jsonl/metadata.csv.",
    )
    _flag(data, "dataset_name", default=None, help="Hugging Face dataset: hub name or save_to_disk folder.")
    _flag(data, "dataset_config_name", default=None, help="Config of the hub dataset.")
    _flag(data, "dataset_split", default="train", help="Split of a Hugging Face dataset.")
    _flag(
        data,
        "cache_dir",
        default=None,
        help="Cache folder for hub datasets and (with --cache_latents) the latent cache (default: output_dir).",
    )
    _flag(data, "image_column", default="image", help="Image column of a Hugging Face dataset.")
    _flag(data, "caption_column", default="text", help="Caption column (HF dataset, metadata file, .json key).")
    _flag(data, "resolution", type=int, default=None, help="Training size in pixels (default: the model's native).")
    _flag(data, "center_crop", action="store_true", help="Center crop instead of a random crop.")
    _flag(data, "random_flip", action="store_true", help="Flip horizontally with probability 0.5.")
    _flag(data, "caption_dropout", type=float, default=0.1, help="Probability of the empty prompt (for CFG).")
    _flag(
        data,
        "dataloader_num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes (default min(4, CPUs); pinned memory on GPUs).",
    )
    _flag(
        data,
        "cache_latents",
        action="store_true",
        help="Encode each image (VAE posterior, text embeddings) once to disk under --cache_dir or "
        "output_dir/latent_cache and reuse it every epoch; crop, flip and caption choice are fixed per image.",
    )

    train = parser.add_argument_group("training")
    _flag(train, "output_dir", default="gspn-distilled", help="Checkpoints, logs, validation and final weights.")
    _flag(
        train,
        "overwrite_output_dir",
        action="store_true",
        help="Start over: another run's results in --output_dir are moved aside, and removed once the new run's "
        "first checkpoint is complete.",
    )
    _flag(train, "seed", type=int, default=0, help="Seed of data order and augmentation; process i draws with seed+i.")
    _flag(train, "train_batch_size", type=int, default=4, help="Per-device batch size.")
    _flag(train, "num_train_epochs", type=int, default=1)
    _flag(train, "max_train_steps", type=int, default=None, help="Optimizer steps; overrides num_train_epochs.")
    _flag(train, "gradient_accumulation_steps", type=int, default=1)
    _flag(train, "gradient_checkpointing", action="store_true", help="Recompute activations to save memory.")
    _flag(train, "learning_rate", type=float, default=1e-4)
    _flag(train, "scale_lr", action="store_true", help="Multiply the LR by batch size x accumulation x processes.")
    _flag(
        train,
        "lr_scheduler",
        default="constant",
        choices=LR_SCHEDULERS,
        help="Learning-rate schedule.",
    )
    _flag(train, "lr_warmup_steps", type=int, default=500)
    _flag(train, "use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    _flag(train, "adam_beta1", type=float, default=0.9)
    _flag(train, "adam_beta2", type=float, default=0.999)
    _flag(train, "adam_weight_decay", type=float, default=1e-2)
    _flag(train, "adam_epsilon", type=float, default=1e-8)
    _flag(train, "max_grad_norm", type=float, default=1.0)
    _flag(train, "use_ema", action="store_true", help="Keep an EMA of the trained weights (saved as the result).")
    _flag(train, "ema_decay", type=float, default=0.9999)
    _flag(
        train,
        "mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: the accelerate config's. Frozen weights are stored in this dtype.",
    )
    _flag(train, "allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")

    io = parser.add_argument_group("checkpoints and logging")
    _flag(io, "checkpointing_steps", type=int, default=500, help="Save the Accelerate state every N steps.")
    _flag(io, "checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    _flag(
        io,
        "resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, its step number, or "latest" (the newest usable one in output_dir).',
    )
    _flag(
        io,
        "validation_prompts",
        nargs="*",
        default=list(DEFAULT_VALIDATION_PROMPTS),
        help="Fixed prompts of the validation grid (none: no validation).",
    )
    _flag(io, "validation_steps", type=int, default=500, help="Validation grid every M steps (0: only at the end).")
    _flag(io, "num_validation_inference_steps", type=int, default=25)
    _flag(io, "logging_steps", type=int, default=10, help="Gather and log the loss terms every N steps.")
    _flag(io, "report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    _flag(io, "logging_dir", default="logs", help="Tracker folder, relative to output_dir.")
    _flag(io, "tracker_project_name", default="gspn-distill")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Distill the GSPN modules of a converted UNet from the original.")
    # Here only: `gspn-diffusers distill` has the top-level -v (a subcommand's default would override it).
    parser.add_argument("-v", "--verbose", action="store_true", help="Full tracebacks of errors.")
    add_distill_args(parser)
    return parser.parse_args(argv)
