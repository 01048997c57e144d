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
import copy
import dataclasses
import functools
import importlib.util
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import GSPNConfig
from ..convert import convert, get_unet, gspn_config_of, gspn_parameters
from ..loading import DTYPES, check_model_source, load_pipeline, native_size
from ..serialization import CONFIG_NAME, check_gspn, load_gspn, save_gspn
from .args import parse_args
from .cache import CachedLatents, build_latent_cache, cache_key, collate_cached
from .checkpoints import check_output_dir, checkpoint_step, clear_output_dir, resolve_resume, save_checkpoint
from .conditioning import encode_text, prepare_inputs
from .data import ImageCaptionDataset, UnreadableReport, collate, find_records
from .losses import FeatureRecorder, LossWeights, convert_prediction, distillation_losses
from .validation import Validation, full_parameters

logger = get_logger(__name__)

LOSS_TERMS = ("loss", "target", "teacher", "feature")
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)  # bad input: reported as one line, no traceback
GSPN_SUBFOLDER = "gspn"
EMA_SUBFOLDER = "gspn_ema"


@dataclass
class DistillResult:
    """What a run leaves in memory: the pipeline with the trained student (EMA weights if ``--use_ema``)."""

    pipe: DiffusionPipeline
    global_step: int
    losses: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    skipped_images: int = 0


