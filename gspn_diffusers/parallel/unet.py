"""The UNet wrapper: each process runs the UNet on its band of latent rows; the bands' outputs are gathered, so
the pipeline's loop and scheduler see the whole prediction on every process, unchanged.

With a CFG split, each half of the processes takes one half of the batch (unconditional, conditional), cuts it
into its own bands, and the two halves swap their results with their partner process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .bands import plan_bands
from .comm import Comm, abort_after_failure, post_failure
from .errors import ParallelConfigError, PeerFailedError
from .runtime import Runtime

logger = logging.getLogger(__name__)

_UNSUPPORTED = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else 0.0
    return float(timestep)


def _batch_half(value: Any, batch: int, half: int) -> Any:
    """The ``half``-th half of every tensor (or dict of tensors) whose first dim is the UNet batch."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.chunk(2)[half]
    if isinstance(value, dict):
        return {key: _batch_half(v, batch, half) for key, v in value.items()}
    return value


class BandUNetForward:
    """Replaces ``unet.forward`` (an instance attribute; :class:`~.patching.Patches` restores it)."""

    def __init__(
        self,
        original: Callable,
        runtime: Runtime,
        factor: int,
        cfg_world: Comm | None = None,
        cfg_half: int = 0,
    ) -> None:
        self.original = original
        self.runtime = runtime
        self.factor = factor
        self.cfg_world = cfg_world  # the whole world, when the batch is split between two groups
        self.cfg_half = cfg_half
        self._warned_odd_batch = False

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        if runtime.replicated_calls:
            return self.original(sample, timestep, *args, **kwargs)
        try:
            return self._band_call(sample, timestep, *args, **kwargs)
        except PeerFailedError:
            raise
        except Exception as error:
            if not getattr(error, "everywhere", False):  # an error only this process has: tell the others, stop
                post_failure(f"{type(error).__name__}: {error}")
                abort_after_failure()
            raise

    def _band_call(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        runtime, comm = self.runtime, self.runtime.comm
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise ParallelConfigError(f"Patch parallelism does not support UNet {name} (ControlNet, T2I-Adapter).")
        batch = sample.shape[0]
        split = self.cfg_world is not None and batch % 2 == 0
        if self.cfg_world is not None and not split and not self._warned_odd_batch:
            logger.warning("CFG split: a UNet call of batch %d cannot be halved; both halves run all of it.", batch)
            self._warned_odd_batch = True
        if split:
            sample = sample.chunk(2)[self.cfg_half]
            timestep = _batch_half(timestep, batch, self.cfg_half)
            args = tuple(_batch_half(a, batch, self.cfg_half) for a in args)
            kwargs = {key: _batch_half(v, batch, self.cfg_half) for key, v in kwargs.items()}
        height, width = sample.shape[-2:]
        plan = plan_bands(height, width, comm.size, self.factor)
        runtime.begin_call(plan, tuple(sample.shape), _timestep_value(timestep))
        start, end = plan.rows(comm.rank)
        return_dict = kwargs.pop("return_dict", True)
        with runtime.band_call():
            out = self.original(sample[:, :, start:end], timestep, *args, return_dict=False, **kwargs)[0]
        full = comm.all_gather_dim(out, 2, plan.heights()).wait() if comm.size > 1 else out
        swapped_bytes, swap_wait = 0, 0.0
        if split:
            world = self.cfg_world
            swapped_bytes, swap_wait = world.bytes_sent, world.wait_seconds
            other = world.swap(full, world.ranks[(world.rank + world.size // 2) % world.size])
            full = torch.cat([full, other] if self.cfg_half == 0 else [other, full])
            swapped_bytes, swap_wait = world.bytes_sent - swapped_bytes, world.wait_seconds - swap_wait
        stats = runtime.end_call()
        stats.bytes_sent += swapped_bytes
        stats.wait_seconds += swap_wait
        return UNet2DConditionOutput(sample=full) if return_dict else (full,)
