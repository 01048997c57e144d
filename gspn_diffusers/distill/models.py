"""The models of a distillation run: the student (the pipeline's UNet converted to GSPN), the frozen teacher,
and the optimizer of the trained parameters. Kept apart from the loop: it is what a run loads, not how it trains.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

from ..config import GSPNConfig
from ..convert import convert, get_unet, gspn_config_of, gspn_parameters
from ..loading import DTYPES, load_pipeline
from ..serialization import load_gspn

logger = get_logger(__name__)


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype the frozen models are stored in: the mixed-precision dtype (the trained weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


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
    args: argparse.Namespace,
    weight_dtype: torch.dtype,
    device: torch.device,
    student_config: Callable[[torch.nn.Module], GSPNConfig],
) -> tuple[DiffusionPipeline, torch.nn.Module, list[torch.nn.Parameter]]:
    """The pipeline whose UNet is the student, and the frozen teacher; frozen parts in ``weight_dtype``.

    ``student_config``: the GSPN config the conversion flags ask for, given the UNet (its preset); the entry point
    reads it from the flags (only the command lines import the argument helpers). Not used with ``--gspn_weights``,
    whose saved config fixes the conversion.
    """
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
        load_gspn(pipe, args.gspn_weights)
    else:
        convert(pipe, student_config(get_unet(pipe)))
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


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit one with --use_8bit_adam) over the trained parameters only."""
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
