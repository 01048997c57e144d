"""Distill the GSPN modules of a converted SD-1.5 / SD-XL UNet from the original UNet, with Accelerate.

    accelerate launch -m gspn_diffusers.distill.train --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_dir laion_shards/ --output_dir sdxl-gspn-distilled --mixed_precision bf16 ...
    gspn-diffusers distill ...   # the same flags, single process

The student is the pipeline's UNet converted to GSPN (initialised from its Q/K/V); the teacher is
a frozen deep copy of the UNet made before the conversion. Only the GSPN parameters (and, with
``--train_projections``, the attn1 projections) train; everything else is frozen in the
mixed-precision dtype. The structure follows Diffusers' example trainers: Accelerate state with
save/load hooks that write the model's own format (``save_gspn`` into ``checkpoint-<step>/gspn``),
``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint latest`` and
validation images every ``--validation_steps``. Checkpoints are written atomically
(:mod:`.checkpoints`), validation runs on every process (:mod:`.validation`, needed by FSDP), and
``--cache_latents`` encodes each image once (:mod:`.cache`).

Every process draws its own timesteps, noise and caption-dropout masks (seed + process index),
reproducibly from run to run; the model weights are built from the same seed everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..cli_args import config_flags_given, config_from_args
from ..config import GSPNConfig
from ..convert import get_unet
from ..loading import native_size
from ..serialization import CONFIG_NAME, save_gspn
from .args import parse_args
from .cache import training_data
from .checkpoints import checkpoints, save_checkpoint
from .checks import check_distributed, check_run
from .conditioning import encode_text, prepare_inputs
from .data import ImageCaptionDataset, UnreadableReport, check_readable, make_dataloader
from .failures import INTERRUPTED_STATUS, out_of_memory_hint, report_interrupt, writing
from .layouts import find_records
from .losses import FeatureRecorder, LossMeter, LossWeights, distillation_losses, prediction_setup
from .models import build_models, make_optimizer, weight_dtype_of
from .records import Records
from .run_dir import RunPlan, mark_finished, remove_replaced, report_replaced, take_over
from .state import EMAWeights, register_state_hooks
from .validation import Validation, full_parameters

logger = get_logger(__name__)

USER_ERRORS = (ValueError, TypeError, OSError, ImportError)  # bad input: reported as one line, no traceback


@dataclass
class DistillResult:
    """What a run leaves in memory: the pipeline with the trained student (EMA weights if ``--use_ema``); no
    pipeline when there was nothing to train (a finished run resumed with its target)."""

    pipe: DiffusionPipeline | None
    global_step: int
    losses: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    skipped_images: int = 0


def student_config(args: argparse.Namespace, preset_of: str | torch.nn.Module) -> GSPNConfig:
    """The GSPN config the conversion flags ask for, on top of ``--preset`` or else ``preset_of`` (a preset name, or
    a UNet whose preset is detected). Here, in the entry point: only the command lines import the argument helpers.
    """
    if isinstance(preset_of, str):
        if args.preset is None:
            args = argparse.Namespace(**{**vars(args), "preset": preset_of})
        preset_of = None
    config = config_from_args(args, preset_of)
    return dataclasses.replace(config, train_projections=args.train_projections)


def check_args(args: argparse.Namespace) -> RunPlan:
    """Everything checked before a model loads (:func:`.checks.check_run`), with the flags' GSPN config."""
    return check_run(args, functools.partial(student_config, args))


def warn_ignored_config_flags(args: argparse.Namespace) -> None:
    """With --gspn_weights the saved config fixes the conversion: say which conversion flags are then ignored."""
    flags = config_flags_given(args)  # `--chunk-size global` counts: it is given, as None
    if args.gspn_weights is not None and flags:
        logger.warning(
            "--gspn_weights given: its saved %s fixes the GSPN config, so %s would be ignored.",
            CONFIG_NAME,
            ", ".join(flags),
        )


