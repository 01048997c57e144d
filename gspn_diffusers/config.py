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

PRESETS = ("sd15", "sdxl")
# Line-block inference by default above 512x512 tokens, in blocks of 64 lines: at 16384x8192 that is SD-XL's
# 640-channel level (1024x512 tokens), whose whole gates would be the largest tensors of the call; the smaller
# levels' gates stay below the peak, which is set elsewhere (the full-resolution ResNets).
LINE_BLOCK_TOKENS = 512 * 512
LINE_BLOCK_LINES = 64


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
        if self.gate_rank < 1:
            raise ValueError(f"gate_rank must be >= 1; got {self.gate_rank}.")
        if self.gate_channels is not None and self.gate_channels < 1:
            raise ValueError(f"gate_channels must be None or >= 1; got {self.gate_channels}.")
        if self.line_block_tokens is not None and self.line_block_tokens < 0:
            raise ValueError(f"line_block_tokens must be None or >= 0; got {self.line_block_tokens}.")
        if self.line_block_lines < 1:
            raise ValueError(f"line_block_lines must be >= 1; got {self.line_block_lines}.")
        for name, size in [("chunk_size", self.chunk_size), *self.layer_chunk_sizes.items()]:
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"chunk size for {name!r} must be None (global) or a positive int; got {size!r}.")

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
            raise ValueError(f"Unknown GSPN preset {preset!r}; expected one of {', '.join(PRESETS)}.")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"Unknown GSPN config keys {sorted(unknown)}; this file was written by a newer or different "
                "version of gspn-diffusers."
            )
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
