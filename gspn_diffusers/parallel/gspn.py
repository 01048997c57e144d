"""GSPN ``attn1`` layers on a band of rows: only boundary lines cross between processes.

A band runs the four single-direction scans of :func:`gspn_diffusers.ops.gspn_scan` on its own rows and merges them
as :func:`~gspn_diffusers.ops.gspn_scan_fused_reference` does (``sum_d merge[d] * u * h_d / z_d + skip * v``; the
normaliser ``z_d``, the scan of lam alone, rides along interleaved with the values, see
:func:`~gspn_diffusers.line_block.scan_planes`). What lies outside:

- the horizontal scans' 3-way neighbours above the first row and below the last one: the neighbour bands' hidden
  rows, given as ``edge_rows`` (one row of W x 2C per edge and direction, values and normalisers interleaved);
- the vertical scans' predecessor of the first line: the band above's final line for top-to-bottom, the band
  below's for bottom-to-top, given as ``initial_state``; a local scan (``chunk_size``) whose group boundary falls
  on the band edge needs none.

Memory: the directions run one after the other, each with only its own gates, up-projected from the gate
down-projection (the gates of all four, (B, H, W, 4, 3, G), never exist), each merged into one accumulator and freed
before the next. A direction's gates exist for the whole band: the horizontal scans take ``edge_rows``, which the
operator does not combine with the carried state that cutting them into blocks of columns would need, so blocks of
rows for the vertical scans alone would not lower the peak.

Exact calls gather the band inputs and compute the whole layer (``sync``: through the processor; stale mode's
warm-up: the same single-direction scans on the whole image, which has no band edges and so streams in line blocks
(:func:`~gspn_diffusers.line_block.line_block_band`), merging only the band's rows and picking up the boundary lines
of its edges for the first stale step). Stale calls use the boundary lines the neighbours sent during the previous
step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..line_block import add_direction, direction_gate_logits, line_block_band, merge_buffer, scan_planes
from ..module import GSPNModule
from ..ops import DIRECTIONS, gspn_scan
from .layers import gather_tokens
from .runtime import Runtime


def gspn_module_of(attn: nn.Module) -> GSPNModule | None:
    """The GSPN parameters of a converted ``attn1`` (the one place that knows where they live)."""
    gspn = getattr(attn, "gspn", None)
    return gspn if isinstance(gspn, GSPNModule) else None


def vertical_state_needed(edge_row: int, chunk_size: int | None) -> bool:
    """Whether a vertical scan's state crosses the band edge at ``edge_row`` (a local scan cut there does not)."""
    return chunk_size is None or edge_row % chunk_size != 0


def states_crossing(rows: tuple[int, int], height: int, chunk_size: int | None) -> tuple[bool, bool]:
    """Whether a vertical scan's state crosses the top / bottom edge of the band rows ``[a, b)`` of a ``height``-row
    image (never at an image edge)."""
    a, b = rows
    return a > 0 and vertical_state_needed(a, chunk_size), b < height and vertical_state_needed(b, chunk_size)


