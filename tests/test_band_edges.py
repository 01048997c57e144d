"""Band edges: the horizontal scans of a band of rows, given the hidden rows just outside it, equal the whole scan
there (DESIGN.md section 1, "Band edges"), and the four directions over bands, combined the way patch parallelism
runs them (horizontal: edge rows; vertical: bands chained by the carried state), equal the whole fused scan, forward
and every gradient.

Gradients are checked by composition: Jacobi sweeps of the bands, each band's edge rows being the neighbouring
bands' outputs of the sweep before (what the stale exchange of patch parallelism does once per step), all in one
autograd graph. Information crosses one column per step, so after as many sweeps as the scan has steps the sweep
is the whole scan as a function of the inputs, and its gradients, which flow through the edge rows into the
neighbouring bands, must equal the whole scan's.
"""

from __future__ import annotations

import pytest
import torch
from scan_blocks import HORIZONTAL, banded_scan, jacobi_banded_scan, patch_parallel_scan, true_edge_rows

from gspn_diffusers.ops import gspn_scan, gspn_scan_fused_reference

FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def make_inputs(b=2, h=6, w=7, c=4, groups=2, dtype=torch.float64, seed=0, directions=None):
    """x, lam, gate logits ((B, H, W, 3, G), or (B, H, W, 4, 3, G) with ``directions=4``)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    lam = torch.rand(b, h, w, c, generator=gen, dtype=torch.float64) + 0.1
    gate_shape = (b, h, w, 3, groups) if directions is None else (b, h, w, directions, 3, groups)
    gates = 2.0 * torch.randn(*gate_shape, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, lam, gates)]


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().clamp_min(1e-2)
    return float((got.detach().double() - expected.detach().double()).abs().max() / scale)


def values_and_grads(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return [out.detach(), *(leaf.grad for leaf in leaves)]


CUTS = [[1], [3], [2, 3, 5], [1, 2, 3, 4, 5]]  # of 6 rows: uneven bands, 1-row bands (both edges given), 6 bands


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("cuts", CUTS, ids=str)
@pytest.mark.parametrize("direction", HORIZONTAL)
def test_bands_with_true_edge_rows_equal_the_whole_scan(direction, cuts, chunk_size):
    x, lam, gates = make_inputs()
    whole = gspn_scan(x, lam, gates, direction, chunk_size)
    banded = banded_scan(x, lam, gates, direction, cuts, chunk_size, lambda r0, r1: true_edge_rows(whole, r0, r1))
    torch.testing.assert_close(banded, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("direction", HORIZONTAL)
def test_bands_in_low_precision(direction, chunk_size, dtype):
    """Odd, non-square; the edge rows are the whole scan's output in the storage dtype."""
    x, lam, gates = make_inputs(b=1, h=7, w=9, c=6, groups=3, dtype=dtype, seed=1)
    whole = gspn_scan(x, lam, gates, direction, chunk_size)
    banded = banded_scan(x, lam, gates, direction, [1, 4], chunk_size, lambda r0, r1: true_edge_rows(whole, r0, r1))
    assert banded.dtype == dtype
    assert rel_error(banded, whole) <= FWD_TOL[dtype]


