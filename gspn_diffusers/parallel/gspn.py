"""GSPN ``attn1`` layers on a band of rows: only boundary lines cross between processes.

A band runs the four single-direction scans of :func:`gspn_diffusers.ops.gspn_scan` on its own rows and merges them
as :func:`~gspn_diffusers.ops.gspn_scan_fused_reference` does (``sum_d merge[d] * u * h_d / z_d + skip * v``; the
normaliser ``z_d``, the scan of lam alone, rides along as C more channels with the same gates). What lies outside:

- the horizontal scans' 3-way neighbours above the first row and below the last one: the neighbour bands' hidden
  rows, given as ``edge_rows`` (one row of W x 2C per edge and direction);
- the vertical scans' predecessor of the first line: the band above's final line for top-to-bottom, the band
  below's for bottom-to-top, given as ``initial_state``; a local scan (``chunk_size``) whose group boundary falls
  on the band edge needs none.

Exact calls gather the band inputs and compute the whole layer (``sync``: through the processor; stale mode's
warm-up: through the single-direction scans, which also give every band edge's boundary lines for the first stale
step). Stale calls use the boundary lines the neighbours sent during the previous step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..module import GSPNModule
from ..ops import DIRECTIONS, gspn_scan
from .layers import gather_tokens
from .runtime import Runtime

_EPS = 1e-6  # the fused reference's normaliser floor


def gspn_module_of(attn: nn.Module) -> GSPNModule | None:
    """The GSPN parameters of a converted ``attn1`` (the one place that knows where they live)."""
    gspn = getattr(attn, "gspn", None)
    return gspn if isinstance(gspn, GSPNModule) else None


def projections(attn: nn.Module, gspn: GSPNModule, tokens: torch.Tensor, height: int, width: int):
    """v, lam, u and the (B, H, W, 4, 3, G) gate logits of the tokens, as the GSPN module computes them."""
    value, lam, u = gspn.projections(attn, tokens, height, width)
    return value, lam, u, gspn.gate_logits(tokens, height, width, value.dtype)


def scan_inputs(gspn: nn.Module, value: torch.Tensor, lam: torch.Tensor, gates: torch.Tensor):
    """x, lam and per-direction gates of the scans: [v, 1] with doubled gates when normalising."""
    if not gspn.normalize:
        return value, lam, [gates[..., d, :, :] for d in range(len(DIRECTIONS))]
    x = torch.cat([value, torch.ones_like(value)], dim=-1)
    return x, torch.cat([lam, lam], dim=-1), [torch.cat([g, g], dim=-1) for g in gates.unbind(3)]


def merge_output(attn, gspn, value, u, scans: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The merged directions, skip, ``to_out`` and the Attention's residual/rescale, as the processor does."""
    channels = value.shape[-1]
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    out = torch.zeros(value.shape, dtype=acc, device=value.device)
    for d, h in enumerate(scans):
        h = h.to(acc)
        h = h[..., :channels] / h[..., channels:].clamp_min(_EPS) if gspn.normalize else h
        out = out + gspn.merge[d].to(acc) * u.to(acc) * h
    if gspn.skip is not None:
        out = out + gspn.skip.to(acc) * value.to(acc)
    out = out.to(value.dtype).reshape(tokens.shape[0], -1, channels)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + tokens
    return out / attn.rescale_output_factor


def vertical_state_needed(edge_row: int, chunk_size: int | None) -> bool:
    """Whether a vertical scan's state crosses the band edge at ``edge_row`` (a local scan cut there does not)."""
    return chunk_size is None or edge_row % chunk_size != 0


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


