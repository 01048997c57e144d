"""The reference scan against a naive per-pixel loop written directly from the operator contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gspn_diffusers.ops import DIRECTIONS, gspn_scan, gspn_scan_fused, gspn_scan_reference


def naive_scan(x, lam, gate_logits, direction, chunk_size=None):
    """DESIGN.md section 1, pixel by pixel in image coordinates, in float64 Python arithmetic."""
    b_, height, width, channels = x.shape
    groups = gate_logits.shape[-1]
    per_group = channels // groups
    out = torch.zeros(x.shape, dtype=torch.float64)
    horizontal = direction in ("left_to_right", "right_to_left")
    step = 1 if direction in ("left_to_right", "top_to_bottom") else -1
    scan_len = width if horizontal else height
    perp_len = height if horizontal else width

    def at(t, line, perp):  # line: index along the scan axis, perp: index across it
        return (perp, line) if horizontal else (line, perp)

    def starts_chunk(line):
        if line == (0 if step == 1 else scan_len - 1):
            return True
        if chunk_size is None:
            return False
        return line % chunk_size == 0 if step == 1 else line % chunk_size == chunk_size - 1

    order = range(scan_len) if step == 1 else range(scan_len - 1, -1, -1)
    for b, c in itertools.product(range(b_), range(channels)):
        g = c // per_group
        for line in order:
            for perp in range(perp_len):
                r, j = at(None, line, perp)
                value = float(lam[b, r, j, c]) * float(x[b, r, j, c])
                if not starts_chunk(line):
                    sig = {}
                    for k in range(3):
                        neighbour = perp + k - 1
                        if 0 <= neighbour < perp_len:
                            sig[k] = 1.0 / (1.0 + math.exp(-float(gate_logits[b, r, j, k, g])))
                    total = sum(sig.values())
                    for k, s in sig.items():
                        pr, pj = at(None, line - step, perp + k - 1)
                        value += s / total * float(out[b, pr, pj, c])
                out[b, r, j, c] = value
    return out


def make_inputs(b, h, w, c, groups=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = groups or c
    x = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    lam = torch.rand(b, h, w, c, generator=gen, dtype=torch.float64) + 0.1
    gates = 2.0 * torch.randn(b, h, w, 3, groups, generator=gen, dtype=torch.float64)
    return x.to(dtype), lam.to(dtype), gates.to(dtype)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 4, 4, 2), (1, 1, 6, 2), (1, 6, 1, 2)])
def test_reference_matches_naive_fp64(direction, chunk_size, shape):
    x, lam, gates = make_inputs(*shape)
    expected = naive_scan(x, lam, gates, direction, chunk_size)
    got = gspn_scan_reference(x, lam, gates, direction, chunk_size)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_reference_matches_naive_fp32_and_shared_gates(direction, chunk_size):
    x, lam, gates = make_inputs(2, 5, 7, 4, groups=2, dtype=torch.float32, seed=1)
    expected = naive_scan(x, lam, gates, direction, chunk_size)
    got = gspn_scan(x, lam, gates, direction, chunk_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_inputs_accumulate_in_fp32(dtype, tol):
    x, lam, gates = make_inputs(1, 9, 33, 4, seed=2)
    expected = gspn_scan_reference(x, lam, gates, "right_to_left")
    got = gspn_scan_reference(x.to(dtype), lam.to(dtype), gates.to(dtype), "right_to_left")
    assert got.dtype == dtype
    rel = (got.double() - expected).abs().max() / expected.abs().max()
    assert rel < tol


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck(direction, chunk_size):
    x, lam, gates = make_inputs(1, 3, 4, 2, seed=3)
    inputs = tuple(t.clone().requires_grad_() for t in (x, lam, gates))
    assert torch.autograd.gradcheck(lambda a, b, c: gspn_scan_reference(a, b, c, direction, chunk_size), inputs)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_equals_four_scans_merged(normalize, chunk_size):
    b, h, w, c = 2, 5, 7, 4
    x, lam, _ = make_inputs(b, h, w, c, seed=4)
    gen = torch.Generator().manual_seed(5)
    gates = torch.randn(b, h, w, 4, 3, 2, generator=gen, dtype=torch.float64)
    u = torch.randn(b, h, w, 4, c, generator=gen, dtype=torch.float64)
    merge = torch.randn(4, c, generator=gen, dtype=torch.float64)
    skip = torch.randn(c, generator=gen, dtype=torch.float64)
    expected = skip * x
    for d, direction in enumerate(DIRECTIONS):
        h_d = gspn_scan(x, lam, gates[:, :, :, d], direction, chunk_size)
        if normalize:
            h_d = h_d / gspn_scan(torch.ones_like(x), lam, gates[:, :, :, d], direction, chunk_size)
        expected = expected + merge[d] * u[..., d, :] * h_d
    got = gspn_scan_fused(x, lam, gates, u, merge, skip, chunk_size, normalize=normalize)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fused_shared_u_and_scalar_merge_gradcheck():
    x, lam, _ = make_inputs(1, 3, 4, 2, seed=6)
    gen = torch.Generator().manual_seed(7)
    gates = torch.randn(1, 3, 4, 4, 3, 2, generator=gen, dtype=torch.float64)
    u = torch.randn(1, 3, 4, 2, generator=gen, dtype=torch.float64)
    merge = torch.rand(4, generator=gen, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, lam, gates, u, merge))
    assert torch.autograd.gradcheck(lambda *a: gspn_scan_fused(*a, normalize=True), inputs)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_propagation_is_row_stochastic(direction):
    """With lam*x = 1 only on the first line, every later line of a global scan carries exactly mass H (or W)."""
    b, h, w, c = 1, 6, 9, 3
    x, _, gates = make_inputs(b, h, w, c, seed=8)
    first = {
        "left_to_right": (slice(None), 0),
        "right_to_left": (slice(None), w - 1),
        "top_to_bottom": (0, slice(None)),
        "bottom_to_top": (h - 1, slice(None)),
    }[direction]
    ones_first = torch.zeros_like(x)
    ones_first[(0, *first)] = 1.0
    out = gspn_scan_reference(ones_first, torch.ones_like(x), gates, direction)
    # Row-stochastic weights conserve the mean of a constant line: each output line is all ones.
    torch.testing.assert_close(out, torch.ones_like(out), rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    x, lam, gates = make_inputs(1, 3, 4, 2)
    with pytest.raises(ValueError, match="Unknown GSPN direction"):
        gspn_scan(x, lam, gates, "diagonal")
    with pytest.raises(ValueError, match="channels-last"):
        gspn_scan(x[0], lam, gates, "left_to_right")
    with pytest.raises(ValueError, match="lam must have the shape"):
        gspn_scan(x, lam[:, :2], gates, "left_to_right")
    with pytest.raises(ValueError, match="gate channels G=3 must divide"):
        gspn_scan(x, lam, torch.zeros(1, 3, 4, 3, 3, dtype=x.dtype), "left_to_right")
    with pytest.raises(ValueError, match="chunk_size"):
        gspn_scan(x, lam, gates, "left_to_right", chunk_size=0)