def test_edges_are_predecessors_not_dropped():
    """A band given edge rows differs from the same band as a whole image (dropped, renormalised), and giving
    (None, None) is exactly today's true-edge scan."""
    x, lam, gates = make_inputs(h=3, seed=2)
    alone = gspn_scan(x, lam, gates, "left_to_right")
    torch.testing.assert_close(
        gspn_scan(x, lam, gates, "left_to_right", edge_rows=(None, None)), alone, rtol=0, atol=0
    )
    above = torch.randn(x.shape[0], x.shape[2], x.shape[3], dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    with_above = gspn_scan(x, lam, gates, "left_to_right", edge_rows=(above, None))
    assert (with_above[:, 0, 1:] - alone[:, 0, 1:]).abs().min() > 0  # the first row sees the row above
    torch.testing.assert_close(with_above[:, :, 0], alone[:, :, 0], rtol=0, atol=0)  # column 0: no predecessor


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_edge_row_weight_is_its_gate_without_renormalisation(chunk_size):
    """One row, one channel: h[j] = lam x + (s0 above[j-1] + s1 h[j-1] + s2 below[j-1]) / (s0 + s1 + s2)."""
    x, lam, gates = make_inputs(b=1, h=1, w=5, c=1, groups=1, seed=4)
    gen = torch.Generator().manual_seed(5)
    above, below = (torch.randn(1, 5, 1, dtype=x.dtype, generator=gen) for _ in range(2))
    h = gspn_scan(x, lam, gates, "right_to_left", chunk_size, edge_rows=(above, below))
    sig = torch.sigmoid(gates[0, 0, :, :, 0])  # (W, 3)
    p = sig / sig.sum(dim=1, keepdim=True)
    expected = (lam * x)[0, 0, :, 0].clone()
    for j in range(3, -1, -1):  # right to left: column j's predecessor is column j + 1
        if chunk_size is not None and j % chunk_size == chunk_size - 1:
            continue  # a group's first line in scan order has no predecessor
        expected[j] += p[j, 0] * above[0, j + 1, 0] + p[j, 1] * expected[j + 1] + p[j, 2] * below[0, j + 1, 0]
    torch.testing.assert_close(h[0, 0, :, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("direction", HORIZONTAL)
def test_every_gradient_through_exchanged_edge_rows(direction, chunk_size, dtype):
    """x, lam, gates and, through the edge rows, the neighbouring bands: the Jacobi sweep's gradients equal the
    whole scan's (7 rows in bands of 2, 1, 3 and 1)."""
    x, lam, gates = make_inputs(b=2, h=7, w=5, c=3, groups=3, dtype=dtype, seed=6)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    cuts = [2, 3, 6]
    swept = values_and_grads(lambda *a: jacobi_banded_scan(*a, direction, cuts, chunk_size), (x, lam, gates), upstream)
    whole = values_and_grads(lambda *a: gspn_scan(*a, direction, chunk_size), (x, lam, gates), upstream)
    for name, got, expected in zip(["h", "grad x", "grad lam", "grad gates"], swept, whole, strict=True):
        tol = (FWD_TOL if name == "h" else GRAD_TOL)[dtype]
        assert rel_error(got, expected) <= tol, name


@pytest.mark.parametrize("direction", HORIZONTAL)
def test_edge_row_gradients_match_finite_differences(direction):
    """The band is affine in its edge rows, so a finite difference along a random direction is exact up to rounding;
    the last column in scan order precedes no step and gets no gradient."""
    x, lam, gates = make_inputs(b=1, h=6, w=6, c=2, groups=1, seed=8)
    r0, r1 = 2, 4
    band_inputs = [t[:, r0:r1] for t in (x, lam, gates)]
    edges = true_edge_rows(gspn_scan(x, lam, gates, direction), r0, r1)
    above, below = (t.clone().requires_grad_() for t in edges)
    upstream = torch.randn(1, r1 - r0, 6, 2, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    band = gspn_scan(*band_inputs, direction, edge_rows=(above, below))
    (band * upstream).sum().backward()
    gen = torch.Generator().manual_seed(10)
    step = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in edges]
    shifted = gspn_scan(*band_inputs, direction, edge_rows=tuple(e + s for e, s in zip(edges, step, strict=True)))
    directional = ((shifted - band.detach()) * upstream).sum()
    torch.testing.assert_close(directional, (above.grad * step[0]).sum() + (below.grad * step[1]).sum())
    assert above.grad.abs().max() > 0 and below.grad.abs().max() > 0
    last = -1 if direction == "left_to_right" else 0
    assert torch.count_nonzero(above.grad[:, last]) == 0 and torch.count_nonzero(below.grad[:, last]) == 0


# ---- The four directions over bands, as patch parallelism combines them ------------------------------------------


@pytest.mark.parametrize(
    "dtype,shape,cuts,chunk_size",
    [
        (torch.float64, (2, 7, 5, 3, 3), [2, 3, 6], None),  # uneven bands and 1-row bands
        (torch.float64, (1, 8, 6, 4, 2), [4], 2),  # chunked: bands cut at group boundaries
        (torch.float64, (1, 3, 2, 1, 1), [1, 2], None),  # tiny: three 1-row bands, two columns
        (torch.float32, (1, 5, 4, 4, 4), [2], None),
        (torch.float16, (1, 5, 4, 4, 4), [1, 3], None),
        (torch.bfloat16, (2, 6, 3, 2, 1), [3], 3),
    ],
    ids=["fp64 uneven", "fp64 chunked", "fp64 tiny", "fp32", "fp16", "bf16 chunked"],
)
def test_four_directions_over_bands_equal_the_fused_scan(dtype, shape, cuts, chunk_size):
    b, h, w, c, g = shape
    x, lam, gates4 = make_inputs(b, h, w, c, g, dtype=dtype, seed=10, directions=4)
    merge = torch.tensor([0.7, -1.3, 0.4, 1.1], dtype=dtype)
    ones = torch.ones_like(x)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).to(dtype)
    banded = values_and_grads(lambda *a: patch_parallel_scan(*a, merge, cuts, chunk_size), (x, lam, gates4), upstream)
    whole = values_and_grads(
        lambda *a: gspn_scan_fused_reference(*a, ones, merge, chunk_size=chunk_size), (x, lam, gates4), upstream
    )
    for name, got, expected in zip(["y", "grad x", "grad lam", "grad gates"], banded, whole, strict=True):
        tol = (FWD_TOL if name == "y" else GRAD_TOL)[dtype]
        assert rel_error(got, expected) <= 2 * tol, name


# ---- Arguments ---------------------------------------------------------------------------------------------------


def test_bad_edge_rows_say_what_to_pass():
    x, lam, gates = make_inputs()
    row = torch.zeros(2, 7, 4, dtype=x.dtype)
    with pytest.raises(ValueError, match="edge_rows is for the horizontal scans.*initial_state"):
        gspn_scan(x, lam, gates, "top_to_bottom", edge_rows=(row, None))
    with pytest.raises(ValueError, match=r"edge_rows below .* must be None or \(B, W, C\) = \(2, 7, 4\)"):
        gspn_scan(x, lam, gates, "left_to_right", edge_rows=(row, torch.zeros(2, 6, 4, dtype=x.dtype)))
    with pytest.raises(ValueError, match="must be a pair"):
        gspn_scan(x, lam, gates, "left_to_right", edge_rows=row)
    with pytest.raises(ValueError, match="cannot be combined"):
        gspn_scan(
            x, lam, gates, "left_to_right", initial_state=torch.zeros(2, 6, 4, dtype=x.dtype), edge_rows=(row, row)
        )
    with pytest.raises(ValueError, match="floating-point"):
        gspn_scan(x, lam, gates, "right_to_left", edge_rows=(None, row.long()))
