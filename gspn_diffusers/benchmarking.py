"""Timing and memory measurement for the GPU benchmarks, and its CPU stand-in for the GPU check's dry run.

GPU time for this project is rare and short, so ``scripts/gpu_check.sh --dry-run`` runs every benchmark on the CPU
before a GPU is spent on it. For that run to prove anything, the benchmarks must execute the same code on both:
they never call ``torch.cuda`` timing or memory functions themselves, only a :class:`Meter`, of which there are
two. :class:`CudaMeter` times with CUDA events and reads ``torch.cuda``'s allocator statistics (what the GPU run
measures, unchanged); :class:`CpuMeter` times with the wall clock and reads the process's resident memory (the CPU
allocator has no statistics: ``VmRSS`` / ``VmHWM`` from ``/proc/self/status``, the peak reset through
``/proc/self/clear_refs``). Everything built on a meter (median of repeats, the adaptive repeat count, the
profiler's event count, one call's time and peak memory) is written once, below, for both.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

GIB = 2**30
DRY_RUN_DEVICE = "cpu (dry run)"


class Meter:
    """Where the benchmark's tensors live and how one call is timed and its memory read (see the module doc)."""

    device: torch.device
    name: str  # the device's name as the JSON files record it
    profiler_activity: torch.profiler.ProfilerActivity
    event_device_type: torch.autograd.DeviceType  # the profiler events counted as this device's kernels

    def synchronize(self) -> None:
        """Wait for every queued call on the device."""

    def elapsed_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds of one call of ``fn`` on the device."""
        raise NotImplementedError

    def allocated_bytes(self) -> int:
        raise NotImplementedError

    def reset_peak(self) -> None:
        """Start a new peak at the current allocation."""
        raise NotImplementedError

    def peak_bytes(self) -> int:
        """The most allocated since :meth:`reset_peak`."""
        raise NotImplementedError

    def free_bytes(self) -> int:
        """Memory the benchmark may still allocate on the device."""
        raise NotImplementedError

    def empty_cache(self) -> None:
        """Give cached, unused memory back (between shapes)."""

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


class CudaMeter(Meter):
    """The GPU run: CUDA events, ``torch.cuda`` memory statistics of the current device."""

    def __init__(self) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = torch.cuda.get_device_name(self.device)
        self.profiler_activity = torch.profiler.ProfilerActivity.CUDA
        self.event_device_type = torch.autograd.DeviceType.CUDA

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


def _proc_kib(path: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{path} has no {field} line (the CPU meter reads Linux's /proc)")
    return int(match.group(1)) * 1024


class CpuMeter(Meter):
    """The dry run: wall clock, and the process's resident memory standing in for the allocator's numbers.

    Resident memory counts more than tensors (the interpreter, libraries), so its numbers only show that the
    measuring code runs and moves the way memory does; they are not comparable with a GPU's.
    """

    def __init__(self, name: str = DRY_RUN_DEVICE) -> None:
        self.device = torch.device("cpu")
        self.name = name
        self.profiler_activity = torch.profiler.ProfilerActivity.CPU
        self.event_device_type = torch.autograd.DeviceType.CPU

    def elapsed_ms(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    def allocated_bytes(self) -> int:
        return _proc_kib("/proc/self/status", "VmRSS")

    def reset_peak(self) -> None:
        # "5" resets the peak resident set size (VmHWM) to the current one (Linux 4.0+).
        Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        return _proc_kib("/proc/self/status", "VmHWM")

    def free_bytes(self) -> int:
        return _proc_kib("/proc/meminfo", "MemAvailable")


def meter_for(dry_run: bool) -> Meter:
    """The CPU meter for the dry run, else the GPU's; a GPU run without a GPU is refused with a clear message."""
    if dry_run:
        return CpuMeter()
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False on this machine")
    return CudaMeter()


def median_ms(meter: Meter, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` timed calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median([meter.elapsed_ms(fn) for _ in range(repeats)])


def adaptive_ms(meter: Meter, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Like :func:`median_ms`, but a call slower than a second is timed only three times (flash attention at 16K)."""
    first = median_ms(meter, fn, 1, 1)
    if first > 1000.0:
        return statistics.median([first, median_ms(meter, fn, 0, 1), median_ms(meter, fn, 0, 1)])
    return median_ms(meter, fn, warmup, repeats)


def device_events_per_call(meter: Meter, fn: Callable[[], object]) -> int:
    """Profiler events on the meter's device during one call (after one unprofiled call): the CUDA kernels a call
    launches on the GPU, the operators it runs on the CPU."""
    from torch.profiler import profile

    fn()
    meter.synchronize()
    with profile(activities=[meter.profiler_activity]) as prof:
        fn()
        meter.synchronize()
    return sum(1 for event in prof.events() if event.device_type == meter.event_device_type)


def call_seconds_and_memory(meter: Meter, fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median seconds of ``fn()``, peak GiB during the calls, GiB allocated before them), each call synchronised
    and timed on the host clock (one call may hold many kernels and host work between them)."""
    meter.synchronize()
    before = meter.allocated_bytes()
    meter.reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        meter.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), meter.peak_bytes() / GIB, before / GIB
