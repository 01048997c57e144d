"""Line-block inference: the four-direction GSPN merge computed one block of lines at a time.

At a 16384x8192 image the gates of one SD-XL attention layer, (B, H, W, 4, 3, G), take 12 * G values per token:
6x the value itself. Without gradients they need not exist at once. The low-rank gate projection is split: its
down-projection runs once over the whole latent (C / gate_rank values per token), and for each direction the
up-projection runs per block of lines along that direction's scan axis, restricted to the direction's 3 * G rows.
Each block is scanned with the carried state of :func:`gspn_diffusers.ops.gspn_scan` (the previous block's last
line), in the direction's scan order, so the result equals the whole computation; only one block's gates are
alive at a time, and the merge is accumulated into one (B, H, W, C) buffer. :func:`line_block_band` accumulates
only a band of rows and picks up each direction's hidden lines at given rows as the blocks pass: the patch-parallel
warm-up, which needs the whole image's scans for one band and its boundary lines.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .ops import DIRECTIONS, NUM_GATES, gspn_scan

_HORIZONTAL = ("left_to_right", "right_to_left")
_REVERSED = ("right_to_left", "bottom_to_top")
EPS = 1e-6  # the fused op's normaliser floor


def block_starts(length: int, block_lines: int, chunk_size: int | None, direction: str) -> list[tuple[int, int]]:
    """``(start, end)`` image-coordinate blocks of a scan axis, in the order the scan visits them.

    A local scan (``chunk_size``) is cut only at its group boundaries, so the block size is rounded up to a
    multiple of the chunk size.
    """
    if chunk_size is not None:
        block_lines = -(-block_lines // chunk_size) * chunk_size
    blocks = [(start, min(start + block_lines, length)) for start in range(0, length, block_lines)]
    return blocks[::-1] if direction in _REVERSED else blocks


def direction_gate_logits(
    gate_hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    direction_index: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The (..., 3, G) gate logits of one direction from the gate down-projection ``gate_hidden`` (..., R).

    Only the direction's 3 * G rows of the up-projection (rows in the order (direction, gate, channel) of the
    processor's gate logits) are applied, so the other directions' gates are never made.
    """
    rows = gate_weight.shape[0] // len(DIRECTIONS)
    start = direction_index * rows
    bias = gate_bias.narrow(0, start, rows) if gate_bias is not None else None
    logits = F.linear(gate_hidden, gate_weight.narrow(0, start, rows), bias).to(dtype)
    return logits.unflatten(-1, (NUM_GATES, rows // NUM_GATES))


def scan_planes(value: torch.Tensor, lam: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x and lam of the single-direction scans, with the gates of :func:`direction_gate_logits` as they are.

    Normalising, the normaliser z (the scan of lam alone, x = 1) rides along in the same scan: value and ones are
    interleaved channel by channel, ``x = [v_0, 1, v_1, 1, ...]`` and ``lam = [lam_0, lam_0, lam_1, lam_1, ...]``.
    A gate serves C / G consecutive channels (G | C), so in the 2C interleaved channels it serves 2C / G consecutive
    ones: the same values and their normalisers, with no doubled copy of the gates.
    """
    if not normalize:
        return value, lam
    return torch.stack([value, torch.ones_like(value)], dim=-1).flatten(-2), lam.repeat_interleave(2, dim=-1)


def merge_buffer(value: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """The merge's accumulator, starting at ``skip * v``: fp32 (fp64 for fp64 inputs), like the fused op."""
    out = torch.zeros(
        value.shape, dtype=torch.float64 if value.dtype == torch.float64 else torch.float32, device=value.device
    )
    return out.addcmul_(value, skip) if skip is not None else out


def add_direction(
    out: torch.Tensor, h: torch.Tensor, u: torch.Tensor, merge: torch.Tensor, normalize: bool, eps: float = EPS
) -> None:
    """``out += merge * u * h / max(z, eps)`` (no division without ``normalize``) of one direction's scan ``h`` of
    :func:`scan_planes` (values and normalisers interleaved).

    In fresh temporaries of the accumulator's dtype, at most two (while dividing) of (..., C): at a large latent
    they set the peak. ``h`` is never written: a scan's output may share its storage with its carried state.
    """
    if normalize:
        z = h[..., 1::2].to(out.dtype, copy=True).clamp_min_(eps)
        y = h[..., 0::2].to(out.dtype, copy=True).div_(z)
        del z
    else:
        y = h.to(out.dtype, copy=True)
    out.add_(y.mul_(u).mul_(merge.to(out.dtype)))


def direction_block_scans(
    value: torch.Tensor,
    lam: torch.Tensor,
    gate_hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    direction_index: int,
    chunk_size: int | None,
    normalize: bool,
    block_lines: int,
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """One direction's scan of :func:`scan_planes` (values and normalisers interleaved), one block of lines at a
    time in the scan's order, each continued from the previous block's carried state.

    Yields each block's top-left image corner (row, column) and its hidden states h (B, rows, columns, C'). The
    block's gates and scan planes are freed before it is yielded, so while the caller merges a block only its h is
    alive besides the carried state.
    """
    direction = DIRECTIONS[direction_index]
    axis = 2 if direction in _HORIZONTAL else 1
    state = None
    for start, end in block_starts(value.shape[axis], block_lines, chunk_size, direction):

        def block(t: torch.Tensor, start=start, end=end) -> torch.Tensor:
            return t.narrow(axis, start, end - start)

        gates = direction_gate_logits(block(gate_hidden), gate_weight, gate_bias, direction_index, value.dtype)
        x, lam_block = scan_planes(block(value), block(lam), normalize)
        h, state = gspn_scan(x, lam_block, gates, direction, chunk_size, initial_state=state, return_final_state=True)
        del gates, x, lam_block
        yield ((0, start) if axis == 2 else (start, 0)), h


def add_block(
    out: torch.Tensor,
    rows: tuple[int, int],
    corner: tuple[int, int],
    h: torch.Tensor,
    u: torch.Tensor,
    merge: torch.Tensor,
    normalize: bool,
    eps: float,
) -> None:
    """:func:`add_direction` of the part of a block (top-left image ``corner``, hidden states ``h``) that lies in
    the image rows ``rows`` = [a, b) that ``out`` (B, b - a, W, C) accumulates; ``u`` covers the whole image."""
    (a, b), (top, left) = rows, corner
    low, high = max(a, top), min(b, top + h.shape[1])
    if low >= high:
        return
    columns = slice(left, left + h.shape[2])
    add_direction(
        out[:, low - a : high - a, columns],
        h[:, low - top : high - top],
        u[:, low:high, columns],
        merge,
        normalize,
        eps,
    )


def capture_lines(lines: torch.Tensor, line_rows: tuple[int, ...], corner: tuple[int, int], h: torch.Tensor) -> None:
    """Copy into ``lines`` (B, len(line_rows), W, C') the part of each image row of ``line_rows`` that a block
    (top-left image ``corner``, hidden states ``h``) holds: a column range of it for a horizontal scan's block, all
    of it from the one vertical block that contains the row."""
    top, left = corner
    for index, row in enumerate(line_rows):
        if top <= row < top + h.shape[1]:
            lines[:, index, left : left + h.shape[2]] = h[:, row - top]


def line_block_band(
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
    rows: tuple[int, int],
    line_rows: tuple[int, ...] = (),
    eps: float = EPS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`line_block_scan_fused` over the whole image, merged only for the image rows ``rows`` = [a, b), and
    each direction's hidden lines at the image rows ``line_rows`` (a patch-parallel warm-up's band and the boundary
    lines its neighbours need): the accumulator and the captured lines are all that cover more than one block.

    Args as for :func:`line_block_scan_fused`. Returns the merge (B, b - a, W, C) in the value's dtype and, per
    direction in ``DIRECTIONS`` order, its lines (B, len(line_rows), W, C') in the scan's layout (C' = 2C,
    values and normalisers interleaved, when normalising).
    """
    if block_lines < 1:
        raise ValueError(f"block_lines must be a positive number of lines; got {block_lines}.")
    a, b = rows
    out = merge_buffer(value[:, a:b], skip)
    batch, _, width, channels = value.shape
    all_lines = []
    for d in range(len(DIRECTIONS)):
        lines = value.new_empty(batch, len(line_rows), width, 2 * channels if normalize else channels)
        for corner, h in direction_block_scans(
            value, lam, gate_hidden, gate_weight, gate_bias, d, chunk_size, normalize, block_lines
        ):
            add_block(out, rows, corner, h, u, merge[d], normalize, eps)
            capture_lines(lines, line_rows, corner, h)
        all_lines.append(lines)
    return out.to(value.dtype), all_lines


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
    eps: float = EPS,
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
    args = (value, lam, u, gate_hidden, gate_weight, gate_bias, merge, skip, chunk_size, normalize, block_lines)
    out, _ = line_block_band(*args, (0, value.shape[1]), eps=eps)
    return out