def _weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _student_config(args: argparse.Namespace, pipe: DiffusionPipeline) -> GSPNConfig:
    from ..cli_args import config_from_args

    config = config_from_args(args, get_unet(pipe))
    return dataclasses.replace(config, train_projections=args.train_projections)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Cast only when the dtype changes (Diffusers warns about every cast of a loaded model)."""
    if module.dtype == dtype:
        module.to(device)
    else:
        module.to(device, dtype=dtype)


def _upcast(params: Iterable[torch.nn.Parameter]) -> None:
    for param in params:
        param.data = param.data.float()


def build_models(
    args: argparse.Namespace, weight_dtype: torch.dtype, device: torch.device
) -> tuple[DiffusionPipeline, torch.nn.Module, list[torch.nn.Parameter]]:
    """The pipeline whose UNet is the student, and the frozen teacher; frozen parts in ``weight_dtype``."""
    # Loaded on the CPU in the weight dtype: each process of a multi-GPU run holds one copy in host memory.
    dtype_name = next(name for name, dtype in DTYPES.items() if dtype == weight_dtype)
    pipe = load_pipeline(args.model, args.tiny, device="cpu", dtype=dtype_name)
    if getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
        raise ValueError(
            f"{type(pipe).__name__} is not a text-to-image SD-1.5/SD-2/SD-XL pipeline with a text encoder; "
            "distillation needs one (an SD-XL refiner or an image-variation pipeline cannot be distilled)."
        )
    teacher = copy.deepcopy(get_unet(pipe))
    if args.gspn_weights is not None:
        from ..cli_args import config_flags_given

        flags = config_flags_given(args)  # `--chunk-size global` counts: it is given, as None
        if flags:
            logger.warning(
                "--gspn_weights given: its saved %s fixes the GSPN config, so %s would be ignored.",
                CONFIG_NAME,
                ", ".join(flags),
            )
        load_gspn(pipe, args.gspn_weights)
    else:
        convert(pipe, _student_config(args, pipe))
    student = get_unet(pipe)
    for module in (pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), teacher):
        if module is not None:
            module.requires_grad_(False).eval()
    student.requires_grad_(False)
    # VAEs that overflow in fp16 (SD-XL's: force_upcast) stay in fp32 under fp16; bf16 has fp32's range.
    upcast = pipe.vae.config.get("force_upcast", False) and weight_dtype == torch.float16
    vae_dtype = torch.float32 if upcast else weight_dtype
    _move(pipe.vae, device, vae_dtype)
    for module in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None), teacher, student):
        if module is not None:
            _move(module, device, weight_dtype)
    # The trained weights stay in fp32 (autocast computes in the low precision), as in Diffusers' LoRA scripts.
    _upcast(gspn_parameters(student).values())
    if args.gspn_weights is not None:
        if weight_dtype != torch.float32:
            load_gspn(pipe, args.gspn_weights)  # again, now into fp32: no rounding through the weight dtype
        if args.train_projections:
            gspn_config_of(pipe).train_projections = True  # from now on trained and saved too
    trainable = list(gspn_parameters(student).values())
    _upcast(trainable)
    for param in trainable:
        param.requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return pipe, teacher, trainable


def _optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if args.use_8bit_adam:
        import bitsandbytes as bnb  # presence checked in check_args

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


class _EMAWeights:
    """Context manager: the EMA weights in the model inside, the trained ones back outside."""

    def __init__(self, ema: EMAModel | None, params: list[torch.nn.Parameter]) -> None:
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


def _scalar_config(args: argparse.Namespace) -> dict[str, Any]:
    """Trackers (tensorboard hparams) accept only scalars."""
    return {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}


def _register_state_hooks(
    accelerator: Accelerator, student: torch.nn.Module, trainable: list[torch.nn.Parameter], ema: EMAModel | None
) -> None:
    """``save_state`` writes the GSPN weights (and EMA weights) with ``save_gspn`` instead of the whole UNet.

    Under FSDP and DeepSpeed Accelerate saves and loads the model itself: the save hook gets the
    models but no ``model_weights``, and still writes the GSPN weights, from the full parameters; the
    load hook gets no models (Accelerate has loaded them).
    """

    def save_model_hook(models: list, model_weights: list, save_dir: str) -> None:
        for model in models:
            with full_parameters(model):
                if accelerator.is_main_process:
                    save_gspn(accelerator.unwrap_model(model), Path(save_dir) / GSPN_SUBFOLDER)
            if model_weights:
                model_weights.pop()  # the full UNet is not saved: only the GSPN weights change
        if ema is not None and accelerator.is_main_process:
            with _EMAWeights(ema, trainable):
                save_gspn(student, Path(save_dir) / EMA_SUBFOLDER)

    def load_model_hook(models: list, load_dir: str) -> None:
        while models:
            load_gspn(accelerator.unwrap_model(models.pop()), Path(load_dir) / GSPN_SUBFOLDER)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def _dataloader(
    args: argparse.Namespace, dataset: torch.utils.data.Dataset, collate_fn
) -> torch.utils.data.DataLoader:
    workers = args.dataloader_num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # Not persistent: workers hold their own copy of the dataset, so only workers started after
        # set_epoch draw that epoch's crops, flips and captions (persistent ones repeat epoch 0's forever).
        persistent_workers=False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run
        # (whose RNG state Accelerate restores) would see different noise than the uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed or 0),
    )


def _resume(accelerator: Accelerator, args: argparse.Namespace, output_dir: Path) -> int:
    """Load the checkpoint asked for (model, optimizer, LR schedule, EMA, sampler, RNG); returns its step."""
    checkpoint = resolve_resume(args.resume_from_checkpoint, output_dir)
    if checkpoint is None:
        return 0
    logger.info("Resuming from %s", checkpoint)
    accelerator.load_state(str(checkpoint))
    return checkpoint_step(checkpoint)


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


def check_args(args: argparse.Namespace) -> None:
    """Fail on impossible settings before anything is loaded, each with what to do instead."""
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
    check_output_dir(Path(args.output_dir), args.resume_from_checkpoint, args.overwrite_output_dir)


def _check_distributed(accelerator: Accelerator, args: argparse.Namespace) -> None:
    if accelerator.distributed_type == DistributedType.FSDP and args.use_ema:
        raise ValueError(
            "--use_ema keeps a full copy of the trained weights per process; it is not supported with "
            "FSDP (use DDP or DeepSpeed ZeRO-2, whose parameters are not sharded)."
        )


class LossMeter:
    """Loss terms summed on the device per micro-batch; one collective per logging step, not per micro-batch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(LOSS_TERMS), device=self.device)
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([losses[t].detach().float() for t in LOSS_TERMS])
        self.count += 1

    def gather(self, accelerator: Accelerator, skipped: int) -> tuple[dict[str, float], int]:
        """The mean of every term over all processes' micro-batches since the last call, and the total skips."""
        local = torch.cat([self.sums, self.sums.new_tensor([self.count, skipped])])
        total = accelerator.reduce(local, "sum").tolist()
        count = max(total[len(LOSS_TERMS)], 1.0)
        means = {("loss" if t == "loss" else f"loss/{t}"): v / count for t, v in zip(LOSS_TERMS, total, strict=False)}
        self.reset()
        return means, int(total[-1])


