"""What a checkpoint holds besides Accelerate's own state: the GSPN (and EMA) weights in ``save_gspn`` format.

Kept apart from the loop so that the checkpoint checks (:mod:`.checkpoints`) know the folder names
the save hook writes without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ..serialization import load_gspn, save_gspn
from .validation import full_parameters

GSPN_SUBFOLDER = "gspn"
EMA_SUBFOLDER = "gspn_ema"


class EMAWeights:
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


def register_state_hooks(
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
            with EMAWeights(ema, trainable):
                save_gspn(student, Path(save_dir) / EMA_SUBFOLDER)

    def load_model_hook(models: list, load_dir: str) -> None:
        while models:
            load_gspn(accelerator.unwrap_model(models.pop()), Path(load_dir) / GSPN_SUBFOLDER)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
