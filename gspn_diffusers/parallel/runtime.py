"""The per-call state of patch parallelism: which band this process runs, whether this call is exact, and the
neighbours' values kept from the previous denoising step.

Every process runs the same denoising loop, so the UNet calls line up across processes. A call is named by its
input shape and its rank among the calls of that shape in the current step (a step ends when the timestep
changes; a timestep that grows starts a new schedule, for instance a high-resolution stage, and warm-up again).
Each model keeps its own names (a ControlNet, called before the UNet in every step, does not shift the UNet's names
when a pipeline skips it in some steps). The first ``warmup_steps`` steps, every ``sync`` step and every call
without a previous-step twin are exact and synchronous; the others (``stale``) use what the neighbours sent
during the twin call of the previous step and send this step's values asynchronously for the next one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .bands import BandPlan
from .comm import Comm, Pending

MODES = ("stale", "sync", "naive")


@dataclass
class CallStats:
    """What one model call cost this process: bytes it sent, seconds it waited on communication, wall seconds.
    ``model``: ``"unet"``, or the ControlNet's name (``"controlnet"``, ``"controlnet.<k>"`` in a multi-ControlNet)."""

    shape: tuple[int, ...]
    step: int
    exact: bool
    bytes_sent: int
    wait_seconds: float
    seconds: float
    model: str = "unet"


class Runtime:
    """Shared by the UNet wrapper and every layer patch of one :func:`~.api.parallelize`."""

    def __init__(self, comm: Comm, mode: str, warmup_steps: int) -> None:
        self.comm = comm
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.active = False  # inside a band-split UNet call: the layer patches exchange
        self.replicated_calls = False  # the pipeline asked for whole, unsplit UNet calls (DemoFusion's windows)
        self.plan: BandPlan | None = None
        self.level = 0
        self.exact = True
        self.call_key: tuple = ()
        self.controlnet_half_batch: int | None = None  # the batch half a CFG-split ControlNet call returned
        self.calls: list[CallStats] = []
        self._slots: dict[tuple, dict[str, Any]] = {}
        self._step = -1
        self._last_t: float | None = None
        self._ordinals: Counter = Counter()
        self._previous_keys: set[tuple] = set()
        self._current_keys: set[tuple] = set()
        self._call_start = (0, 0.0, 0.0)

    # ------------------------------------------------------------------ calls and steps
    def begin_call(self, plan: BandPlan, shape: tuple[int, ...], timestep: float, model: str = "unet") -> None:
        """Name this call of ``model``, decide whether it is exact, check that every process makes the same call."""
        if self._last_t is None or timestep > self._last_t:
            self.drain()
            self._slots.clear()
            self._step, self._previous_keys, self._current_keys = 0, set(), set()
            self._ordinals.clear()
        elif timestep != self._last_t:
            self._step += 1
            self._previous_keys, self._current_keys = self._current_keys, set()
            self._ordinals.clear()
        self._last_t = timestep
        self._ordinals[model, shape] += 1
        self.call_key = (model, shape, self._ordinals[model, shape])
        self._current_keys.add(self.call_key)
        self.exact = self.mode == "sync" or self._step < self.warmup_steps or self.call_key not in self._previous_keys
        self.plan = plan
        self._call_start = (self.comm.bytes_sent, self.comm.wait_seconds, time.perf_counter())
        self.comm.check_same([*shape, round(timestep * 1000), self._step], f"the {model} call (shape, timestep, step)")

    def end_call(self) -> CallStats:
        sent, waited, start = self._call_start
        stats = CallStats(
            model=self.call_key[0],
            shape=self.call_key[1],
            step=self._step,
            exact=self.exact,
            bytes_sent=self.comm.bytes_sent - sent,
            wait_seconds=self.comm.wait_seconds - waited,
            seconds=time.perf_counter() - start,
        )
        self.calls.append(stats)
        return stats

    @contextmanager
    def band_call(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    @contextmanager
    def replicated(self) -> Iterator[None]:
        """UNet calls inside run whole on every process (no split, no exchange)."""
        previous, self.replicated_calls = self.replicated_calls, True
        try:
            yield
        finally:
            self.replicated_calls = previous

    # ------------------------------------------------------------------ per-layer exchanges
    def slot(self, layer_id: int) -> dict[str, Any]:
        """The kept state of one layer in this call (its value from the previous step, an exchange in flight)."""
        return self._slots.setdefault((self.call_key, layer_id), {})

    def exchange(self, layer_id: int, start: Callable[[], Pending]) -> Any:
        """Run a layer's exchange: now and waited for (exact calls), or started for the next step while the value
        the neighbours sent during the previous step is returned (stale calls)."""
        slot = self.slot(layer_id)
        if self.exact:
            value = start().wait()
            if self.mode != "sync":  # kept for the first stale step after warm-up
                slot["value"] = value
            return value
        value = self.stale_value(slot)
        slot["pending"] = start()
        return value

    @staticmethod
    def stale_value(slot: dict[str, Any]) -> Any:
        """The previous step's value of a slot, waiting for its exchange right before use."""
        if "pending" in slot:
            slot["value"] = slot.pop("pending").wait()
        return slot["value"]

    def drain(self) -> None:
        """Wait for every exchange in flight, so no message of this schedule meets a later one."""
        for slot in self._slots.values():
            if "pending" in slot:
                slot["value"] = slot.pop("pending").wait()

    # ------------------------------------------------------------------ band geometry of the current call
    def band_rows(self) -> tuple[int, int]:
        return self.plan.rows(self.comm.rank, self.level)

    def token_counts(self) -> list[int]:
        width = self.plan.level_width(self.level)
        return [h * width for h in self.plan.heights(self.level)]


def splice(gathered: torch.Tensor, own: torch.Tensor, dim: int, sizes: list[int], index: int) -> torch.Tensor:
    """``gathered`` (every band along ``dim``) with band ``index`` replaced by the fresh ``own``."""
    start = sum(sizes[:index])
    before = gathered.narrow(dim, 0, start)
    after = gathered.narrow(dim, start + sizes[index], gathered.shape[dim] - start - sizes[index])
    return torch.cat([before, own, after], dim=dim)