def _training_data(
    args: argparse.Namespace,
    pipe: DiffusionPipeline,
    dataset: ImageCaptionDataset,
    accelerator: Accelerator,
    weight_dtype: torch.dtype,
    report: UnreadableReport,
) -> tuple[torch.utils.data.Dataset, Any]:
    """The dataset the loop reads and its collate function: images, or their cached encodings."""
    if not args.cache_latents:
        return dataset, collate
    base = Path(args.cache_dir) / "gspn_latents" if args.cache_dir else Path(args.output_dir) / "latent_cache"
    directory = base / cache_key(args.model or f"tiny-{args.tiny}", dataset, weight_dtype)
    build_latent_cache(
        pipe, dataset, directory, accelerator, args.train_batch_size, args.dataloader_num_workers, report
    )
    return CachedLatents(directory, len(dataset)), collate_cached


def _prediction_type(pipe: DiffusionPipeline, prediction_type: str | None) -> tuple[Any, Any, Any]:
    """The training noise scheduler, the teacher's sampling scheduler and the teacher-output conversion.

    With ``--prediction_type`` different from the model's, the student learns the new target, the
    teacher's output is converted to it (:func:`convert_prediction`), and the pipeline's scheduler
    is registered with the new type (validation, and what the student is used with), while the
    teacher's validation images keep the original scheduler.
    """
    teacher_scheduler = pipe.scheduler
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    teacher_type = noise_scheduler.config.prediction_type
    if prediction_type is None or prediction_type == teacher_type:
        return noise_scheduler, teacher_scheduler, None
    noise_scheduler.register_to_config(prediction_type=prediction_type)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    logger.warning(
        "--prediction_type %s: the student is trained on it while the teacher predicts %s (converted); use the "
        "distilled weights with a scheduler whose prediction_type is %s.",
        prediction_type,
        teacher_type,
        prediction_type,
    )
    to_student = functools.partial(
        convert_prediction, noise_scheduler, from_type=teacher_type, to_type=prediction_type
    )
    return noise_scheduler, teacher_scheduler, to_student


def main(args: argparse.Namespace) -> DistillResult:
    """Run the distillation described by ``args`` (from :func:`parse_args`)."""
    check_args(args)
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
    _check_distributed(accelerator, args)
    if args.seed is not None:
        set_seed(args.seed)  # the same on every process: the converted student must be identical everywhere
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir:
            clear_output_dir(output_dir)
    accelerator.wait_for_everyone()

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
    weight_dtype = _weight_dtype(accelerator)
    pipe, teacher, trainable = build_models(args, weight_dtype, accelerator.device)
    student = get_unet(pipe)
    resolution = args.resolution or native_size(pipe)
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"--resolution must be a multiple of {pipe.vae_scale_factor}; got {resolution}.")
    dataset = ImageCaptionDataset(records, resolution, args.center_crop, args.random_flip, args.seed or 0)
    logger.info("%d training images, resolution %d", len(dataset), resolution)
    report = UnreadableReport()
    train_dataset, collate_fn = _training_data(args, pipe, dataset, accelerator, weight_dtype, report)
    unconditional = encode_text(pipe, [""], accelerator.device) if args.cache_latents else None

    noise_scheduler, teacher_scheduler, teacher_prediction = _prediction_type(pipe, args.prediction_type)
    weights = LossWeights(args.teacher_loss_weight, args.feature_loss_weight, args.feature_loss_reduction)
    student_recorder = FeatureRecorder(student, args.feature_loss)
    teacher_recorder = FeatureRecorder(teacher, args.feature_loss)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = _optimizer(args, trainable)
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    _register_state_hooks(accelerator, student, trainable, ema)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    # The loader is sharded first: steps, epochs and the LR schedule follow from the per-process length.
    train_dataloader = accelerator.prepare(_dataloader(args, train_dataset, collate_fn))
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

    global_step = _resume(accelerator, args, output_dir)
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
            validate = args.validation_prompts and args.validation_steps and global_step % args.validation_steps == 0
            if validate and global_step < max_train_steps:
                with _EMAWeights(ema, trainable):
                    validation(global_step, prepared_student)
            start += time.perf_counter() - io_start  # throughput counts training time only
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()
    if skipped_total:
        logger.warning("Skipped %d unreadable images during training (see the warnings above).", skipped_total)

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
            save_gspn(student, output_dir, overwrite=True, base_model=args.model, training=training)
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
    """``python -m gspn_diffusers.distill.train`` / ``distill/train_gspn_distill.py``: a user error is one message."""
    args = parse_args(argv)
    try:
        main(args)
    except USER_ERRORS as error:
        logging.basicConfig(format="%(levelname)s %(message)s")
        logging.getLogger(__name__).error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
