"""``parallelize(pipe)``: run an existing Diffusers pipeline's UNet (and ControlNet) patch-parallel over the
processes of ``torch.distributed`` (DistriFusion's displaced patch parallelism, with GSPN layers exchanging
boundary lines).

Nothing of the pipeline is forked: the ``forward`` of the UNet and of the ControlNet and the forwards of the layers
that look beyond a band (convolutions, GroupNorm, ``attn1``) are replaced on their instances, and restored exactly
on exit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..convert import get_unet
from .bands import downsampling_factor
from .comm import Comm, aborted
from .controlnet import BandControlNetForward, pipeline_controlnets
from .errors import ParallelConfigError
from .gspn import gspn_module_of, patch_gspn
from .layers import conv_halo, patch_attention, patch_conv, patch_group_norm
from .patching import Patches
from .runtime import MODES, CallStats, Runtime
from .unet import BandUNetForward

logger = logging.getLogger(__name__)


class ParallelContext:
    """The installed patch parallelism of one pipeline; a context manager that restores the pipeline on exit.

    Attributes:
        runtime: the per-call state; ``runtime.calls`` lists a :class:`~.runtime.CallStats` per UNet or ControlNet
            call.
        rank, world_size: this process in the world.
    """

    def __init__(self, pipe: Any, mode: str = "stale", warmup_steps: int = 4, split_cfg: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ParallelConfigError(
                "Patch parallelism needs torch.distributed initialised (gspn_diffusers.parallel.init_distributed() "
                "under torchrun --nproc-per-node N, or accelerate launch)."
            )
        if mode not in MODES:
            raise ParallelConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if warmup_steps < 0:
            raise ParallelConfigError(f"warmup_steps must be >= 0; got {warmup_steps}.")
        self.pipe, self.unet = pipe, get_unet(pipe)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if split_cfg and self.world_size % 2:
            raise ParallelConfigError(
                f"A CFG split runs the unconditional and conditional halves on two equal groups of processes: it "
                f"needs an even number of processes, got {self.world_size}."
            )
        world = Comm()
        world.check_same(
            [MODES.index(mode), warmup_steps, int(split_cfg), self.world_size], "mode, warmup_steps, split_cfg"
        )
        cfg_world, half = None, 0
        if split_cfg:
            size = self.world_size // 2
            groups = [dist.new_group(list(range(k * size, (k + 1) * size))) for k in range(2)]
            half = self.rank // size
            comm, cfg_world = Comm(groups[half]), world
        else:
            comm = world
        self.runtime = Runtime(comm, mode, warmup_steps)
        self._patches = Patches()
        try:
            self._install(cfg_world, half)
        except BaseException:
            self._patches.restore()
            raise
        logger.info(
            "Patch parallelism: process %d of %d, mode %s, %d warm-up steps%s",
            self.rank,
            self.world_size,
            mode,
            warmup_steps,
            ", CFG split in two groups" if split_cfg else "",
        )

    @property
    def is_main_process(self) -> bool:
        """Process 0 decodes and saves."""
        return self.rank == 0

    @property
    def calls(self) -> list[CallStats]:
        return self.runtime.calls

    def _install(self, cfg_world: Comm | None, half: int) -> None:
        """The band forwards of the UNet and of the pipeline's ControlNets, and their layers' patches (layer ids
        numbered on across the models, so no two layers share kept state or message tags)."""
        runtime, patches = self.runtime, self._patches
        factor = downsampling_factor(self.unet.config)
        controlnets = pipeline_controlnets(self.pipe, factor)
        patches.forward(self.unet, lambda original: BandUNetForward(original, runtime, factor, cfg_world, half))
        next_id = self._patch_layers(self.unet, 0)
        for name, controlnet in controlnets:

            def band_controlnet(original: Callable, name: str = name) -> BandControlNetForward:
                return BandControlNetForward(original, runtime, factor, cfg_world, half, name=name)

            patches.forward(controlnet, band_controlnet)
            next_id = self._patch_layers(controlnet, next_id)
        self._patch_windows()

    def _patch_layers(self, model: nn.Module, first_id: int) -> int:
        """Patch ``model``'s layers that look beyond a band, with ids from ``first_id``; returns the next free id."""
        runtime, patches = self.runtime, self._patches

        def record_level(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if runtime.active:
                hidden = args[0] if args else kwargs["hidden_states"]
                runtime.level = runtime.plan.level_of(runtime.comm.rank, *hidden.shape[-2:])

        exchange = runtime.mode != "naive" and runtime.comm.size > 1
        layer_id = first_id
        for layer_id, (name, module) in enumerate(model.named_modules(), start=first_id):
            if isinstance(module, Transformer2DModel):
                patches.hook(module.register_forward_pre_hook(record_level, with_kwargs=True))
            if not exchange:
                continue  # naive: every band on its own, as a separate image
            if isinstance(module, nn.Conv2d) and conv_halo(module) is not None:
                patches.forward(module, patch_conv(runtime, module, layer_id))
            elif isinstance(module, nn.GroupNorm):
                patches.forward(module, patch_group_norm(runtime, module, layer_id))
            elif isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention:
                patch = patch_gspn if gspn_module_of(module) is not None else patch_attention
                patches.forward(module, patch(runtime, module, layer_id))
        return layer_id + 1

    def _patch_windows(self) -> None:
        """DemoFusion's native-size windows are not split: every process runs them whole."""
        from ..pipelines.demofusion import DemoFusionMixin

        if not isinstance(self.pipe, DemoFusionMixin):
            return
        runtime = self.runtime

        def make(original):
            def local_noise(latents, t, uncond, cond, settings, *args, **kwargs):
                if settings.local_denoising != "windows":
                    return original(latents, t, uncond, cond, settings, *args, **kwargs)
                with runtime.replicated():
                    return original(latents, t, uncond, cond, settings, *args, **kwargs)

            return local_noise

        self._patches.attribute(self.pipe, "_local_noise", make)

    def restore(self) -> None:
        """Wait for exchanges in flight and put every replaced forward back."""
        try:
            if not aborted():
                self.runtime.drain()
        finally:
            self._patches.restore()

    def __enter__(self) -> ParallelContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def parallelize(pipe: Any, mode: str = "stale", warmup_steps: int = 4, split_cfg: bool = False) -> ParallelContext:
    """Run ``pipe``'s UNet patch-parallel over the processes of ``torch.distributed``, in place.

    Use as ``with parallelize(pipe): images = pipe(...)`` (or keep the returned context and ``.restore()`` it).
    Every process calls the pipeline identically (same arguments and seed); each runs the UNet on its band of
    latent rows and all of them step the scheduler on the gathered prediction, so every process ends with the
    same latent and process 0 (``ctx.is_main_process``) decodes and saves.

    Args:
        pipe: a Diffusers SD-1.5/SD-XL pipeline or a ``GSPNDemoFusion(SDXL)Pipeline`` (GSPN-converted or not). Its
            ``controlnet`` (a ``ControlNetModel`` or ``GSPNControlNetModel``, or a ``MultiControlNetModel`` of them),
            if any, runs on the same bands and hands the UNet band-local residuals.
        mode: ``"stale"`` (DistriFusion: after warm-up, exchanges carry the neighbours' values of the previous
            step, sent during compute), ``"sync"`` (every step exact), ``"naive"`` (no exchange: bands as separate
            images, the baseline).
        warmup_steps: exact, synchronous steps at the start of every schedule (every high-resolution stage).
        split_cfg: two groups of processes take the unconditional and conditional halves of the batch
            (DistriFusion's ``split_batch``); needs an even number of processes.
    """
    return ParallelContext(pipe, mode=mode, warmup_steps=warmup_steps, split_cfg=split_cfg)
