"""How much accelerator memory a high-resolution stage may use, and which GSPN backend will run there.

The pipelines choose each stage's mode (whole latent or windows) and the number of windows per
UNet call from these and the meta-device estimate of :func:`~.memory.estimate_stage_peak`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops import extension, policy
from ..ops.backend import requested_backend

# The share of the free memory a stage may plan to use: the rest covers cuBLAS/cuDNN workspaces and allocator
# fragmentation, which the meta-device estimate does not count.
SAFETY_MARGIN = 0.85
# DemoFusion's windows per UNet call, the most the automatic choice uses.
MAX_VIEW_BATCH_SIZE = 16


def gspn_backend_for(device: torch.device) -> str:
    """``"kernel"`` where GSPN will run the CUDA kernel, else ``"reference"``: the two differ in memory by the
    reference's fp32 copies of the gates, so a stage planned for the kernel while the reference runs may not fit.

    The kernel runs on a CUDA device whose extension loaded (built on first use, as the base stage's GSPN calls
    already did) and whose build covers the GPU's arch; a failed build or a missing arch runs the reference.
    """
    if device.type != "cuda" or requested_backend() not in ("auto", "cuda"):
        return "reference"
    module = extension.load_extension()
    return "kernel" if module is not None and policy.arch_covered_on(module, device) else "reference"


def memory_budget(device: torch.device, max_memory: int | None) -> float | None:
    """Bytes a stage may plan for beyond the loaded models: ``max_memory`` if given, else on CUDA
    ``SAFETY_MARGIN`` of what is free (``mem_get_info`` plus what PyTorch's cache holds unused), the rest
    left for workspaces and fragmentation; ``None`` (no limit) on other devices."""
    if max_memory is not None:
        return float(max_memory)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return SAFETY_MARGIN * (free + cached)


def largest_view_batch(stage_bytes: Callable[[int], int], budget: float | None) -> int:
    """The most windows per UNet call (up to DemoFusion's 16) whose stage estimate ``stage_bytes(n)`` fits."""
    if budget is None:
        return MAX_VIEW_BATCH_SIZE
    for size in range(MAX_VIEW_BATCH_SIZE, 1, -1):
        if stage_bytes(size) <= budget:
            return size
    return 1
