"""GSPN_DIFFUSERS_BACKEND=emulation: the kernel's own source, compiled for the host, behind the public ops.

This is the whole compiled path a GPU runs (custom ops, autograd, policy and fallbacks, torch.compile), with the
emulated kernels in place of the CUDA ones. The kernels themselves are tested in test_cuda_emulation.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from scan_blocks import HORIZONTAL, banded_scan, jacobi_banded_scan, patch_parallel_scan, true_edge_rows

from gspn_diffusers import convert
from gspn_diffusers.ops import (
    DIRECTIONS,
    gspn_scan,
    gspn_scan_fused,
    gspn_scan_fused_reference,
    gspn_scan_reference,
    policy,
)
from gspn_diffusers.tiny import tiny_pipeline

TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


@pytest.fixture
def use_emulation(emulation, monkeypatch):
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "emulation")
    monkeypatch.setattr(policy, "_warned", set())
    return emulation


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-2)
    return float((got.double() - expected.double()).abs().max() / scale)


def fused_inputs(b=2, h=5, w=6, c=8, g=4, dtype=torch.float32, seed=0, skip=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, low=-1.0, high=1.0):
        return (torch.rand(*shape, generator=gen) * (high - low) + low).to(dtype)

    return [
        rand(b, h, w, c),
        rand(b, h, w, c, low=0.1, high=1.0),
        rand(b, h, w, 4, 3, g, low=-3, high=3),
        rand(b, h, w, c),
        torch.rand(4, c, generator=gen),  # fp32 parameters beside low-precision activations, as the processor has
        torch.rand(c, generator=gen) if skip else None,
    ]


def grads_of(fn, inputs, upstream):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return out.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size,normalize,skip", [(None, True, True), (3, False, False)])
def test_fused_op_matches_reference_forward_and_gradients(use_emulation, dtype, chunk_size, normalize, skip):
    inputs = fused_inputs(dtype=dtype, skip=skip)
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got, got_grads = grads_of(lambda *a: gspn_scan_fused(*a, chunk_size, normalize), inputs, upstream)
    ref_inputs = [None if t is None else t.double() for t in inputs]
    expected, ref_grads = grads_of(
        lambda *a: gspn_scan_fused_reference(*a, chunk_size, normalize), ref_inputs, upstream.double()
    )
    assert got.dtype == dtype
    assert rel_error(got, expected) <= TOL[dtype]
    for name, g, r in zip(["x", "lam", "gates", "u", "merge", "skip"], got_grads, ref_grads, strict=True):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == inputs[["x", "lam", "gates", "u", "merge", "skip"].index(name)].dtype, name
        assert rel_error(g, r) <= 3 * TOL[dtype], name


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_scan_with_carried_state_matches_reference(use_emulation, direction):
    gen = torch.Generator().manual_seed(2)
    x, lam = torch.randn(2, 5, 7, 6, generator=gen), torch.rand(2, 5, 7, 6, generator=gen) + 0.1
    gates = 2 * torch.randn(2, 5, 7, 3, 3, generator=gen)
    perp = 5 if direction in ("left_to_right", "right_to_left") else 7
    state = torch.randn(2, perp, 6, generator=gen)
    upstream, upstream_final = torch.randn(x.shape, generator=gen), torch.randn(state.shape, generator=gen)

    def run(fn, *leaves):
        h, final = fn(*leaves[:3], direction, None, initial_state=leaves[3], return_final_state=True)
        return (h * upstream).sum() + (final * upstream_final).sum(), h, final

    results = []
    for fn, dtype in ((gspn_scan, torch.float32), (gspn_scan_reference, torch.float64)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, lam, gates, state)]
        loss, h, final = run(fn, *leaves)
        loss.backward()
        results.append([h.detach(), final.detach(), *(leaf.grad for leaf in leaves)])
    for name, got, expected in zip(["h", "final", "x", "lam", "gates", "state"], *results, strict=True):
        assert rel_error(got, expected) <= 3 * TOL[torch.float32], name


def test_float64_runs_the_reference_with_one_warning(use_emulation):
    inputs = [None if t is None else t.double() for t in fused_inputs()]
    with pytest.warns(UserWarning, match="not torch.float64; running the PyTorch reference"):
        out = gspn_scan_fused(*inputs, None, True)
    torch.testing.assert_close(out, gspn_scan_fused_reference(*inputs, None, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call warns no more
        gspn_scan_fused(*inputs, None, True)


def test_mixed_dtypes_say_why(use_emulation):
    inputs = fused_inputs()
    inputs[1] = inputs[1].to(torch.bfloat16)
    with pytest.warns(UserWarning, match="one dtype on one device .* torch.bfloat16"):
        out = gspn_scan_fused(*inputs, None, True)
    torch.testing.assert_close(out, gspn_scan_fused_reference(*inputs, None, True))


def test_emulation_refuses_cuda_tensors_clearly(monkeypatch):
    monkeypatch.setenv("GSPN_DIFFUSERS_BACKEND", "emulation")
    from gspn_diffusers.ops.backend import resolve_backend

    meta_cuda = torch.empty(1, device="meta")  # no GPU here: check the message on a fake CUDA tensor instead
    assert not meta_cuda.is_cuda
    with pytest.raises(ValueError, match="emulation runs the kernel's source on the CPU"):
        resolve_backend(type("CudaLike", (), {"is_cuda": True, "device": "cuda:0"})())


def test_backward_falls_back_where_the_line_is_too_long(use_emulation):
    """A line that fits the forward's shared memory but not the backward's: gradients come from the reference."""
    use_emulation.set_shared_memory_per_block(2000)
    try:
        inputs = fused_inputs(b=1, h=40, w=1, c=1, g=1)
        upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3))
        with pytest.warns(UserWarning, match="does not fit in shared memory"):
            _, got = grads_of(lambda *a: gspn_scan_fused(*a, None, True), inputs, upstream)
    finally:
        use_emulation.set_shared_memory_per_block(227 * 1024)
    _, expected = grads_of(lambda *a: gspn_scan_fused_reference(*a, None, True), inputs, upstream)
    for g, r in zip(got, expected, strict=True):
        assert rel_error(g, r) <= TOL[torch.float32]


def test_torch_compile_fullgraph_through_a_converted_unet(use_emulation):
    """The custom ops keep torch.compile(fullgraph=True) whole: one graph holding every GSPN layer as one op, and
    the same output and GSPN gradients as eager."""
    from torch._dynamo.backends.registry import lookup_backend

    pipe = tiny_pipeline("sd15")
    convert(pipe)
    unet = pipe.unet
    gen = torch.Generator().manual_seed(4)
    sample = torch.randn(1, unet.config.in_channels, 8, 16, generator=gen)
    context = torch.randn(1, 7, unet.config.cross_attention_dim, generator=gen)
    gspn = [p for name, p in unet.named_parameters() if ".gspn." in name]

    def loss_and_grads(model):
        unet.zero_grad()
        out = model(sample, 10, context).sample
        (out * out).mean().backward()
        return out.detach(), [p.grad.clone() for p in gspn]

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    eager, eager_grads = loss_and_grads(unet)
    compiled, compiled_grads = loss_and_grads(torch.compile(unet, fullgraph=True, backend=recording_backend))
    torch._dynamo.reset()
    assert len(graphs) == 1
    ops = [n for n in graphs[0].graph.nodes if n.target is torch.ops.gspn_diffusers.scan_fused.default]
    assert len(ops) == sum(name.endswith("attn1") for name, _ in unet.named_modules()) > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused,normalize,chunk_size", [(True, True, None), (True, False, 3), (False, False, None)])
def test_self_check_passes_on_the_emulated_kernel(use_emulation, fused, normalize, chunk_size):
    """The auto policy's self-check (run once per dtype and mode on a GPU), here against the emulated kernels;
    the single-direction case includes the carried state that line-block inference uses."""
    assert policy.self_check(torch.device("cpu"), torch.float32, fused, normalize, chunk_size) == ""


def test_self_check_reports_a_wrong_carried_state(use_emulation, monkeypatch):
    """A reference whose final state is off by 1 % must fail the check: the state is compared, not ignored."""

    def off_final_state(*args, **kwargs):
        out = gspn_scan_reference(*args, **kwargs)
        return (out[0], out[1] * 1.01) if isinstance(out, tuple) else out

    monkeypatch.setattr(policy, "gspn_scan_reference", off_final_state)
    problem = policy.self_check(torch.device("cpu"), torch.float32, False, False, None)
    assert "output, final state and band output differs" in problem


def test_self_check_reports_wrong_band_edges(use_emulation, monkeypatch):
    """A reference that ignores the band's edge rows must fail the check: the band scan is compared too."""

    def without_edges(*args, edge_rows=None, **kwargs):
        return gspn_scan_reference(*args, **kwargs)

    monkeypatch.setattr(policy, "gspn_scan_reference", without_edges)
    problem = policy.self_check(torch.device("cpu"), torch.float32, False, False, None)
    assert "band output differs" in problem


