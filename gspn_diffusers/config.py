"""What a GSPN conversion is: the hyper-parameters of the modules and which layers scan locally.

The config is saved beside the weights (``gspn_config.json``) so that ``load_gspn`` can rebuild
exactly the modules the weights belong to.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GSPNUserError

PRESETS = ("sd15", "sdxl")
# Line-block inference by default above 512x512 tokens, in blocks of 64 lines: at 16384x8192 that is SD-XL's
# 640-channel level (1024x512 tokens), whose whole gates would be the largest tensors of the call; the smaller
# levels' gates stay below the peak, which is set elsewhere (the full-resolution ResNets).
LINE_BLOCK_TOKENS = 512 * 512
LINE_BLOCK_LINES = 64


def _type_message(field_name: str, value: Any, expected: str) -> str:
    return f"GSPN config field {field_name!r} must be {expected}; got {value!r} ({type(value).__name__})."


def _check_int(field_name: str, value: Any, optional: bool, what: str = "integer") -> None:
    """A positive int (``bool`` is not accepted though Python counts it as one); ``None`` where optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = f"null or a positive {what}" if optional else f"a positive {what}"
        raise GSPNUserError(_type_message(field_name, value, expected))


@dataclass
class GSPNConfig:
    """Hyper-parameters of a GSPN conversion.

    Args:
        gate_rank: the gate projection is low rank, C -> C / gate_rank -> 4 directions x 3 x G.
        gate_channels: G, gate channels per direction. ``None`` means C (one gate per channel, as in
            the paper); a divisor of C shares each gate across C / G channels (less memory, faster).
        chunk_size: default scan mode of every layer: ``None`` is global GSPN, k is local GSPN with
            groups of k lines.
        layer_chunk_sizes: per-layer overrides, ``fnmatch`` pattern on the attention module name
            (e.g. ``"down_blocks.0.*"``) -> chunk size (``None`` for global). The first match wins.
        use_skip: add a learned per-channel skip term D * v (initialised to zero).
        normalize: divide each direction by the same scan of lam alone (linear attention's
            normaliser), which keeps the output scale independent of the resolution.
        train_projections: the attn1 to_q/to_k/to_v/to_out weights are trained too, so they are
            saved with the GSPN weights.
        line_block_tokens: without gradients, a layer whose latent has more tokens than this computes its
            gates one block of lines at a time (line-block inference, same result, a fraction of the memory);
            ``None`` never does.
        line_block_lines: lines per block of line-block inference (rounded up to a multiple of the chunk size).
        preset: the preset this config was built from (informational).
    """

    gate_rank: int = 4
    gate_channels: int | None = None
    chunk_size: int | None = None
    layer_chunk_sizes: dict[str, int | None] = field(default_factory=dict)
    use_skip: bool = True
    normalize: bool = True
    train_projections: bool = False
    line_block_tokens: int | None = LINE_BLOCK_TOKENS
    line_block_lines: int = LINE_BLOCK_LINES
    preset: str | None = None

    def __post_init__(self) -> None:
        """Check every field's type and range, so a hand-edited or foreign ``gspn_config.json`` (``"gate_rank":
        "four"``, ``"normalize": "false"``) fails with the field's name instead of misbehaving later."""
        _check_int("gate_rank", self.gate_rank, optional=False)
        _check_int("gate_channels", self.gate_channels, optional=True)
        _check_int("chunk_size", self.chunk_size, optional=True, what="chunk size (null: global scan)")
        if self.line_block_tokens is not None and (
            isinstance(self.line_block_tokens, bool)
            or not isinstance(self.line_block_tokens, int)
            or self.line_block_tokens < 0
        ):
            raise GSPNUserError(
                _type_message("line_block_tokens", self.line_block_tokens, "null (off) or a token count >= 0")
            )
        _check_int("line_block_lines", self.line_block_lines, optional=False)
        if not isinstance(self.layer_chunk_sizes, dict):
            raise GSPNUserError(
                _type_message("layer_chunk_sizes", self.layer_chunk_sizes, "an object (pattern -> size)")
            )
        for pattern, size in self.layer_chunk_sizes.items():
            if not isinstance(pattern, str):
                raise GSPNUserError(_type_message("layer_chunk_sizes key", pattern, "a string (fnmatch pattern)"))
            _check_int(f"layer_chunk_sizes[{pattern!r}]", size, optional=True, what="chunk size (null: global scan)")
        for name in ("use_skip", "normalize", "train_projections"):
            if not isinstance(getattr(self, name), bool):
                raise GSPNUserError(_type_message(name, getattr(self, name), "true or false (a JSON boolean)"))
        if self.preset is not None and not isinstance(self.preset, str):
            raise GSPNUserError(_type_message("preset", self.preset, "null or a preset name"))

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> GSPNConfig:
        """SD-1.5 and SD-XL defaults.

        The highest-resolution transformer blocks (64x64 latents and up at the native size, the
        ones that grow most in a 16K image) scan locally in groups of 16 lines, which keeps their
        context bounded at any size; the deeper blocks scan globally.
        """
        if preset == "sd15":
            local = {"down_blocks.0.*": 16, "up_blocks.3.*": 16}
        elif preset == "sdxl":
            local = {"down_blocks.1.*": 16, "up_blocks.1.*": 16}
        else:
            raise GSPNUserError(f"Unknown GSPN preset {preset!r}; expected one of {', '.join(PRESETS)}.")
        values: dict[str, Any] = {"layer_chunk_sizes": local, "preset": preset}
        values.update(overrides)
        return cls(**values)

    def chunk_size_for(self, layer_name: str) -> int | None:
        for pattern, size in self.layer_chunk_sizes.items():
            if fnmatch.fnmatchcase(layer_name, pattern):
                return size
        return self.chunk_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GSPNConfig:
        if not isinstance(values, dict):
            raise GSPNUserError(_type_message("config", values, "an object of GSPN config fields"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise GSPNUserError(
                f"Unknown GSPN config keys {sorted(unknown)}; this file was written by a newer or different "
                "version of gspn-diffusers."
            )
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
