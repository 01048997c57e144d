"""gspn-diffusers: GSPN (Generalized Spatial Propagation Network) in place of UNet self-attention.

import gspn_diffusers
gspn_diffusers.convert(pipe)              # every UNet attn1 -> GSPN, initialised from Q/K/V
gspn_diffusers.save_gspn(pipe, "out/")    # only the GSPN weights + config
gspn_diffusers.load_gspn(other, "out/")   # converts and loads
gspn_diffusers.restore(pipe)              # back to the original attention
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import GSPNConfig  # noqa: E402
from .convert import convert, gspn_parameters, gspn_processors, is_converted, restore  # noqa: E402
from .processor import GSPNAttnProcessor  # noqa: E402
from .serialization import load_gspn, save_gspn  # noqa: E402

__all__ = [
    "GSPNAttnProcessor",
    "GSPNConfig",
    "__version__",
    "convert",
    "gspn_parameters",
    "gspn_processors",
    "is_converted",
    "load_gspn",
    "restore",
    "save_gspn",
]
