"""Validation images during distillation, on every process so that sharded models work.

Under FSDP the student's parameters are sharded across processes: a forward pass gathers them
with collectives, so every process must make the same calls, and FSDP1 must first gather the full
parameters into the wrapped modules (``summon_full_params``) before the unwrapped UNet inside the
pipeline can run. So every process renders the grid (the same images, from the same seed) and the
main process writes it; under DDP this costs nothing extra, since the others would wait anyway.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid

logger = logging.getLogger(__name__)


@contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """The full (unsharded) parameters in the modules inside, on every process (a collective under FSDP1).

    DDP and DeepSpeed ZeRO-2 (parameters are not sharded) need nothing; FSDP1 gathers with
    ``summon_full_params`` (read-only, nested units included), FSDP2 (``fully_shard``) with ``unshard`` /
    ``reshard`` of every sharded module in the tree: an auto-wrap policy (the transformer blocks, as in
    ``distill/configs/fsdp.yaml``) shards each block on its own, and the root's ``unshard`` gathers only
    the parameters no inner unit owns. Inside, the modules hold plain full tensors, so ``save_gspn`` and
    the pipeline's UNet call work as usual.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]  # the same order everywhere
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


class Validation:
    """Images for the fixed validation prompts and seed, as a grid PNG and in tensorboard.

    The grid's top row is the teacher (rendered once: it is frozen), the bottom row the student, so
    each grid shows how close the distillation has come. ``teacher_scheduler`` is the pipeline's
    original scheduler when ``--prediction_type`` changed the student's.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        teacher: torch.nn.Module,
        args: argparse.Namespace,
        accelerator: Accelerator,
        resolution: int,
        teacher_scheduler: Any = None,
    ) -> None:
        self.pipe, self.teacher, self.args = pipe, teacher, args
        self.accelerator, self.resolution = accelerator, resolution
        self.teacher_scheduler = teacher_scheduler or pipe.scheduler
        self._teacher_images: list | None = None

    def _generate(self) -> list:
        self.pipe.set_progress_bar_config(disable=True)
        images = []
        for prompt in self.args.validation_prompts:
            generator = torch.Generator(device="cpu").manual_seed(self.args.seed or 0)
            with torch.no_grad(), self.accelerator.autocast():
                result = self.pipe(
                    prompt,
                    height=self.resolution,
                    width=self.resolution,
                    num_inference_steps=self.args.num_validation_inference_steps,
                    generator=generator,
                )
            images.append(result.images[0])
        return images

    def teacher_images(self) -> list:
        if self._teacher_images is None:
            student, scheduler = self.pipe.unet, self.pipe.scheduler
            self.pipe.unet, self.pipe.scheduler = self.teacher, self.teacher_scheduler
            try:
                self._teacher_images = self._generate()
            finally:
                self.pipe.unet, self.pipe.scheduler = student, scheduler
        return self._teacher_images

    def __call__(self, step: int, prepared_student: torch.nn.Module | None = None) -> Path:
        """Render on every process (``prepared_student``: the wrapped model, for FSDP); the main one writes."""
        with full_parameters(prepared_student) if prepared_student is not None else nullcontext():
            student = self._generate()
        teacher = self.teacher_images()
        path = Path(self.args.output_dir) / "validation" / f"step-{step:07d}.png"
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            make_image_grid(teacher + student, rows=2, cols=len(student)).save(path)
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    for name, images in (("student", student), ("teacher", teacher)):
                        stacked = np.stack([np.asarray(image) for image in images])
                        tracker.writer.add_images(f"validation/{name}", stacked, step, dataformats="NHWC")
            logger.info("Validation images for step %d (top: teacher, bottom: student) -> %s", step, path)
        return path