def band_scans(x, lam, dir_gates, chunk_size, rows, height, above, below, needed):
    """The four scans (image coordinates, DIRECTIONS order) of the band rows ``[a, b)`` of a ``height``-row image.

    ``above`` / ``below``: (B, 2 or 3, W, C) boundary lines of the neighbour band (left-to-right and right-to-left
    hidden rows just outside the band, then the vertical scan's state where ``needed``), or None at an image edge.
    """

    def row(pack, i):
        return None if pack is None else pack[:, i].to(x.dtype)

    g_ltr, g_rtl, g_ttb, g_btt = dir_gates
    ltr = gspn_scan(x, lam, g_ltr, "left_to_right", chunk_size, edge_rows=(row(above, 0), row(below, 0)))
    rtl = gspn_scan(x, lam, g_rtl, "right_to_left", chunk_size, edge_rows=(row(above, 1), row(below, 1)))
    ttb_state = row(above, 2) if needed[0] else None
    btt_state = row(below, 2) if needed[1] else None
    ttb = vertical_band_scan(x, lam, g_ttb, "top_to_bottom", chunk_size, rows, height, ttb_state)
    btt = vertical_band_scan(x, lam, g_btt, "bottom_to_top", chunk_size, rows, height, btt_state)
    return [ltr, rtl, ttb, btt]


def edge_packs(scans, rows_needed: tuple[bool, bool], first: int, last: int):
    """Boundary lines of the four whole-image scans at rows ``first`` (the row above a band) and ``last`` (the row
    below it), in the layout :func:`band_scans` takes."""
    ltr, rtl, ttb, btt = scans
    above = [ltr[:, first], rtl[:, first]] + ([ttb[:, first]] if rows_needed[0] else [])
    below = [ltr[:, last], rtl[:, last]] + ([btt[:, last]] if rows_needed[1] else [])
    return torch.stack(above, dim=1), torch.stack(below, dim=1)


def patch_gspn(runtime: Runtime, attn: nn.Module, layer_id: int) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            if not runtime.active:
                return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            gspn = gspn_module_of(attn)
            plan, level, comm = runtime.plan, runtime.level, runtime.comm
            height, width = plan.level_height(level), plan.level_width(level)
            a, b = runtime.band_rows()
            needed = (
                a > 0 and vertical_state_needed(a, gspn.chunk_size),
                b < height and vertical_state_needed(b, gspn.chunk_size),
            )
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
                value, lam, u, gates = projections(attn, gspn, full, height, width)
                x, lam2, dir_gates = scan_inputs(gspn, value, lam, gates)
                scans = [gspn_scan(x, lam2, g, d, gspn.chunk_size) for g, d in zip(dir_gates, DIRECTIONS, strict=True)]
                above, below = edge_packs(scans, needed, max(a - 1, 0), min(b, height - 1))
                runtime.slot(layer_id)["value"] = (above if a > 0 else None, below if b < height else None)
                band = [s[:, a:b] for s in scans]
                return merge_output(attn, gspn, value[:, a:b], u[:, a:b], band, hidden_states)
            # stale: this band's rows only, with the neighbours' boundary lines of the previous step
            slot = runtime.slot(layer_id)
            above, below = runtime.stale_value(slot)
            value, lam, u, gates = projections(attn, gspn, hidden_states, b - a, width)
            x, lam2, dir_gates = scan_inputs(gspn, value, lam, gates)
            scans = band_scans(x, lam2, dir_gates, gspn.chunk_size, (a, b), height, above, below, needed)
            ltr, rtl, ttb, btt = scans
            # what the neighbours need next step: this band's first lines for the band above, last for below
            to_above = torch.stack([ltr[:, 0], rtl[:, 0]] + ([btt[:, 0]] if needed[0] else []), dim=1)
            to_below = torch.stack([ltr[:, -1], rtl[:, -1]] + ([ttb[:, -1]] if needed[1] else []), dim=1)
            slot["pending"] = comm.exchange_neighbours(
                to_above if a > 0 else None,
                to_below if b < height else None,
                torch.empty_like(above) if above is not None else None,
                torch.empty_like(below) if below is not None else None,
                tag=layer_id,
            )
            return merge_output(attn, gspn, value, u, scans, hidden_states)

        return forward

    return make
