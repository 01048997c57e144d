"""Pure-PyTorch reference of the GSPN line scan: the oracle every other backend is tested against.

The operator contract (DESIGN.md section 1) is stated in image coordinates for ``left_to_right``.
Every direction is brought to that canonical form by a transpose and/or a flip of the *scan*
axis only, scanned with a Python loop over the scan axis (vectorised over batch, channels and
the lines orthogonal to the scan) and brought back, so the four directions share one loop and
their outputs are always returned in image coordinates.

Computation happens in fp32 (fp64 stays fp64) and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch

DIRECTIONS: tuple[str, ...] = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
NUM_GATES = 3  # neighbour offsets -1, 0, +1 along the axis perpendicular to the scan

_TRANSPOSED = {"left_to_right": False, "right_to_left": False, "top_to_bottom": True, "bottom_to_top": True}
_REVERSED = {"left_to_right": False, "right_to_left": True, "top_to_bottom": False, "bottom_to_top": True}


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"Unknown GSPN direction {direction!r}; expected one of {', '.join(DIRECTIONS)}.")


def check_scan_inputs(x: torch.Tensor, lam: torch.Tensor, gate_logits: torch.Tensor, chunk_size: int | None) -> None:
    """Validate shapes once, at the public entry points, with messages that say what to pass."""
    if x.dim() != 4:
        raise ValueError(f"x must be channels-last (B, H, W, C); got shape {tuple(x.shape)}.")
    if lam.shape != x.shape:
        raise ValueError(f"lam must have the shape of x {tuple(x.shape)}; got {tuple(lam.shape)}.")
    b, h, w, c = x.shape
    if gate_logits.dim() != 5 or gate_logits.shape[:4] != (b, h, w, NUM_GATES):
        raise ValueError(
            f"gate_logits must be (B, H, W, 3, G) = ({b}, {h}, {w}, 3, G); got {tuple(gate_logits.shape)}."
        )
    if c % gate_logits.shape[-1] != 0:
        raise ValueError(
            f"gate channels G={gate_logits.shape[-1]} must divide the channels C={c} (each gate is shared by "
            f"C/G consecutive channels)."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (global scan) or a positive int; got {chunk_size!r}.")


def check_initial_state(x: torch.Tensor, initial_state: torch.Tensor | None, direction: str) -> None:
    """initial_state is one hidden line across the scan: (B, H, C) for horizontal scans, (B, W, C) for vertical."""
    if initial_state is None:
        return
    b, h, w, c = x.shape
    expected = (b, w if _TRANSPOSED[direction] else h, c)
    if tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state for a {direction} scan of x {tuple(x.shape)} must be (B, n_perp, C) = {expected} "
            f"(n_perp = H for the horizontal scans, W for the vertical ones); got {tuple(initial_state.shape)}."
        )
    if initial_state.device != x.device or not initial_state.is_floating_point():
        raise ValueError(
            f"initial_state must be a floating-point tensor on {x.device}; got {initial_state.dtype} on "
            f"{initial_state.device}."
        )


EdgeRows = tuple[torch.Tensor | None, torch.Tensor | None]


def check_edge_rows(
    x: torch.Tensor, edge_rows: EdgeRows | None, direction: str, initial_state: torch.Tensor | None
) -> EdgeRows | None:
    """edge_rows = (above, below) of a band of rows, each None or (B, W, C); returns None when both are None."""
    if edge_rows is None:
        return None
    if not isinstance(edge_rows, (tuple, list)) or len(edge_rows) != 2:
        raise ValueError(f"edge_rows must be a pair (above, below), each None or a (B, W, C) tensor; got {edge_rows}.")
    above, below = edge_rows
    if above is None and below is None:
        return None
    if _TRANSPOSED[direction]:
        raise ValueError(
            f"edge_rows is for the horizontal scans (left_to_right, right_to_left), not {direction}: a vertical scan "
            "over a band of rows chains the bands with initial_state (the final state of the band before it)."
        )
    if initial_state is not None:
        raise ValueError(
            "edge_rows and initial_state cannot be combined: the edge neighbours of a block's first line lie outside "
            "both the block and the edge rows. Cut the image either into bands of rows or into blocks of columns."
        )
    b, _, w, c = x.shape
    for name, edge in (("above", above), ("below", below)):
        if edge is None:
            continue
        if not isinstance(edge, torch.Tensor) or tuple(edge.shape) != (b, w, c):
            shape = tuple(edge.shape) if isinstance(edge, torch.Tensor) else type(edge).__name__
            raise ValueError(
                f"edge_rows {name} for x {tuple(x.shape)} must be None or (B, W, C) = {(b, w, c)} (the hidden row "
                f"{'above the band' if name == 'above' else 'below the band'} at every column); got {shape}."
            )
        if edge.device != x.device or not edge.is_floating_point():
            raise ValueError(
                f"edge_rows {name} must be a floating-point tensor on {x.device}; got {edge.dtype} on {edge.device}."
            )
    return above, below


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_scan_layout(t: torch.Tensor, direction: str) -> torch.Tensor:
    """(B, H, W, ...) in image coordinates -> (B, R, L, ...) with the scan running along dim 2 from index 0."""
    if _TRANSPOSED[direction]:
        t = t.transpose(1, 2)
    if _REVERSED[direction]:
        t = t.flip(2)
    return t


def from_scan_layout(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`to_scan_layout`."""
    if _REVERSED[direction]:
        t = t.flip(2)
    if _TRANSPOSED[direction]:
        t = t.transpose(1, 2)
    return t