def vertical_band_scan(x, lam, gates, direction, chunk_size, rows, height, state):
    """A vertical scan of the band rows ``[a, b)`` of a ``height``-row image, continued from a neighbour's state.

    A local scan is cut at its group boundaries (image coordinates): the partial group at the band's top (bottom)
    edge continues the band above's (below's) group, scanned globally from its state for top-to-bottom
    (bottom-to-top), from nothing for the other direction; the aligned middle scans locally.
    """
    a, b = rows
    if chunk_size is None:
        return gspn_scan(x, lam, gates, direction, None, initial_state=state)
    k = chunk_size
    head_end = min(b, -(-a // k) * k)
    tail_start = max(head_end, b // k * k) if b % k and b < height else b
    pieces = []
    for start, end, chunk in ((a, head_end, None), (head_end, tail_start, k), (tail_start, b, None)):
        if end <= start:
            continue
        continues = (direction == "top_to_bottom" and start == a and a % k) or (
            direction == "bottom_to_top" and end == b and b % k and b < height
        )
        part = [t.narrow(1, start - a, end - start) for t in (x, lam, gates)]
        pieces.append(gspn_scan(*part, direction, chunk, initial_state=state if continues else None))
    return torch.cat(pieces, dim=1)


@dataclass(frozen=True)
class Band:
    """The band rows ``[a, b)`` of a ``height``-row image and the boundary lines its scans take from outside.

    ``above`` / ``below``: (B, 2 or 3, W, C') boundary lines of the neighbour band (the left-to-right and
    right-to-left hidden rows just outside the band, then, where a state crosses the edge, the vertical scan's
    state), or None at an image edge; C' is the scans' channels (2C interleaved when normalising).
    """

    rows: tuple[int, int]
    height: int
    above: torch.Tensor | None = None
    below: torch.Tensor | None = None


def _line(pack: torch.Tensor | None, index: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if pack is None or pack.shape[1] <= index else pack[:, index].to(dtype)


def band_scan(
    x: torch.Tensor, lam: torch.Tensor, gates: torch.Tensor, direction: str, chunk_size: int | None, band: Band
) -> torch.Tensor:
    """One direction's scan (image coordinates) of the band's rows, continued from its boundary lines."""
    if direction in ("left_to_right", "right_to_left"):
        index = DIRECTIONS.index(direction)  # the packs' first two lines, in DIRECTIONS order
        edges = (_line(band.above, index, x.dtype), _line(band.below, index, x.dtype))
        return gspn_scan(x, lam, gates, direction, chunk_size, edge_rows=edges)
    state = _line(band.above if direction == "top_to_bottom" else band.below, 2, x.dtype)
    return vertical_band_scan(x, lam, gates, direction, chunk_size, band.rows, band.height, state)


def band_mixing(
    attn: nn.Module, gspn: GSPNModule, tokens: torch.Tensor, width: int, band: Band
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """GSPN's token mixing of the band's ``tokens`` (before ``to_out``), one direction's gates at a time.

    Returns the band's mixing (B, rows, W, C) and, per direction, its hidden lines at the band's first and last rows
    (B, 2, W, C'), from which :func:`edge_pack` builds the boundary lines the band sends.
    """
    a, b = band.rows
    value, lam, u = gspn.projections(attn, tokens, b - a, width)
    gate_hidden = gspn.gate_hidden(tokens, b - a, width)
    out = merge_buffer(value, gspn.skip)
    x, lam = scan_planes(value, lam, gspn.normalize)
    del value  # x holds the values (a copy when normalising)
    lines = [_merge_direction(gspn, d, x, lam, u, gate_hidden, band, out) for d in range(len(DIRECTIONS))]
    return out.to(x.dtype), lines


def _merge_direction(
    gspn: GSPNModule,
    d: int,
    x: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor,
    gate_hidden: torch.Tensor,
    band: Band,
    out: torch.Tensor,
) -> torch.Tensor:
    """Direction ``d``'s scan with its own gates only (freed once it has run, before the merge), added to ``out``;
    returns its first and last lines, and the rest of the scan is freed on return."""
    gates = direction_gate_logits(gate_hidden, gspn.gate_up.weight, gspn.gate_up.bias, d, x.dtype)
    h = band_scan(x, lam, gates, DIRECTIONS[d], gspn.chunk_size, band)
    del gates  # before the merge's temporaries
    add_direction(out, h, u, gspn.merge[d], gspn.normalize)
    return h[:, [0, -1]]


def edge_pack(lines: list[torch.Tensor], index: int, vertical: str | None) -> torch.Tensor:
    """The boundary lines of one band edge from each direction's two lines (:func:`band_mixing`, or
    :func:`~gspn_diffusers.line_block.line_block_band` in the warm-up): the horizontal scans' line ``index`` and,
    where a state crosses the edge (``vertical`` not None), that vertical scan's."""
    picked = lines[:2] + ([lines[DIRECTIONS.index(vertical)]] if vertical is not None else [])
    return torch.stack([line[:, index] for line in picked], dim=1)


def stale_band(
    attn: nn.Module, gspn: GSPNModule, tokens: torch.Tensor, width: int, band: Band, needed: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stale call's band: its mixing (B, b - a, W, C) from its own rows and the neighbours' boundary lines, and the
    boundary lines it sends (its first lines for the band above, its last for the band below; ``needed``: whether
    a vertical state crosses the top / bottom edge)."""
    out, lines = band_mixing(attn, gspn, tokens, width, band)
    to_above = edge_pack(lines, 0, "bottom_to_top" if needed[0] else None)
    to_below = edge_pack(lines, 1, "top_to_bottom" if needed[1] else None)
    return out, to_above, to_below


def exact_band(
    attn: nn.Module,
    gspn: GSPNModule,
    tokens: torch.Tensor,
    width: int,
    rows: tuple[int, int],
    height: int,
    needed: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A warm-up call's band from the whole image's ``tokens``: its mixing (B, b - a, W, C) and the boundary lines it
    receives in the first stale step (the whole scans' rows just above and below it).

    The whole image has no band edges, so it streams like line-block inference, ``line_block_lines`` at a time:
    one block's gates and scan planes at once, the merge accumulated for the band's rows only, the boundary lines
    picked up as the blocks pass. At any size, not only above ``line_block_tokens``: a single block per direction
    would hold its interleaved scan planes (2 x 2C per token) for the whole image beside the projections.
    """
    a, b = rows
    value, lam, u = gspn.projections(attn, tokens, height, width)
    out, lines = line_block_band(
        value,
        lam,
        u,
        gspn.gate_hidden(tokens, height, width),
        gspn.gate_up.weight,
        gspn.gate_up.bias,
        gspn.merge,
        gspn.skip,
        gspn.chunk_size,
        gspn.normalize,
        gspn.line_block_lines,
        rows,
        (max(a - 1, 0), min(b, height - 1)),
    )
    above = edge_pack(lines, 0, "top_to_bottom" if needed[0] else None)
    below = edge_pack(lines, 1, "bottom_to_top" if needed[1] else None)
    return out, above, below


def attention_output(attn: nn.Module, mixing: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``to_out`` and the Attention's residual/rescale of the (B, H, W, C) mixing, as the processor does."""
    out = mixing.reshape(tokens.shape[0], -1, mixing.shape[-1])
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + tokens
    return out / attn.rescale_output_factor


def patch_gspn(runtime: Runtime, attn: nn.Module, layer_id: int) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            if not runtime.active:
                return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            gspn = gspn_module_of(attn)
            plan, level, comm = runtime.plan, runtime.level, runtime.comm
            height, width = plan.level_height(level), plan.level_width(level)
            a, b = runtime.band_rows()
            needed = states_crossing((a, b), height, gspn.chunk_size)
            if runtime.exact:
                full = gather_tokens(runtime, layer_id, hidden_states)
                if runtime.mode == "sync":  # the whole layer, by the processor (fused kernel, line blocks)
                    band_size = gspn.latent_size
                    gspn.latent_size = (height, width)
                    try:
                        out = original(full, None, None, **kwargs)
                    finally:
                        gspn.latent_size = band_size
                    return out[:, a * width : b * width]
                mixing, above, below = exact_band(attn, gspn, full, width, (a, b), height, needed)
                runtime.slot(layer_id)["value"] = (above if a > 0 else None, below if b < height else None)
                return attention_output(attn, mixing, hidden_states)
            # stale: this band's rows only, with the neighbours' boundary lines of the previous step
            slot = runtime.slot(layer_id)
            above, below = runtime.stale_value(slot)
            band = Band((a, b), height, above, below)
            mixing, to_above, to_below = stale_band(attn, gspn, hidden_states, width, band, needed)
            slot["pending"] = comm.exchange_neighbours(
                to_above if a > 0 else None,
                to_below if b < height else None,
                torch.empty_like(above) if above is not None else None,
                torch.empty_like(below) if below is not None else None,
                tag=layer_id,
            )
            return attention_output(attn, mixing, hidden_states)

        return forward

    return make
