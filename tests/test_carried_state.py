"""Carried state: a scan cut into consecutive blocks of lines, chained by the state, equals the whole scan."""

from __future__ import annotations

import pytest
import torch

from gspn_diffusers.ops import DIRECTIONS, gspn_scan

HORIZONTAL = ("left_to_right", "right_to_left")


def make_inputs(b=2, h=6, w=7, c=4, groups=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64).to(dtype)
    lam = (torch.rand(b, h, w, c, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    gates = (2.0 * torch.randn(b, h, w, 3, groups, generator=gen, dtype=torch.float64)).to(dtype)
    return x, lam, gates


def scan_axis(direction: str) -> int:
    return 2 if direction in HORIZONTAL else 1


def blocks_in_scan_order(length: int, cuts: list[int], direction: str) -> list[slice]:
    """Image-coordinate slices of the scan axis, in the order the scan visits them."""
    edges = [0, *cuts, length]
    blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return blocks[::-1] if direction in ("right_to_left", "bottom_to_top") else blocks


def scan_in_blocks(x, lam, gates, direction, cuts, chunk_size=None, initial_state=None):
    axis = scan_axis(direction)
    state = initial_state
    pieces = {}
    for block in blocks_in_scan_order(x.shape[axis], cuts, direction):
        index = (slice(None),) * axis + (block,)
        h, state = gspn_scan(
            x[index], lam[index], gates[index], direction, chunk_size, initial_state=state, return_final_state=True
        )
        pieces[block.start] = h
    return torch.cat([pieces[k] for k in sorted(pieces)], dim=axis), state


def last_line(h: torch.Tensor, direction: str) -> torch.Tensor:
    """The whole scan's final state: its last line in scan order, as (B, n_perp, C)."""
    index = {
        "left_to_right": (slice(None), slice(None), -1),
        "right_to_left": (slice(None), slice(None), 0),
        "top_to_bottom": (slice(None), -1),
        "bottom_to_top": (slice(None), 0),
    }[direction]
    return h[index]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("cuts", [[1], [3], [2, 3, 5], [1, 2, 3, 4, 5]])
def test_blocks_equal_whole_scan_forward_and_final_state(direction, cuts):
    x, lam, gates = make_inputs()
    cuts = [c for c in cuts if c < x.shape[scan_axis(direction)]]
    whole = gspn_scan(x, lam, gates, direction)
    chained, final = scan_in_blocks(x, lam, gates, direction, cuts)
    torch.testing.assert_close(chained, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, last_line(whole, direction), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_blocks_equal_whole_scan_every_gradient(direction):
    x, lam, gates = make_inputs(seed=1)
    cuts = [2, 3, 5]
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for blocks in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, lam, gates)]
        out = scan_in_blocks(*leaves, direction, cuts)[0] if blocks else gspn_scan(*leaves, direction)
        out.backward(upstream)
        grads.append([leaf.grad for leaf in leaves])
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_initial_state_acts_as_a_preceding_line(direction):
    """A state s before the block equals prepending a line with x = s and lam = 1 (which has no predecessor)."""
    x, lam, gates = make_inputs(seed=3)
    axis = scan_axis(direction)
    perp = x.shape[3 - axis]  # H for horizontal scans, W for vertical ones
    state = torch.randn(x.shape[0], perp, x.shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    reverse = direction in ("right_to_left", "bottom_to_top")

    def extend(t, first):
        first = first.unsqueeze(axis)
        return torch.cat([t, first] if reverse else [first, t], dim=axis)

    def drop_extra(t):
        n = t.shape[axis]
        return t.narrow(axis, 0, n - 1) if reverse else t.narrow(axis, 1, n - 1)

    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    s1 = state.clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    h, _ = gspn_scan(x1, lam, gates, direction, initial_state=s1, return_final_state=True)
    h.backward(upstream)

    s2 = state.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    first_gates = torch.zeros_like(gates.select(axis, 0))
    ext = gspn_scan(extend(x2, s2), extend(lam, torch.ones_like(state)), extend(gates, first_gates), direction)
    drop_extra(ext).backward(upstream)

    torch.testing.assert_close(h, drop_extra(ext), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_blocks_cut_at_group_boundaries(direction):
    x, lam, gates = make_inputs(h=9, w=10, seed=6)
    chunk = 4
    length = x.shape[scan_axis(direction)]
    cuts = list(range(chunk, length, chunk))
    whole = gspn_scan(x, lam, gates, direction, chunk)
    state = torch.randn(x.shape[0], x.shape[3 - scan_axis(direction)], x.shape[3], dtype=torch.float64)
    chained, final = scan_in_blocks(x, lam, gates, direction, cuts, chunk_size=chunk, initial_state=state)
    torch.testing.assert_close(chained, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, last_line(whole, direction), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_state_keeps_dtype_and_matches(dtype):
    x, lam, gates = make_inputs(dtype=dtype, seed=7)
    whole = gspn_scan(x, lam, gates, "top_to_bottom")
    chained, final = scan_in_blocks(x, lam, gates, "top_to_bottom", [2, 4])
    assert chained.dtype == final.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(chained.float(), whole.float(), rtol=tol, atol=tol)


def test_wrong_initial_state_shape_says_what_to_pass():
    x, lam, gates = make_inputs()
    with pytest.raises(ValueError, match=r"initial_state .* must be \(B, n_perp, C\) = \(2, 6, 4\)"):
        gspn_scan(x, lam, gates, "left_to_right", initial_state=torch.zeros(2, 7, 4, dtype=x.dtype))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_an_empty_block_passes_the_state_through(direction):
    """A block of no lines (here a repeated cut) is valid: its final state is its initial state, gradients too."""
    x, lam, gates = make_inputs()
    leaves = [t.clone().requires_grad_() for t in (x, lam, gates)]
    axis, state, pieces = scan_axis(direction), None, []
    for block in blocks_in_scan_order(x.shape[scan_axis(direction)], [3, 3], direction):
        index = (slice(None),) * axis + (block,)
        h, state = gspn_scan(*(t[index] for t in leaves), direction, initial_state=state, return_final_state=True)
        pieces.append(h)
    reversed_scan = direction in ("right_to_left", "bottom_to_top")
    chained, final = torch.cat(pieces[::-1] if reversed_scan else pieces, dim=axis), state
    whole = gspn_scan(x, lam, gates, direction)
    torch.testing.assert_close(chained, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, last_line(whole, direction), rtol=1e-12, atol=1e-12)
    chained.sum().backward()
    expected = [t.clone().requires_grad_() for t in (x, lam, gates)]
    gspn_scan(*expected, direction).sum().backward()
    for got, want in zip(leaves, expected, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)