def expand_gate_channels(gate_logits: torch.Tensor, channels: int) -> torch.Tensor:
    """Gates with G < C channels are shared by groups of C/G consecutive channels."""
    groups = gate_logits.shape[-1]
    if groups == channels:
        return gate_logits
    return gate_logits.repeat_interleave(channels // groups, dim=-1)


def normalized_gates(gate_logits: torch.Tensor, above: bool = False, below: bool = False) -> torch.Tensor:
    """Row-stochastic propagation weights from logits in scan layout (..., R, L, 3, C).

    A neighbour outside [0, R) is dropped and the remaining weights renormalised, so every
    weight row sums to one (the Stability-Context Condition). ``above`` / ``below``: the row before
    row 0 / after row R - 1 is given (a band's edge row), so that neighbour is valid.
    """
    rows = gate_logits.shape[1]
    valid = torch.ones(rows, NUM_GATES, dtype=gate_logits.dtype, device=gate_logits.device)
    valid[0, 0] = float(above)
    valid[rows - 1, 2] = float(below)
    weights = torch.sigmoid(gate_logits) * valid[:, None, :, None]
    return weights / weights.sum(dim=3, keepdim=True)


def chunk_starts(
    length: int, chunk_size: int | None, reversed_scan: bool, device: torch.device, carried: bool = False
) -> torch.Tensor:
    """Bool (L,) in scan order: True where a line has no predecessor.

    Groups are aligned to image coordinates (image line i is in group i // chunk_size) for every
    direction, so a reversed scan starts at the last image line of each group. ``carried``: the
    first line's predecessor is a carried state, which a global scan uses; a local scan is cut into
    blocks at group boundaries, so its first line always starts a group.
    """
    steps = torch.arange(length, device=device)
    image_index = length - 1 - steps if reversed_scan else steps
    if chunk_size is None:
        group = torch.zeros_like(image_index)
    else:
        group = torch.div(image_index, chunk_size, rounding_mode="floor")
    starts = torch.ones(length, dtype=torch.bool, device=device)
    starts[1:] = group[1:] != group[:-1]
    if carried and chunk_size is None and length > 0:
        starts[0] = False
    return starts


def propagate(
    source: torch.Tensor,
    weights: torch.Tensor,
    starts: torch.Tensor,
    initial: torch.Tensor | None = None,
    edges: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """The recurrence in scan layout: h[:, :, j] = source[:, :, j] + sum_k w_k * h[:, r + k - 1, j - 1].

    source: (N, R, L, C); weights: (N, R, L, 3, C) row-stochastic; starts: (L,) bool or (N, L) bool;
    initial: (N, R, C), the line h[:, :, -1] before the first (zeros if None); edges: the rows h[:, -1] and
    h[:, R] outside the band, each (N, L, C) in scan order or None (zeros: their weights are 0). Loops over L only.
    """
    starts = starts.expand(source.shape[0], -1) if starts.dim() == 1 else starts
    lines: list[torch.Tensor] = []
    previous = torch.zeros_like(source[:, :, 0]) if initial is None else initial
    for j in range(source.shape[2]):
        above, below = (
            torch.zeros_like(previous[:, :1]) if e is None or j == 0 else e[:, j - 1].unsqueeze(1) for e in edges
        )
        padded = torch.cat([above, previous, below], dim=1)  # (N, R + 2, C): padded[r + k] is h[r + k - 1]
        w = weights[:, :, j]
        carried = w[:, :, 0] * padded[:, :-2] + w[:, :, 1] * padded[:, 1:-1] + w[:, :, 2] * padded[:, 2:]
        carried = torch.where(starts[:, j, None, None], torch.zeros_like(carried), carried)
        previous = source[:, :, j] + carried
        lines.append(previous)
    return torch.stack(lines, dim=2) if lines else torch.empty_like(source)  # an empty scan axis: nothing to scan


def gspn_scan_reference(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    direction: str,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    edge_rows: EdgeRows | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One-direction GSPN scan. x, lam: (B, H, W, C); gate_logits: (B, H, W, 3, G) with G | C.

    Returns h (B, H, W, C) in image coordinates and in the dtype of ``x``.

    Carried state, for scanning a latent in consecutive blocks of lines (streaming, line-block
    inference): ``initial_state`` (B, n_perp, C), n_perp = H for the horizontal scans and W for the
    vertical ones, is the hidden line that precedes the block's first line in scan order; the first
    line's gates weigh it like any predecessor (a chunked scan's first line starts a group, so there
    it is unused). With ``return_final_state`` the result is ``(h, final_state)``, the block's last
    line in scan order, which is the next block's ``initial_state``.

    Band edges, for a band of rows ``[r0, r1)`` of a taller image (patch parallelism), horizontal scans only:
    ``edge_rows = (above, below)``, each None (a true image edge: the neighbour is dropped and the weights
    renormalised) or (B, W, C) in image coordinates, ``above[:, j]`` the hidden state h of row r0 - 1 at column j
    and ``below[:, j]`` that of row r1. At the step that visits column j, the band's first row's offset -1 neighbour
    is ``above`` at the previous column in scan order (j - 1 left to right, j + 1 right to left) and the last row's
    offset +1 neighbour is ``below`` there: valid predecessors weighted by their gates, no renormalisation. A line
    without predecessor (the first, and the first of every chunk) has none, edges included. Not combinable with
    ``initial_state``; the vertical scans of a band chain the bands with ``initial_state`` instead.
    """
    check_direction(direction)
    check_scan_inputs(x, lam, gate_logits, chunk_size)
    check_initial_state(x, initial_state, direction)
    edge_rows = check_edge_rows(x, edge_rows, direction, initial_state)
    dtype = _compute_dtype(x.dtype)
    source = to_scan_layout((lam.to(dtype) * x.to(dtype)), direction)
    gates = to_scan_layout(expand_gate_channels(gate_logits.to(dtype), x.shape[-1]), direction)
    carried = initial_state is not None
    starts = chunk_starts(source.shape[2], chunk_size, _REVERSED[direction], x.device, carried=carried)
    initial = initial_state.to(dtype) if carried else None
    # (B, W, C) edge rows in scan order: the scan layout's flip of the scan axis, which is their dim 1.
    edges = (None, None) if edge_rows is None else tuple(_edge_in_scan_order(e, direction, dtype) for e in edge_rows)
    weights = normalized_gates(gates, above=edges[0] is not None, below=edges[1] is not None)
    h = propagate(source, weights, starts, initial, edges)
    out = from_scan_layout(h, direction).to(x.dtype)
    if not return_final_state:
        return out
    if h.shape[2] > 0:
        final = h[:, :, -1]
    else:  # an empty block passes the state through (a copy: the caller's state is not returned as the output)
        final = initial.clone() if carried else h.new_zeros(h.shape[0], h.shape[1], h.shape[3])
    return out, final.to(x.dtype)


def _edge_in_scan_order(edge: torch.Tensor | None, direction: str, dtype: torch.dtype) -> torch.Tensor | None:
    if edge is None:
        return None
    edge = edge.to(dtype)
    return edge.flip(1) if _REVERSED[direction] else edge


def _scan_direction_pair(
    sources: torch.Tensor, gate_logits: torch.Tensor, pair: tuple[str, str], chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan two opposite directions in one loop by stacking them on the batch axis.

    sources: (B, H, W, S, C) stacks the S inputs that share one set of gates (the scanned values
    and, when normalising, a plane of lam), so one loop serves them all.
    """
    b = sources.shape[0]
    laid_out = [to_scan_layout(sources, d) for d in pair]
    gates = [to_scan_layout(gate_logits[..., DIRECTIONS.index(d), :, :], d) for d in pair]
    length = laid_out[0].shape[2]
    starts = torch.stack([chunk_starts(length, chunk_size, _REVERSED[d], sources.device) for d in pair])
    stacked = torch.cat(laid_out, dim=0)  # (2B, R, L, S, C)
    n, r, length, s, c = stacked.shape
    weights = normalized_gates(torch.cat(gates, dim=0))  # (2B, R, L, 3, C)
    weights = weights.unsqueeze(-2).expand(n, r, length, NUM_GATES, s, c).reshape(n, r, length, NUM_GATES, s * c)
    h = propagate(stacked.reshape(n, r, length, s * c), weights, starts.repeat_interleave(b, dim=0))
    h = h.reshape(n, r, length, s, c)
    return from_scan_layout(h[:b], pair[0]), from_scan_layout(h[b:], pair[1])


def gspn_scan_fused_reference(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    u: torch.Tensor,
    merge: torch.Tensor,
    skip: torch.Tensor | None = None,
    chunk_size: int | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Four-direction GSPN scan merged in image coordinates.

    y = sum_d merge[d] * u_d * h_d (+ skip * x), where h_d = gspn_scan(x, lam, gates[d], DIRECTIONS[d]).

    With ``normalize=True`` every direction output is divided by the same scan of ``lam`` alone
    (x = 1): h_d / max(z_d, eps). That is linear attention's normaliser; with lam > 0 each h_d / z_d
    is a weighted average of x, so the output keeps its scale at any resolution.

    Shapes: x, lam: (B, H, W, C); gate_logits: (B, H, W, 4, 3, G) in DIRECTIONS order, G | C;
    u: (B, H, W, C) shared by all directions or (B, H, W, 4, C) per direction; merge: (4,) or (4, C);
    skip: (C,) or None.
    """
    check_fused_inputs(x, lam, gate_logits, u, merge, skip, chunk_size)
    dtype = _compute_dtype(x.dtype)
    xf, lamf = x.to(dtype), lam.to(dtype)
    gates = expand_gate_channels(gate_logits.to(dtype), x.shape[-1])
    planes = [lamf * xf, lamf] if normalize else [lamf * xf]
    sources = torch.stack(planes, dim=3)  # (B, H, W, S, C)
    uf = u.to(dtype)
    mergef = merge.to(dtype)
    out = torch.zeros_like(xf)
    for pair in ((DIRECTIONS[0], DIRECTIONS[1]), (DIRECTIONS[2], DIRECTIONS[3])):
        for direction, h in zip(pair, _scan_direction_pair(sources, gates, pair, chunk_size), strict=True):
            d = DIRECTIONS.index(direction)
            h_d = h[..., 0, :] / h[..., 1, :].clamp_min(eps) if normalize else h[..., 0, :]
            u_d = uf[..., d, :] if uf.dim() == 5 else uf
            out = out + mergef[d] * u_d * h_d
    if skip is not None:
        out = out + skip.to(dtype) * xf
    return out.to(x.dtype)


def check_fused_inputs(
    x: torch.Tensor,
    lam: torch.Tensor,
    gate_logits: torch.Tensor,
    u: torch.Tensor,
    merge: torch.Tensor,
    skip: torch.Tensor | None,
    chunk_size: int | None,
) -> None:
    num_dirs = len(DIRECTIONS)
    if gate_logits.dim() != 6 or gate_logits.shape[3] != num_dirs:
        raise ValueError(f"fused gate_logits must be (B, H, W, {num_dirs}, 3, G); got {tuple(gate_logits.shape)}.")
    check_scan_inputs(x, lam, gate_logits[:, :, :, 0], chunk_size)
    c = x.shape[-1]
    if u.shape != x.shape and u.shape != (*x.shape[:3], num_dirs, c):
        raise ValueError(f"u must be (B, H, W, C) or (B, H, W, {num_dirs}, C); got {tuple(u.shape)}.")
    if merge.shape not in ((num_dirs,), (num_dirs, c)):
        raise ValueError(f"merge must be ({num_dirs},) or ({num_dirs}, {c}); got {tuple(merge.shape)}.")
    if skip is not None and skip.shape != (c,):
        raise ValueError(f"skip must be ({c},); got {tuple(skip.shape)}.")
