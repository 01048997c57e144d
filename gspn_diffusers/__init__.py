"""gspn-diffusers: GSPN (Generalized Spatial Propagation Network) in place of UNet self-attention.

import gspn_diffusers
gspn_diffusers.convert(pipe)              # every UNet attn1 -> GSPN, initialised from Q/K/V
gspn_diffusers.save_gspn(pipe, "out/")    # only the GSPN weights + config
gspn_diffusers.load_gspn(other, "out/")   # converts and loads
gspn_diffusers.load_gspn(other, "org/name")  # or from a hub repo (or its offline cache)
gspn_diffusers.restore(pipe)              # back to the original attention
pipe.save_pretrained("full/")             # the whole GSPN pipeline; DiffusionPipeline.from_pretrained rebuilds it
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

# Public name -> submodule. Resolved on first use (PEP 562), so that `import gspn_diffusers.cli_args` (every
# command line's first import) does not pull in torch and diffusers: `gspn-diffusers --help` answers at once.
_EXPORTS = {
    "GSPNAttnProcessor": "processor",
    "GSPNConfig": "config",
    "GSPNControlNetModel": "models",
    "GSPNModule": "module",
    "GSPNUNet2DConditionModel": "models",
    "convert": "convert",
    "gspn_modules": "convert",
    "gspn_parameters": "convert",
    "is_converted": "convert",
    "restore": "convert",
    "load_gspn": "serialization",
    "save_gspn": "serialization",
}

if TYPE_CHECKING:
    from .config import GSPNConfig
    from .convert import convert, gspn_modules, gspn_parameters, is_converted, restore
    from .models import GSPNControlNetModel, GSPNUNet2DConditionModel
    from .module import GSPNModule
    from .processor import GSPNAttnProcessor
    from .serialization import load_gspn, save_gspn


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """``gspn_diffusers.convert`` is the function, as it was with eager imports, although importing the submodule
    of the same name sets that attribute to the module: the import system's assignment is ignored here."""

    @property
    def convert(self) -> Any:
        return importlib.import_module(".convert", __name__).convert

    @convert.setter
    def convert(self, module: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package


__all__ = [
    "GSPNAttnProcessor",
    "GSPNConfig",
    "GSPNControlNetModel",
    "GSPNModule",
    "GSPNUNet2DConditionModel",
    "__version__",
    "convert",
    "gspn_modules",
    "gspn_parameters",
    "is_converted",
    "load_gspn",
    "restore",
    "save_gspn",
]