# ---- Band edges through the public op -------------------------------------------------------------------------


def band_inputs(b=2, h=7, w=5, c=8, g=4, dtype=torch.float32, seed=5, directions=None):
    gen = torch.Generator().manual_seed(seed)
    gate_shape = (b, h, w, 3, g) if directions is None else (b, h, w, directions, 3, g)
    x, lam = torch.randn(b, h, w, c, generator=gen), torch.rand(b, h, w, c, generator=gen) + 0.1
    return [t.to(dtype) for t in (x, lam, 2 * torch.randn(*gate_shape, generator=gen))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("direction", HORIZONTAL)
def test_bands_run_on_the_kernel_and_equal_the_whole_scan(use_emulation, direction, chunk_size, dtype):
    """The kernel itself (no warning: no fallback) takes the edge rows: bands fed the whole scan's outside rows
    equal it; Jacobi sweeps through the edge rows give the whole scan's gradients (the edge rows' own included)."""
    x, lam, gates = band_inputs(dtype=dtype)
    cuts = [2, 3, 6]  # bands of 2, 1, 3 and 1 rows
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = gspn_scan(x, lam, gates, direction, chunk_size)
        banded = banded_scan(x, lam, gates, direction, cuts, chunk_size, lambda r0, r1: true_edge_rows(whole, r0, r1))
        swept, swept_grads = grads_of(
            lambda *a: jacobi_banded_scan(*a, direction, cuts, chunk_size), [x, lam, gates], upstream
        )
    leaves = [t.double() for t in (x, lam, gates)]
    expected, ref_grads = grads_of(
        lambda *a: gspn_scan_reference(*a, direction, chunk_size), leaves, upstream.double()
    )
    assert rel_error(banded, whole) <= TOL[dtype] and rel_error(banded, expected) <= TOL[dtype]
    assert rel_error(swept, expected) <= TOL[dtype]
    for name, got, ref in zip(["x", "lam", "gates"], swept_grads, ref_grads, strict=True):
        assert rel_error(got, ref) <= 3 * TOL[dtype], name


def test_four_directions_over_bands_on_the_kernel(use_emulation):
    """Patch parallelism's composition (horizontal: edge rows; vertical: carried state) on the kernel equals the
    fused reference, forward and every gradient."""
    x, lam, gates4 = band_inputs(b=1, h=6, w=4, c=4, g=4, seed=7, directions=4)
    merge = torch.tensor([0.7, -1.3, 0.4, 1.1])
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, got_grads = grads_of(lambda *a: patch_parallel_scan(*a, merge, [1, 4], None), [x, lam, gates4], upstream)
    ones = torch.ones_like(x, dtype=torch.float64)
    expected, ref_grads = grads_of(
        lambda *a: gspn_scan_fused_reference(*a, ones, merge.double()),
        [t.double() for t in (x, lam, gates4)],
        upstream.double(),
    )
    assert rel_error(got, expected) <= TOL[torch.float32]
    for name, g, r in zip(["x", "lam", "gates"], got_grads, ref_grads, strict=True):
        assert rel_error(g, r) <= 3 * TOL[torch.float32], name


def test_edge_rows_in_another_dtype_run_the_reference_with_one_warning(use_emulation):
    x, lam, gates = band_inputs()
    above = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="one dtype on one device .* torch.float64"):
        out = gspn_scan(x, lam, gates, "left_to_right", edge_rows=(above, None))
    torch.testing.assert_close(out, gspn_scan_reference(x, lam, gates, "left_to_right", edge_rows=(above, None)))


def test_torch_compile_sees_one_op_per_band_scan(use_emulation):
    """The edge rows go through the custom op's schema and fake implementation: fullgraph compiles, one scan op,
    the same output and gradients (edge rows included) as eager."""
    from torch._dynamo.backends.registry import lookup_backend

    x, lam, gates = band_inputs(b=1, h=3, w=4, c=4, g=2)
    edges = [torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def band(x, lam, gates, above, below):
        return gspn_scan(x, lam, gates, "right_to_left", None, edge_rows=(above, below))

    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    eager = grads_of(band, [x, lam, gates, *edges], upstream)
    compiled = grads_of(
        torch.compile(band, fullgraph=True, backend=recording_backend), [x, lam, gates, *edges], upstream
    )
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"].count(
        torch.ops.gspn_diffusers.scan.default
    ) == 1
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    for got, expected in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
