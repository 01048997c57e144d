"""The distillation loss: the diffusion target, the teacher's prediction and the teacher's attn1 outputs.

``loss = MSE(student, target) + a * MSE(student, teacher) + b * mean over replaced layers of
MSE(student attn1 output, teacher attn1 output)``. The attn1 outputs are read with forward hooks
on the ``Attention`` modules, which sees the same tensors in the teacher (softmax attention) and
the student (GSPN processor) without touching either model's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from ..convert import self_attention_layers


@dataclass(frozen=True)
class LossWeights:
    """a (``teacher``) and b (``feature``) of the loss above."""

    teacher: float = 0.5
    feature: float = 0.5


class Attn1Recorder:
    """Records the output of every self-attention (attn1) of a UNet, by layer name.

    Hooks stay installed; they store only inside ``with recorder.recording():``, so gradient
    checkpointing's recomputation during backward (after the block) does not overwrite or keep
    anything.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [
            attn.register_forward_hook(self._hook(name)) for name, attn in self_attention_layers(unet).items()
        ]

    def _hook(self, name: str):
        def store(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._active:
                self.outputs[name] = output

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


def diffusion_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict, from the scheduler config's ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}; use epsilon or v_prediction.")


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the replaced layers of the MSE between the student's and the teacher's attn1 outputs."""
    if not student or set(student) != set(teacher):
        raise RuntimeError(
            f"attn1 outputs were recorded for {len(student)} student and {len(teacher)} teacher layers with different "
            "names; the teacher must be a copy of the student's UNet made before conversion."
        )
    return torch.stack([F.mse_loss(student[n].float(), teacher[n].float()) for n in student]).mean()


def distillation_losses(
    student: nn.Module,
    teacher: nn.Module,
    student_recorder: Attn1Recorder,
    teacher_recorder: Attn1Recorder,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    unet_kwargs: dict[str, Any],
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """Every term of the loss (``target``, ``teacher``, ``feature``) and their weighted sum (``loss``).

    ``student`` may be wrapped (DDP, FSDP); the recorders hold hooks on the unwrapped modules.
    """
    with torch.no_grad(), teacher_recorder.recording() as teacher_features:
        teacher_pred = teacher(noisy_latents, timesteps, **unet_kwargs, return_dict=False)[0]
    with student_recorder.recording() as student_features:
        student_pred = student(noisy_latents, timesteps, **unet_kwargs, return_dict=False)[0]
    losses = {
        "target": F.mse_loss(student_pred.float(), target.float()),
        "teacher": F.mse_loss(student_pred.float(), teacher_pred.float()),
        "feature": feature_loss(student_features, teacher_features),
    }
    losses["loss"] = losses["target"] + weights.teacher * losses["teacher"] + weights.feature * losses["feature"]
    return losses
