"""Patch parallelism over ``torch.distributed``: several processes (GPUs) share one image, DistriFusion-style.

``parallelize(pipe)`` (api), the communication layer with byte counting and failure propagation (comm), the band
split (bands), the per-call runtime and stale state (runtime), the layer patches (layers: conv, GroupNorm, softmax
attention; gspn: GSPN boundary lines), the UNet and ControlNet wrappers (unet, controlnet; forward: what they
share). Nothing else in the package imports this one.
"""

from __future__ import annotations

from .api import ParallelContext, parallelize
from .bands import BandPlan, downsampling_factor, plan_bands
from .comm import init_distributed
from .errors import ParallelConfigError, ParallelError, PeerFailedError
from .runtime import MODES, CallStats

__all__ = [
    "MODES",
    "BandPlan",
    "CallStats",
    "ParallelConfigError",
    "ParallelContext",
    "ParallelError",
    "PeerFailedError",
    "downsampling_factor",
    "init_distributed",
    "parallelize",
    "plan_bands",
]
