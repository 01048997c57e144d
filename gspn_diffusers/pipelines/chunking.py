"""Feed-forward chunking of a UNet's transformer blocks for large inputs (exact: the feed-forward is per token).

Used by the high-resolution stages and traced by the memory estimate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def chunk_feed_forward(unet: torch.nn.Module, height: int | None, width: int | None = None) -> None:
    """Chunk every transformer feed-forward over tokens for a ``height x width`` UNet input (``None``: off).

    Diffusers' chunk size must divide the token count, which differs per UNet level, so each
    block gets its own: its level's tokens split in up to 16 equal parts.
    """
    num_levels = len(unet.config.block_out_channels)
    for name, module in unet.named_modules():
        if not hasattr(module, "set_chunk_feed_forward"):
            continue
        if height is None:
            module.set_chunk_feed_forward(None, 0)
            continue
        level = _block_level(name, num_levels)
        tokens = _level_size(height, level) * _level_size(width, level)
        chunks = next(p for p in (16, 8, 4, 2, 1) if tokens % p == 0)
        module.set_chunk_feed_forward(tokens // chunks, dim=1)


@contextlib.contextmanager
def kept_feed_forward_chunking(unet: torch.nn.Module) -> Iterator[None]:
    """Restore every transformer block's feed-forward chunking on exit, whatever the block set meanwhile (the
    user's ``unet.enable_forward_chunking(...)`` survives a high-resolution call)."""
    blocks = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    saved = [(getattr(m, "_chunk_size", None), getattr(m, "_chunk_dim", 0)) for m in blocks]
    try:
        yield
    finally:
        for module, (size, dim) in zip(blocks, saved, strict=True):
            module.set_chunk_feed_forward(size, dim)


def _block_level(name: str, num_levels: int) -> int:
    """The resolution level (0 = full latent) of a UNet submodule from its name."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_levels - 1 - int(parts[1])
    return num_levels - 1


def _level_size(size: int, level: int) -> int:
    """Latent size after ``level`` stride-2 downsamplings (padding 1, so each one rounds up)."""
    for _ in range(level):
        size = (size + 1) // 2
    return size
