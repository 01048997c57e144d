"""Helpers for the carried-state and band-edge tests.

Blocks of lines (tests/test_cuda_emulation.py on the host emulation, tests/test_cuda_kernel.py on the GPU): cut the
scan axis into blocks, chain them through the binding's ``scan_forward`` / ``scan_backward`` with the carried
state, and an independent reference with an initial state.

Bands of rows (tests/test_band_edges.py and the backend tests, through the public ``gspn_scan``): scan each band
with its edge rows, exchange them in Jacobi sweeps, combine the four directions as patch parallelism does; and the
binding's band case against the reference.
"""

from __future__ import annotations

import torch

from gspn_diffusers.ops import DIRECTIONS, gspn_scan, gspn_scan_reference

HORIZONTAL = ("left_to_right", "right_to_left")


def scan_axis(direction: str) -> int:
    return 1 if direction in ("top_to_bottom", "bottom_to_top") else 2


def blocks_in_scan_order(t: torch.Tensor, direction: str, cuts: list[int]) -> list[torch.Tensor]:
    """Views of t between the image-coordinate cuts along the scan axis, in the order the scan visits them."""
    axis = scan_axis(direction)
    bounds = [0, *cuts, t.shape[axis]]
    blocks = [t.narrow(axis, lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return blocks[::-1] if direction in ("right_to_left", "bottom_to_top") else blocks


def from_scan_order(blocks: list[torch.Tensor], direction: str) -> torch.Tensor:
    ordered = blocks[::-1] if direction in ("right_to_left", "bottom_to_top") else blocks
    return torch.cat(ordered, dim=scan_axis(direction))


def chained_scan(module, inputs, grad_h, direction, cuts, chunk, initial, grad_final, tile=0):
    """The scan block by block through the binding of ``module`` (CUDA or emulation) with the carried state,
    forward then backward (last block first). Returns h, the final state, [grad x, lam, gates], grad initial."""
    d = DIRECTIONS.index(direction)
    per_block = list(zip(*(blocks_in_scan_order(t, direction, cuts) for t in (*inputs, grad_h)), strict=True))
    outputs, initials, state = [], [], initial
    for x, lam, gates, _ in per_block:
        initials.append(state)
        h, state = module.scan_forward(x, lam, gates, d, chunk, state, True, tile=tile)
        outputs.append(h)
    final_state, grads, carry = state, [], grad_final
    for (x, lam, gates, gh), init in zip(per_block[::-1], initials[::-1], strict=True):
        *g, carry, _, _ = module.scan_backward(gh, x, lam, gates, d, chunk, init, carry, tile=tile)  # no edge rows
        grads.insert(0, g)
    grads = [from_scan_order(list(g), direction) for g in zip(*grads, strict=True)]
    return from_scan_order(outputs, direction), final_state, grads, carry


def reference_with_state(inputs, grad_h, direction, chunk_size, initial, grad_final):
    """The reference with the initial state as an extra first line in scan order (lam = 1, x = state, no
    predecessor), so its gradient is the gradient of x on that line; the final state is the last line of h."""
    x, lam, gates = (t.double().requires_grad_() for t in inputs)
    state = initial.double().requires_grad_()
    axis = scan_axis(direction)
    line = state.unsqueeze(axis)
    ones = torch.ones_like(line)
    zeros = torch.zeros(*line.shape[:3], 3, gates.shape[-1], dtype=gates.dtype, device=gates.device)
    first = direction in ("left_to_right", "top_to_bottom")

    def pair(extra, t):
        return torch.cat([extra, t] if first else [t, extra], dim=axis)

    h = gspn_scan_reference(pair(line, x), pair(ones, lam), pair(zeros, gates), direction, chunk_size)
    h = h.narrow(axis, 1 if first else 0, x.shape[axis])
    final = h.select(axis, x.shape[axis] - 1 if first else 0)
    (h * grad_h.double()).sum().add((final * grad_final.double()).sum()).backward()
    return h.detach(), final.detach(), [x.grad, lam.grad, gates.grad], state.grad


def state_case(direction, dtype, seed=0, shape=(2, 5, 7, 6, 3), device="cpu"):
    """Inputs (x, lam, gate logits), grad_h, a non-contiguous initial state and grad_final_state for one scan."""
    b, h, w, c, g = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, low=-1.0, high=1.0):
        return torch.rand(*size, generator=gen) * (high - low) + low

    inputs = [rand(b, h, w, c), rand(b, h, w, c, low=0.1, high=1.0), rand(b, h, w, 3, g, low=-3, high=3)]
    n_perp = w if scan_axis(direction) == 1 else h
    initial = rand(b, c, n_perp).transpose(1, 2)  # (B, n_perp, C), not contiguous
    grad_h, grad_final = torch.randn(b, h, w, c, generator=gen), torch.randn(b, n_perp, c, generator=gen)

    def put(t):
        return t.to(device=device, dtype=dtype)

    return [put(t) for t in inputs], put(grad_h), put(initial), put(grad_final)


# ---- Bands of rows -------------------------------------------------------------------------------------------


def bands_of(height: int, cuts: list[int]) -> list[tuple[int, int]]:
    edges = [0, *cuts, height]
    return list(zip(edges[:-1], edges[1:], strict=True))


def true_edge_rows(h: torch.Tensor, r0: int, r1: int):
    """The whole scan's hidden rows just above and below band [r0, r1); None at the image's own edges."""
    return (h[:, r0 - 1] if r0 > 0 else None, h[:, r1] if r1 < h.shape[1] else None)


def banded_scan(x, lam, gates, direction, cuts, chunk_size, edge_rows_of):
    """Each band of rows scanned alone, ``edge_rows_of(r0, r1)`` giving its edge rows; bands stacked back."""
    return torch.cat(
        [
            gspn_scan(
                x[:, r0:r1], lam[:, r0:r1], gates[:, r0:r1], direction, chunk_size, edge_rows=edge_rows_of(r0, r1)
            )
            for r0, r1 in bands_of(x.shape[1], cuts)
        ],
        dim=1,
    )


def jacobi_banded_scan(x, lam, gates, direction, cuts, chunk_size):
    """Bands exchanging edge rows for as many sweeps as the scan has steps (the first sweep gets zero rows): in one
    autograd graph, every band's edge rows are outputs of its neighbours' scans."""
    bands = bands_of(x.shape[1], cuts)
    outputs = [torch.zeros_like(x[:, r0:r1]) for r0, r1 in bands]
    for _ in range(x.shape[2]):
        edges = [
            (outputs[i - 1][:, -1] if i > 0 else None, outputs[i + 1][:, 0] if i + 1 < len(bands) else None)
            for i in range(len(bands))
        ]
        outputs = [
            gspn_scan(x[:, r0:r1], lam[:, r0:r1], gates[:, r0:r1], direction, chunk_size, edge_rows=edges[i])
            for i, (r0, r1) in enumerate(bands)
        ]
    return torch.cat(outputs, dim=1)


def patch_parallel_scan(x, lam, gates4, merge, cuts, chunk_size):
    """sum_d merge[d] * h_d over bands of rows: the horizontal scans exchange edge rows (Jacobi sweeps), the vertical
    ones run band after band with the carried state (top_to_bottom from the band above, bottom_to_top from the band
    below)."""
    out = 0
    for d, direction in enumerate(DIRECTIONS):
        gates = gates4[:, :, :, d]
        if direction in HORIZONTAL:
            h = jacobi_banded_scan(x, lam, gates, direction, cuts, chunk_size)
        else:
            bands = bands_of(x.shape[1], cuts)
            order = bands if direction == "top_to_bottom" else bands[::-1]
            state, pieces = None, {}
            for r0, r1 in order:
                pieces[r0], state = gspn_scan(
                    x[:, r0:r1], lam[:, r0:r1], gates[:, r0:r1], direction, chunk_size, state, return_final_state=True
                )
            h = torch.cat([pieces[r0] for r0, _ in bands], dim=1)
        out = out + merge[d] * h
    return out


def band_case(direction, dtype, seed=0, shape=(2, 5, 7, 6, 3), device="cpu", above=True, below=True):
    """Inputs (x, lam, gate logits), grad_h and non-contiguous (B, W, C) edge rows (None where not wanted) for the
    binding's horizontal scan of one band."""
    b, h, w, c, g = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, low=-1.0, high=1.0):
        return torch.rand(*size, generator=gen) * (high - low) + low

    def put(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    inputs = [rand(b, h, w, c), rand(b, h, w, c, low=0.1, high=1.0), rand(b, h, w, 3, g, low=-3, high=3)]
    edges = [rand(b, c, w).transpose(1, 2) if wanted else None for wanted in (above, below)]
    grad_h = torch.randn(b, h, w, c, generator=gen)
    return [put(t) for t in inputs], put(grad_h), [put(t) for t in edges]


def band_scan(module, inputs, grad_h, direction, chunk, edges, tile=0):
    """The band through the binding of ``module``: h, [grad x, lam, gates], [grad above, grad below]."""
    d = DIRECTIONS.index(direction)
    h, final = module.scan_forward(*inputs, d, chunk, None, False, tile=tile, edge_above=edges[0], edge_below=edges[1])
    assert final is None
    gx, glam, ggate, gstate, *gedges = module.scan_backward(
        grad_h, *inputs, d, chunk, None, None, tile=tile, edge_above=edges[0], edge_below=edges[1]
    )
    assert gstate is None
    return h, [gx, glam, ggate], gedges


def band_reference(inputs, grad_h, direction, chunk_size, edges):
    """The reference in fp64 with the same edge rows: h, [grad x, lam, gates], [grad above, grad below]."""
    leaves = [t.double().requires_grad_() for t in inputs]
    edge_leaves = [None if t is None else t.double().requires_grad_() for t in edges]
    h = gspn_scan_reference(*leaves, direction, chunk_size, edge_rows=tuple(edge_leaves))
    h.backward(grad_h.double())
    return h.detach(), [t.grad for t in leaves], [None if t is None else t.grad for t in edge_leaves]
