"""What the band forwards of the UNet (:mod:`.unet`) and the ControlNet (:mod:`.controlnet`) share."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .comm import Comm, abort_after_failure, post_failure
from .errors import PeerFailedError
from .runtime import Runtime

logger = logging.getLogger(__name__)


def timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else 0.0
    return float(timestep)


def _batch_half(value: Any, batch: int, half: int) -> Any:
    """The ``half``-th half of every tensor (in any nesting of tuples, lists and dicts) whose first dim is the
    model's batch; everything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.chunk(2)[half]
    if isinstance(value, dict):
        return {key: _batch_half(v, batch, half) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_batch_half(v, batch, half) for v in value)
    return value


class BandForward:
    """What the band forwards of the UNet and the ControlNet share: unsplit calls when the pipeline asks for
    them, a failure only this process has told to the others, and the CFG split of a call's batch.

    Replaces ``model.forward`` (an instance attribute; :class:`~.patching.Patches` restores it).
    """

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
        if self.runtime.replicated_calls:
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
        raise NotImplementedError

    def _cfg_split(self, batch: int) -> bool:
        """Whether this call's batch of ``batch`` is halved between the two CFG groups (an odd one is not)."""
        split = self.cfg_world is not None and batch % 2 == 0
        if self.cfg_world is not None and not split and not self._warned_odd_batch:
            logger.warning("CFG split: a call of batch %d cannot be halved; both halves run all of it.", batch)
            self._warned_odd_batch = True
        return split

    def _half(self, value: Any, batch: int) -> Any:
        """This process's CFG half of every batch tensor in ``value``."""
        return _batch_half(value, batch, self.cfg_half)