def _scalar_config(args: argparse.Namespace) -> dict[str, Any]:
    """Trackers (tensorboard hparams) accept only scalars."""
    return {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    max_grad_norm: float,
) -> None:
    """Clip the gradient norm (on the step that syncs gradients), step the optimizer and the LR schedule.

    The norm is over all of ``model``'s gradients, which are the trained ones only (the frozen
    parameters have none); passing the prepared model lets Accelerate use FSDP's sharded norm.
    """
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(list(model.parameters()), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def main(args: argparse.Namespace) -> DistillResult:
    """Run the distillation described by ``args`` (from :func:`parse_args`).

    Everything that depends only on flags and files is checked first (:func:`check_args`), then the
    data is indexed, then the models load; the output folder is changed only after that (another run's
    results moved aside, stale ones of an abandoned timeline too), and nothing is deleted before the
    new run's first checkpoint is complete.
    """
    plan = check_args(args)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    check_distributed(accelerator, args)
    finished = plan.finished(args.max_train_steps) if args.max_train_steps is not None else None
    if finished:
        return _nothing_to_train(finished, plan)
    if args.seed is not None:
        set_seed(args.seed)  # the same on every process: the converted student must be identical everywhere
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    resolution = [args.resolution]  # filled in with the model's native size once it is known
    try:
        # Data first: a wrong dataset fails before any model is loaded.
        records = find_records(
            args.train_data_dir,
            args.dataset_name,
            args.image_column,
            args.caption_column,
            args.dataset_split,
            args.dataset_config_name,
            args.cache_dir,
        )
        check_readable(records)
        with out_of_memory_hint(args, resolution):
            return _train(args, plan, accelerator, records, resolution)
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            saved = checkpoints(output_dir)
            report_interrupt(saved[-1] if saved else None)
            report_replaced(output_dir)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except BaseException:
        if accelerator.is_main_process:
            report_replaced(output_dir)
        raise


def _nothing_to_train(reason: str, plan: RunPlan) -> DistillResult:
    logger.warning(
        "Nothing to train: %s. The results are left as they are; raise --max_train_steps to train further.", reason
    )
    return DistillResult(pipe=None, global_step=plan.step)


def _train(
    args: argparse.Namespace,
    plan: RunPlan,
    accelerator: Accelerator,
    records: Records,
    resolution_box: list[int | None],
) -> DistillResult:
    """Load the models, build the data pipeline, take over the output folder and run the loop."""
    output_dir = Path(args.output_dir)
    weight_dtype = weight_dtype_of(accelerator)
    warn_ignored_config_flags(args)
    pipe, teacher, trainable = build_models(
        args, weight_dtype, accelerator.device, functools.partial(student_config, args)
    )
    student = get_unet(pipe)
    resolution = args.resolution or native_size(pipe)
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"--resolution must be a multiple of {pipe.vae_scale_factor}; got {resolution}.")
    resolution_box[0] = resolution
    dataset = ImageCaptionDataset(records, resolution, args.center_crop, args.random_flip, args.seed or 0)
    logger.info("%d training images, resolution %d", len(dataset), resolution)
    report = UnreadableReport(records.lost)
    train_dataset, collate_fn = training_data(args, pipe, dataset, accelerator, weight_dtype, report)
    unconditional = encode_text(pipe, [""], accelerator.device) if args.cache_latents else None

    noise_scheduler, teacher_scheduler, teacher_prediction = prediction_setup(pipe, args.prediction_type)
    weights = LossWeights(args.teacher_loss_weight, args.feature_loss_weight, args.feature_loss_reduction)
    student_recorder = FeatureRecorder(student, args.feature_loss)
    teacher_recorder = FeatureRecorder(teacher, args.feature_loss)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, trainable)
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    register_state_hooks(accelerator, student, trainable, ema)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    # The loader is sharded first: steps, epochs and the LR schedule follow from the per-process length.
    train_dataloader = accelerator.prepare(make_dataloader(args, train_dataset, collate_fn))
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # A prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the loader was prepared on its own, above
        # The trainer's accumulation wins over the config file's: steps, epochs and total_batch count with it.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=args.train_batch_size,
            train_batch_size=total_batch,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
    prepared_student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    validation = Validation(pipe, teacher, args, accelerator, resolution, teacher_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=_scalar_config(args))

    logger.info(
        "Distilling %d GSPN tensors (%.2fM parameters): %d steps, %d epochs of %d steps, batch %d (per device %d "
        "x %d processes x %d accumulation)",
        len(trainable),
        sum(p.numel() for p in trainable) / 1e6,
        max_train_steps,
        num_train_epochs,
        updates_per_epoch,
        total_batch,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
    )

    finished = plan.finished(max_train_steps)
    if finished:  # only known now when the target is given in epochs
        return _nothing_to_train(finished, plan)
    take_over(accelerator, output_dir, plan)
    global_step = plan.step
    if args.seed is not None and global_step == 0:
        # Different timesteps, noise and caption dropout on every process, the same from run to run (a resumed
        # run gets each process's saved RNG state instead).
        set_seed(args.seed + accelerator.process_index)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    meter = LossMeter(accelerator.device)
    logs: dict[str, float] = {}
    images_seen, start, images_per_second, skipped_total = 0, time.perf_counter(), 0.0, 0
    for epoch in range(first_epoch, num_train_epochs):
        prepared_student.train()
        train_dataloader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(prepared_student):
                inputs = prepare_inputs(
                    pipe,
                    noise_scheduler,
                    batch,
                    resolution,
                    weight_dtype,
                    caption_dropout=args.caption_dropout,
                    unconditional=unconditional,
                )
                losses = distillation_losses(
                    prepared_student,
                    teacher,
                    student_recorder,
                    teacher_recorder,
                    inputs.noisy_latents,
                    inputs.timesteps,
                    inputs.target,
                    inputs.unet_kwargs,
                    weights,
                    teacher_prediction,
                )
                meter.add(losses)
                accelerator.backward(losses["loss"])
                optimizer_step(accelerator, prepared_student, optimizer, lr_scheduler, args.max_grad_norm)
            report.update(batch["unreadable"])
            images_seen += len(batch["original_sizes"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(trainable)
            global_step += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step >= max_train_steps:
                losses_mean, skipped_total = meter.gather(accelerator, report.skipped)
                images_per_second = images_seen / (time.perf_counter() - start)
                logs = {
                    **losses_mean,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "images_per_second": images_per_second,
                    "skipped_images": skipped_total,
                }
                accelerator.log(logs, step=global_step)
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.1f}"
                )
            io_start = time.perf_counter()
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if accelerator.is_main_process:
                    remove_replaced(output_dir)
            validate = args.validation_prompts and args.validation_steps and global_step % args.validation_steps == 0
            if validate and global_step < max_train_steps:
                with EMAWeights(ema, trainable):
                    validation(global_step, prepared_student)
            start += time.perf_counter() - io_start  # throughput counts training time only
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()
    report.summary(skipped_total)

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)
    with full_parameters(prepared_student):
        if accelerator.is_main_process:
            # The run-level guard (--resume_from_checkpoint / --overwrite_output_dir) already allowed this folder.
            training = {
                "method": "GSPN distillation (noise + teacher-output + feature losses)",
                "dataset": args.train_data_dir or args.dataset_name,
                "steps": global_step,
            }
            with writing(output_dir, "the final GSPN weights"):
                save_gspn(student, output_dir, overwrite=True, base_model=args.model, training=training)
                mark_finished(output_dir, global_step)
            remove_replaced(output_dir)
            logger.info("Saved the distilled GSPN weights to %s (load with gspn_diffusers.load_gspn)", output_dir)
    if args.validation_prompts:
        validation(global_step, prepared_student)
    student_recorder.remove()
    teacher_recorder.remove()
    accelerator.end_training()
    return DistillResult(
        pipe=pipe,
        global_step=global_step,
        losses={k: float(v) for k, v in logs.items() if k.startswith("loss")},
        images_per_second=images_per_second,
        skipped_images=skipped_total,
    )


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m gspn_diffusers.distill.train`` / ``distill/train_gspn_distill.py``: a user error is one message
    (``-v`` shows its traceback)."""
    args = parse_args(argv)
    try:
        main(args)
    except USER_ERRORS as error:
        if args.verbose:
            raise
        logging.basicConfig(format="%(levelname)s %(message)s")
        logging.getLogger(__name__).error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
