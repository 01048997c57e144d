"""The UNet wrapper: each process runs the UNet on its band of latent rows; the bands' outputs are gathered, so
the pipeline's loop and scheduler see the whole prediction on every process, unchanged. ControlNet residuals
arrive band-local (the band ControlNet of :mod:`.controlnet` made them on the same band).

With a CFG split, each half of the processes takes one half of the batch (unconditional, conditional), cuts it
into its own bands, and the two halves swap their results with their partner process.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .bands import plan_bands
from .controlnet import check_band_residuals, check_residual_batches, residuals_of
from .errors import ParallelConfigError
from .forward import BandForward, timestep_value

_UNSUPPORTED = ("down_intrablock_additional_residuals",)  # T2I-Adapter


class BandUNetForward(BandForward):
    """The UNet on this process's band; the band outputs are gathered (and swapped between the CFG halves)."""

    def _band_call(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        runtime, comm = self.runtime, self.runtime.comm
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise ParallelConfigError(f"Patch parallelism does not support UNet {name} (T2I-Adapter).")
        batch = sample.shape[0]
        split = self._cfg_split(batch)
        check_residual_batches(residuals_of(kwargs), batch, split, runtime.controlnet_half_batch)
        runtime.controlnet_half_batch = None
        if split:
            sample, timestep, args, kwargs = self._half((sample, timestep, args, kwargs), batch)
        height, width = sample.shape[-2:]
        plan = plan_bands(height, width, comm.size, self.factor)
        check_band_residuals(residuals_of(kwargs), plan, comm.rank)
        runtime.begin_call(plan, tuple(sample.shape), timestep_value(timestep))
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
