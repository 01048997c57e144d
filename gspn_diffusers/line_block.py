"""Line-block inference: the four-direction GSPN merge computed one block of lines at a time.

At a 16384x8192 image the gates of one SD-XL attention layer, (B, H, W, 4, 3, G), take 12 * G values per token:
6x the value itself. Without gradients they need not exist at once. The low-rank gate projection is split: its
down-projection runs once over the whole latent (C / gate_rank values per token), and for each direction the
up-projection runs per block of lines along that direction's scan axis, restricted to the direction's 3 * G rows.
Each block is scanned with the carried state of :func:`gspn_diffusers.ops.gspn_scan` (the previous block's last
line), in the direction's scan order, so the result equals the whole computation; only one block's gates are
alive at a time, and the merge is accumulated into one (B, H, W, C) buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import DIRECTIONS, NUM_GATES, gspn_scan

_HORIZONTAL = ("left_to_right", "right_to_left")
_REVERSED = ("right_to_left", "bottom_to_top")


def block_starts(length: int, block_lines: int, chunk_size: int | None, direction: str) -> list[tuple[int, int]]:
    """``(start, end)`` image-coordinate blocks of a scan axis, in the order the scan visits them.

    A local scan (``chunk_size``) is cut only at its group boundaries, so the block size is rounded up to a
    multiple of the chunk size.
    """
    if chunk_size is not None:
        block_lines = -(-block_lines // chunk_size) * chunk_size
    blocks = [(start, min(start + block_lines, length)) for start in range(0, length, block_lines)]
    return blocks[::-1] if direction in _REVERSED else blocks


def line_block_scan_fused(
    value: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor,
    gate_hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    merge: torch.Tensor,
    skip: torch.Tensor | None,
    chunk_size: int | None,
    normalize: bool,
    block_lines: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`~gspn_diffusers.ops.gspn_scan_fused` with the gates made block by block from the down-projection.

    Args:
        value, lam, u: (B, H, W, C) in one dtype; u is shared by the directions.
        gate_hidden: (B, H, W, R), the gate down-projection of the tokens.
        gate_weight, gate_bias: the up-projection, (4 * 3 * G, R) and (4 * 3 * G,) or None, rows in the order
            (direction, gate, channel) of the processor's gate logits.
        merge: (4,) or (4, C); skip: (C,) or None; chunk_size, normalize, eps: as for ``gspn_scan_fused``.
        block_lines: lines per block along each scan axis (rounded up to a multiple of ``chunk_size``).

    Returns (B, H, W, C) in the value's dtype, accumulated in fp32 (fp64 for fp64 inputs) like the fused op.
    """
    if block_lines < 1:
        raise ValueError(f"block_lines must be a positive number of lines; got {block_lines}.")
    channels = value.shape[-1]
    num_dirs = len(DIRECTIONS)
    rows = gate_weight.shape[0] // num_dirs
    weights = gate_weight.view(num_dirs, rows, -1)
    biases = gate_bias.view(num_dirs, rows) if gate_bias is not None else [None] * num_dirs
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    out = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
    if skip is not None:
        out.addcmul_(value, skip)
    for d, direction in enumerate(DIRECTIONS):
        axis = 2 if direction in _HORIZONTAL else 1
        state = None
        for start, end in block_starts(value.shape[axis], block_lines, chunk_size, direction):

            def block(t: torch.Tensor, axis=axis, start=start, end=end) -> torch.Tensor:
                return t.narrow(axis, start, end - start)

            gates = F.linear(block(gate_hidden), weights[d], biases[d]).to(value.dtype)
            gates = gates.unflatten(-1, (NUM_GATES, rows // NUM_GATES))
            x, lam_block = block(value), block(lam)
            if normalize:  # scan [v, 1] in one call: the second half is the normaliser z, the scan of lam alone
                x = torch.cat([x, torch.ones_like(x)], dim=-1)
                lam_block = torch.cat([lam_block, lam_block], dim=-1)
                gates = torch.cat([gates, gates], dim=-1)
            h, state = gspn_scan(
                x, lam_block, gates, direction, chunk_size, initial_state=state, return_final_state=True
            )
            h = h.to(acc_dtype)
            if normalize:
                h = h[..., :channels] / h[..., channels:].clamp_min(eps)
            block(out).add_(merge[d].to(acc_dtype) * block(u) * h)
    return out.to(value.dtype)
