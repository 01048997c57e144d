"""The distillation loss: the diffusion target, the teacher's prediction and the teacher's features.

``loss = MSE(student, target) + a * MSE(student, teacher) + b * R over feature layers of
MSE(student feature, teacher feature)``, where the features are either the attn1 outputs (``attn1``,
as LinFusion does: the replaced layers themselves) or the outputs of the UNet's down, mid and up
blocks (``blocks``, as BK-SDM does), and R is their ``mean`` or ``sum``. Features are read with
forward hooks, which see the same tensors in the teacher (softmax attention) and the student (GSPN
processor) without touching either model's code.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from torch import nn

from ..convert import self_attention_layers

logger = get_logger(__name__)  # main process only: the warning below is the same on every process

LOSS_TERMS = ("loss", "target", "teacher", "feature")  # what distillation_losses returns, in LossMeter's order

FEATURE_LOSSES = ("attn1", "blocks")
FEATURE_REDUCTIONS = ("mean", "sum")

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class LossWeights:
    """a (``teacher``) and b (``feature``) of the loss above, and R (``feature_reduction``)."""

    teacher: float = 0.5
    feature: float = 0.5
    feature_reduction: str = "mean"


def feature_modules(unet: UNet2DConditionModel, kind: str = "attn1") -> dict[str, nn.Module]:
    """The modules whose outputs the feature loss compares, by name."""
    if kind == "attn1":
        return dict(self_attention_layers(unet))
    if kind == "blocks":
        blocks = {f"down_blocks.{i}": block for i, block in enumerate(unet.down_blocks)}
        blocks["mid_block"] = unet.mid_block
        blocks.update({f"up_blocks.{i}": block for i, block in enumerate(unet.up_blocks)})
        return {name: block for name, block in blocks.items() if block is not None}
    raise ValueError(f"Unknown feature loss {kind!r}; expected one of {', '.join(FEATURE_LOSSES)}.")


class FeatureRecorder:
    """Records the outputs of the feature modules of a UNet (attn1 layers or blocks), by name.

    Hooks stay installed; they store only inside ``with recorder.recording():``, so gradient
    checkpointing's recomputation during backward (after the block) does not overwrite or keep
    anything. A block returning a tuple (down blocks: hidden states and skip connections)
    contributes its first element, the hidden states passed on.
    """

    def __init__(self, unet: UNet2DConditionModel, kind: str = "attn1") -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in feature_modules(unet, kind).items()
        ]

    def _hook(self, name: str):
        def store(module: nn.Module, args: Any, output: Any) -> None:
            if self._active:
                self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return store

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        self.outputs = {}
        self._active = True
        try:
            yield self.outputs
        finally:
            self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _alpha_sigma(scheduler: Any, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against ``like``."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device)]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return alphas_cumprod.sqrt().reshape(shape), (1 - alphas_cumprod).sqrt().reshape(shape)


def diffusion_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict, from the scheduler config's ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}.")


def convert_prediction(
    scheduler: Any,
    prediction: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    from_type: str,
    to_type: str,
) -> torch.Tensor:
    """A UNet prediction of ``from_type`` expressed as ``to_type`` at the same noisy sample.

    With x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) and v = a eps - s x0:
    eps = (x_t - a x0) / s, x0 = a x_t - s v, eps = s x_t + a v. So a teacher trained on epsilon
    gives the right teacher term for a student trained (``--prediction_type``) on v.
    """
    if from_type == to_type:
        return prediction
    for name in (from_type, to_type):
        if name not in PREDICTION_TYPES:
            raise ValueError(f"Unsupported prediction_type {name!r}; use one of {', '.join(PREDICTION_TYPES)}.")
    pred, x_t = prediction.float(), noisy_latents.float()
    a, s = _alpha_sigma(scheduler, timesteps, pred)
    if from_type == "epsilon":
        eps, x0 = pred, (x_t - s * pred) / a
    elif from_type == "v_prediction":
        eps, x0 = s * x_t + a * pred, a * x_t - s * pred
    else:
        eps, x0 = (x_t - a * pred) / s, pred
    out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[to_type]
    return out.to(prediction.dtype)


def feature_loss(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Mean (or sum) over the feature layers of the MSE between the student's and the teacher's outputs."""
    if not student or set(student) != set(teacher):
        raise RuntimeError(
            f"Features were recorded for {len(student)} student and {len(teacher)} teacher layers with different "
            "names; the teacher must be a copy of the student's UNet made before conversion."
        )
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"Unknown feature loss reduction {reduction!r}; expected mean or sum.")
    per_layer = torch.stack([F.mse_loss(student[n].float(), teacher[n].float()) for n in student])
    return per_layer.mean() if reduction == "mean" else per_layer.sum()


def combine_losses(
    student_pred: torch.Tensor,
    teacher_pred: torch.Tensor,
    target: torch.Tensor,
    student_features: dict[str, torch.Tensor],
    teacher_features: dict[str, torch.Tensor],
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """Every term of the loss (``target``, ``teacher``, ``feature``) and their weighted sum (``loss``)."""
    losses = {
        "target": F.mse_loss(student_pred.float(), target.float()),
        "teacher": F.mse_loss(student_pred.float(), teacher_pred.float()),
        "feature": feature_loss(student_features, teacher_features, weights.feature_reduction),
    }
    losses["loss"] = losses["target"] + weights.teacher * losses["teacher"] + weights.feature * losses["feature"]
    return losses


def distillation_losses(
    student: nn.Module,
    teacher: nn.Module,
    student_recorder: FeatureRecorder,
    teacher_recorder: FeatureRecorder,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    unet_kwargs: dict[str, Any],
    weights: LossWeights,
    teacher_prediction: Any = None,
) -> dict[str, torch.Tensor]:
    """Run the teacher and the student on one batch and return :func:`combine_losses`.

    ``student`` may be wrapped (DDP, FSDP); the recorders hold hooks on the unwrapped modules.
    ``teacher_prediction`` maps the teacher's output to the student's prediction type (see
    :func:`convert_prediction`) when ``--prediction_type`` differs from the teacher's.
    """
    with torch.no_grad(), teacher_recorder.recording() as teacher_features:
        teacher_pred = teacher(noisy_latents, timesteps, **unet_kwargs, return_dict=False)[0]
        if teacher_prediction is not None:
            teacher_pred = teacher_prediction(teacher_pred, noisy_latents, timesteps)
    with student_recorder.recording() as student_features:
        student_pred = student(noisy_latents, timesteps, **unet_kwargs, return_dict=False)[0]
    return combine_losses(student_pred, teacher_pred, target, student_features, teacher_features, weights)


def prediction_setup(pipe: DiffusionPipeline, prediction_type: str | None) -> tuple[Any, Any, Any]:
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
