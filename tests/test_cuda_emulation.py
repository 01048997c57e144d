"""The CUDA kernels' own source, run on the CPU by the host emulation (csrc/emulation/), against the reference.

No GPU needed: ``scripts/check_cuda_build.py`` (run by CI before pytest) compiles the same kernel header with the
host compiler, every CUDA thread a std::thread, ``__syncthreads`` a barrier. This checks the index math, the
direction geometry, the chunk starts, the checkpointed reverse sweep, the gate/merge/skip gradients and the
binding's handling of strides and dtypes. Speed and true GPU behaviour are for tests/test_cuda_kernel.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from scan_blocks import (
    HORIZONTAL,
    band_case,
    band_reference,
    band_scan,
    chained_scan,
    reference_with_state,
    scan_axis,
    state_case,
)

from gspn_diffusers.ops import DIRECTIONS, cuda_build, gspn_scan_fused_reference, gspn_scan_reference
from gspn_diffusers.ops.cuda import EMULATION_NAME

BUILD = Path(__file__).resolve().parents[1] / "build" / "cuda_check" / "emulation"
FWD_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(scope="module")
def emu():
    built = sorted(BUILD.glob(f"{EMULATION_NAME}*.so"))
    if not built:
        pytest.skip("the host emulation is not built (python scripts/check_cuda_build.py builds it; needs nvcc)")
    spec = importlib.util.spec_from_file_location(EMULATION_NAME, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-2)  # gradients that are ~0 analytically
    return float((got.double() - expected.double()).abs().max() / scale)


def rand(gen, *shape, low=-1.0, high=1.0):
    return torch.rand(*shape, generator=gen) * (high - low) + low


def fused_case(b, h, w, c, g, u_per_direction=True, merge_per_channel=True, skip=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": rand(gen, b, h, w, c),
        "lam": rand(gen, b, h, w, c, low=0.1, high=1.0),
        "gates": rand(gen, b, h, w, 4, 3, g, low=-3.0, high=3.0),
        "u": rand(gen, b, h, w, 4, c) if u_per_direction else rand(gen, b, h, w, c),
        "merge": rand(gen, 4, c) if merge_per_channel else rand(gen, 4),
        "skip": rand(gen, c) if skip else None,
    }


def reference_fused_grads(case, grad_y, chunk_size, normalize):
    leaves = {k: None if v is None else v.double().requires_grad_() for k, v in case.items()}
    out = gspn_scan_fused_reference(*leaves.values(), chunk_size=chunk_size, normalize=normalize)
    out.backward(grad_y.double())
    return out.detach(), {k: None if v is None else v.grad for k, v in leaves.items()}


def check_fused(emu, case, chunk_size, normalize, dtype=torch.float32, tile=0, float_params=False):
    inputs = {k: None if v is None else v.to(dtype) for k, v in case.items()}
    if float_params:  # fp32 merge/skip parameters beside low-precision activations
        inputs["merge"], inputs["skip"] = case["merge"].float(), case["skip"].float()
    grad_y = torch.randn(case["x"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, grads = reference_fused_grads(
        {k: None if v is None else v.float() for k, v in inputs.items()}, grad_y.float(), chunk_size, normalize
    )
    chunk = chunk_size or 0
    args = (*inputs.values(), chunk, normalize, 1e-6, tile)
    y = emu.fused_forward(*args)
    assert y.dtype == dtype and y.shape == expected.shape
    errors = {"y": rel_error(y, expected)}
    got = emu.fused_backward(grad_y, *args)
    for name, value in zip(inputs, got, strict=True):
        if grads[name] is None:
            assert value is None, name
            continue
        assert value.shape == grads[name].shape and value.dtype == inputs[name].dtype, name
        errors[f"grad {name}"] = rel_error(value, grads[name])
    bad = {k: e for k, e in errors.items() if not e <= (FWD_TOL if k == "y" else GRAD_TOL)[dtype]}
    assert not bad, f"emulated kernel differs from the reference: {bad} (all: {errors})"


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_matches_reference(emu, chunk_size, normalize):
    # 10 channels with tile 4: three blocks per batch item, the last one partial.
    check_fused(emu, fused_case(2, 5, 7, 10, 10), chunk_size, normalize, tile=4)


@pytest.mark.parametrize(
    "variant", ["shared u, scalar merge, no skip", "shared gate channels", "1x1", "tall", "long scan, sqrt segments"]
)
def test_fused_variants(emu, variant):
    if variant == "shared u, scalar merge, no skip":
        case = fused_case(1, 4, 6, 4, 4, u_per_direction=False, merge_per_channel=False, skip=False)
    elif variant == "shared gate channels":
        case = fused_case(2, 6, 5, 8, 2)
    elif variant == "1x1":
        case = fused_case(1, 1, 1, 3, 3)
    elif variant == "tall":
        case = fused_case(1, 13, 2, 2, 1)
    else:  # 30 lines: segments of 6, so the checkpoints and segment recomputation are exercised
        case = fused_case(1, 3, 30, 2, 2)
    check_fused(emu, case, 4, True)


def test_more_elements_than_threads(emu):
    """150 rows x 16 channels = 2400 elements per line for 512 threads: several unrolled passes per thread (v1, the
    line is too long for v2's one pack per thread)."""
    check_fused(emu, fused_case(1, 150, 2, 16, 16), 7, True, tile=16)
    assert emu.last_forward_split()["kernel"] == "v1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("gates", ["per channel", "pairs"])
def test_every_tile_width(emu, dtype, tile, gates):
    """Every tile GSPN_DIFFUSERS_CUDA_TILE allows, forward and backward: 16-byte packs where the tile holds one
    (v2, vector loads), single channels below (v2), gates per channel (vector) or shared by two channels."""
    case = fused_case(1, 5, 7, 16, 16 if gates == "per channel" else 8, u_per_direction=False)
    check_fused(emu, case, None, True, dtype=dtype, tile=tile)
    split = emu.last_forward_split()
    full = 16 // torch.tensor([], dtype=dtype).element_size()
    assert split["kernel"] == "v2" and split["tile"] == tile
    assert split["pack"] == (full if tile % full == 0 else 1)
    assert split["vector_x"] and split["vector_u"] and split["vector_gate"] == (gates == "per channel")


@pytest.mark.parametrize(
    "shape,dtype,kernel,pack",
    [
        ((2, 6, 5, 16), torch.bfloat16, "v2", 8),  # 16-byte packs of 8 channels
        ((1, 4, 9, 24), torch.float32, "v2", 4),  # 16-byte packs of 4 channels; a partial last tile
        ((1, 7, 3, 12), torch.bfloat16, "v2", 1),  # 12 channels: no 8-channel pack divides them
        ((1, 1100, 1, 8), torch.bfloat16, "v1", 0),  # a 1100-row line: no v2 split holds it, v1 streams it
    ],
    ids=["bf16 packs", "fp32 packs", "single channels", "long line"],
)
def test_forward_kernel_choice(emu, shape, dtype, kernel, pack):
    """The heuristic work split (no tile override) picks the kernel and pack expected; its forward matches the
    reference (the gradients of both kernels' splits are covered above)."""
    b, h, w, c = shape
    case = {k: v.to(dtype) for k, v in fused_case(b, h, w, c, c).items()}
    y = emu.fused_forward(*case.values(), 3, False, 1e-6, 0)
    split = emu.last_forward_split()
    expected = gspn_scan_fused_reference(*(v.double() for v in case.values()), chunk_size=3)
    assert rel_error(y, expected) <= FWD_TOL[dtype]
    assert (split["kernel"], split["pack"]) == (kernel, pack)


@pytest.fixture
def direction_split(emu):
    """Set the fused forward's direction split (1: one block per direction, 0: never), back to the model after."""
    yield emu.set_direction_split
    emu.set_direction_split(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "variant", ["shared u, skip", "per-direction u, scalar merge, no skip", "shared gates, chunked, normalised"]
)
def test_direction_split_equals_the_fused_kernel(emu, direction_split, dtype, variant):
    """One block per direction + the merge pass gives bitwise the y of one block walking all four (same order of
    fp32 sums), and matches the reference; the gradients do not depend on it (the backward is shared)."""
    if variant == "shared u, skip":
        case, chunk, normalize = fused_case(2, 5, 7, 16, 16, u_per_direction=False), None, False
    elif variant == "per-direction u, scalar merge, no skip":
        case, chunk, normalize = fused_case(1, 6, 3, 8, 8, merge_per_channel=False, skip=False), None, True
    else:
        case, chunk, normalize = fused_case(2, 7, 5, 16, 4), 2, True
    outputs = []
    for mode in (1, 0):
        direction_split(mode)
        check_fused(emu, case, chunk, normalize, dtype=dtype)
        assert emu.last_forward_split()["split_directions"] == (mode == 1)
        inputs = [None if v is None else v.to(dtype) for v in case.values()]
        outputs.append(emu.fused_forward(*inputs, chunk or 0, normalize, 1e-6, 0))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_direction_split_follows_the_model(emu):
    """Latency-bound small latents split the directions over blocks; large ones do not (the merge pass and the
    planes' traffic would cost more than the shorter walk saves)."""

    def plan(h, w, c):
        e = lambda *shape: torch.empty(1, dtype=torch.bfloat16).expand(*shape)  # noqa: E731 - no memory
        return emu.plan_fused_forward(e(2, h, w, c), e(2, h, w, c), e(2, h, w, 4, 3, c), e(2, h, w, c), e(4, c))

    assert plan(64, 64, 640)["split_directions"]
    assert not plan(256, 256, 320)["split_directions"]
    assert plan(1024, 512, 640)["kernel"] == "v1"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("float_params", [False, True])
def test_fused_low_precision(emu, dtype, float_params):
    case = fused_case(1, 4, 5, 16, 16)
    check_fused(emu, case, None, True, dtype=dtype, float_params=float_params)


def test_strided_scalar_merge(emu):
    case = fused_case(1, 3, 4, 4, 4)
    case["merge"] = torch.arange(8.0)[::2] / 8  # (4,) with stride 2
    check_fused(emu, case, None, False)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk_size,tile", [(None, 2), (2, 1)])
def test_single_direction_matches_reference(emu, direction, chunk_size, tile):
    gen = torch.Generator().manual_seed(3)
    x, lam = rand(gen, 2, 6, 9, 6), rand(gen, 2, 6, 9, 6, low=0.1, high=1.0)
    gates = rand(gen, 2, 6, 9, 3, 3, low=-3.0, high=3.0)
    grad_h = torch.randn(2, 6, 9, 6, generator=gen)
    d = DIRECTIONS.index(direction)
    h, final_state = emu.scan_forward(x, lam, gates, d, chunk_size or 0, tile=tile)
    assert final_state is None  # not requested
    leaves = [t.double().requires_grad_() for t in (x, lam, gates)]
    expected = gspn_scan_reference(*leaves, direction, chunk_size)
    expected.backward(grad_h.double())
    assert rel_error(h, expected.detach()) <= FWD_TOL[torch.float32]
    *grads, grad_initial, grad_above, grad_below = emu.scan_backward(
        grad_h, x, lam, gates, d, chunk_size or 0, tile=tile
    )
    assert grad_initial is None and grad_above is None and grad_below is None  # no initial state, no edge rows
    for got, leaf in zip(grads, leaves, strict=True):
        assert rel_error(got, leaf.grad) <= GRAD_TOL[torch.float32]


def test_compiled_archs_follow_nvcc():
    """The default arch list is what nvcc targets from sm_70 to sm_90 (CUDA 13 has no sm_70), sorted, and the binding
    learns it through GSPN_COMPILED_ARCHS; the emulation module has no GPU code."""
    assert cuda_build.default_archs({"7.5", "8.0", "9.0", "10.0"}) == "7.5;8.0;9.0"
    assert cuda_build.default_archs({"7.0", "7.5", "8.0", "8.6", "8.9", "9.0"}) == "7.0;7.5;8.0;8.6;8.9;9.0"
    cxx, nvcc = cuda_build.compile_flags("9.0;7.5;8.0")
    assert "-DGSPN_COMPILED_ARCHS=75,80,90" in cxx
    assert nvcc[-1] == "-gencode=arch=compute_90,code=compute_90"  # PTX of the newest, not of the last listed
    available = cuda_build.nvcc_archs()
    if available is not None:
        assert set(cuda_build.default_archs().split(";")) <= available


def test_emulation_exports_compiled_archs(emu):
    assert emu.compiled_archs() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_are_read_in_place(emu, dtype):
    """Channel slices (strided, or misaligned for a 16-byte load), swapped H/W memory order and an expanded u give
    the same result as contiguous copies: the arrays a pack cannot load as one vector are read channel by channel."""
    case = {k: v.to(dtype) for k, v in fused_case(1, 5, 6, 8, 8, u_per_direction=False).items()}
    gen = torch.Generator().manual_seed(4)
    wide_x = rand(gen, 1, 5, 6, 16).to(dtype)
    wide_x[..., ::2] = case["x"]
    swapped_lam = case["lam"].transpose(1, 2).contiguous().transpose(1, 2)
    wide_u = rand(gen, 1, 5, 6, 16).to(dtype)
    wide_u[..., 8:] = case["u"]
    u4 = wide_u[..., 8:].unsqueeze(3).expand(1, 5, 6, 4, 8)  # channel slice, stride 0 over the directions
    wide_gates = rand(gen, 1, 5, 6, 4, 3, 9).to(dtype)
    wide_gates[..., 1:] = case["gates"]  # starts one element past a 16-byte boundary
    args = (case["merge"], case["skip"], 0, True, 1e-6, 0)
    strided = emu.fused_forward(wide_x[..., ::2], swapped_lam, wide_gates[..., 1:], u4, *args)
    split = emu.last_forward_split()
    assert split["kernel"] == "v2" and split["pack"] > 1 and not split["vector_x"] and not split["vector_gate"]
    assert split["vector_lam"] and split["vector_u"]
    dense = emu.fused_forward(case["x"], case["lam"], case["gates"], case["u"], *args)
    assert emu.last_forward_split()["vector_x"] and emu.last_forward_split()["vector_gate"]
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors(emu):
    case = fused_case(1, 3, 4, 4, 4)
    args = list(case.values())
    with pytest.raises(RuntimeError, match="lam must have shape"):
        emu.fused_forward(args[0], args[1][:, :2], *args[2:], 0, False, 1e-6, 0)
    with pytest.raises(RuntimeError, match="has dtype"):
        emu.fused_forward(args[0], args[1].double(), *args[2:], 0, False, 1e-6, 0)
    with pytest.raises(RuntimeError, match="gate channels 3 must divide"):
        emu.scan_forward(args[0], args[1], torch.zeros(1, 3, 4, 3, 3), 0, 0)
    with pytest.raises(RuntimeError, match="tile must be a power of two"):
        emu.scan_forward(args[0], args[1], args[2][:, :, :, 0], 0, 0, tile=3)
    long = torch.ones(1, 30000, 1, 1)  # a 30000-position line needs 240 KB of shared memory
    with pytest.raises(RuntimeError, match="does not fit in shared memory.*GSPN_DIFFUSERS_BACKEND=reference"):
        emu.scan_forward(long, long, torch.zeros(1, 30000, 1, 3, 1), 0, 0)
    # Carried state: (B, n_perp, C) with n_perp = W for a vertical scan, in x's dtype.
    with pytest.raises(RuntimeError, match=r"initial_state must be \(B, n_perp, C\) = \(1, 4, 4\)"):
        emu.scan_forward(args[0], args[1], args[2][:, :, :, 0], 2, 0, torch.zeros(1, 3, 4))
    with pytest.raises(RuntimeError, match="initial_state has dtype"):
        emu.scan_forward(args[0], args[1], args[2][:, :, :, 0], 0, 0, torch.zeros(1, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_final_state must be"):
        emu.scan_backward(args[0], args[0], args[1], args[2][:, :, :, 0], 0, 0, None, torch.zeros(1, 4, 4))
    # Band edges: (B, W, C), horizontal scans only, never beside a carried state.
    row = torch.zeros(1, 4, 4)
    with pytest.raises(RuntimeError, match=r"edge_below must be \(B, W, C\) = \(1, 4, 4\)"):
        emu.scan_forward(args[0], args[1], args[2][:, :, :, 0], 0, 0, edge_below=torch.zeros(1, 3, 4))
    with pytest.raises(RuntimeError, match="edge_above is for the horizontal scans"):
        emu.scan_forward(args[0], args[1], args[2][:, :, :, 0], 2, 0, edge_above=row)
    with pytest.raises(RuntimeError, match="edge_above and initial_state cannot be combined"):
        emu.scan_backward(args[0], args[0], args[1], args[2][:, :, :, 0], 1, 0, torch.zeros(1, 3, 4), edge_above=row)
    with pytest.raises(RuntimeError, match="edge_below has dtype"):
        emu.scan_forward(args[0], args[1], args[2][:, :, :, 0], 1, 0, edge_below=row.double())


# ---- Carried state of the single-direction op ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_carried_state_matches_reference(emu, direction, dtype):
    """Blocks chained by the carried state = the whole scan = the reference, forward and every gradient."""
    inputs, grad_h, initial, grad_final = state_case(direction, dtype)
    cuts = [1, 3] if scan_axis(direction) == 1 else [2, 3, 6]
    h, final, grads, grad_initial = chained_scan(emu, inputs, grad_h, direction, cuts, 0, initial, grad_final)
    d = DIRECTIONS.index(direction)
    whole_h, whole_final = emu.scan_forward(*inputs, d, 0, initial, True)
    *whole_grads, whole_initial, _, _ = emu.scan_backward(grad_h, *inputs, d, 0, initial, grad_final)
    ref_h, ref_final, ref_grads, ref_initial = reference_with_state(
        inputs, grad_h, direction, None, initial, grad_final
    )
    assert final.dtype == dtype and final.shape == initial.shape and final.is_contiguous()
    assert grad_initial.dtype == dtype and grad_initial.shape == initial.shape
    fwd, bwd = FWD_TOL[dtype], GRAD_TOL[dtype]
    errors = {
        "h": (rel_error(h, ref_h), rel_error(whole_h, ref_h), fwd),
        "final": (rel_error(final, ref_final), rel_error(whole_final, ref_final), fwd),
        "grad initial": (rel_error(grad_initial, ref_initial), rel_error(whole_initial, ref_initial), bwd),
    }
    for name, got, whole, ref in zip(("grad x", "grad lam", "grad gates"), grads, whole_grads, ref_grads, strict=True):
        errors[name] = (rel_error(got, ref), rel_error(whole, ref), bwd)
    bad = {k: v for k, v in errors.items() if not max(v[:2]) <= v[2]}
    assert not bad, f"(chained, whole) vs reference: {bad}"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_carried_state_chunked_blocks(emu, direction):
    """Chunked scan cut at group boundaries: the chain equals the whole scan; the first line of every block starts
    a group, so initial_state is unused and gets a zero gradient."""
    inputs, grad_h, initial, grad_final = state_case(direction, torch.float32, seed=1)
    cuts = [2] if scan_axis(direction) == 1 else [2, 6]  # multiples of the chunk, in image coordinates
    h, final, grads, grad_initial = chained_scan(emu, inputs, grad_h, direction, cuts, 2, initial, grad_final)
    leaves = [t.double().requires_grad_() for t in inputs]
    expected = gspn_scan_reference(*leaves, direction, 2)
    last = expected.select(scan_axis(direction), 0 if direction in ("right_to_left", "bottom_to_top") else -1)
    (expected * grad_h.double()).sum().add((last * grad_final.double()).sum()).backward()
    assert rel_error(h, expected.detach()) <= FWD_TOL[torch.float32]
    assert rel_error(final, last.detach()) <= FWD_TOL[torch.float32]
    for got, leaf in zip(grads, leaves, strict=True):
        assert rel_error(got, leaf.grad) <= GRAD_TOL[torch.float32]
    torch.testing.assert_close(grad_initial, torch.zeros_like(grad_initial), rtol=0, atol=0)


@pytest.mark.parametrize("tile", [1, 2, 4, 8, 16])
def test_carried_state_every_tile(emu, tile):
    """Every tile width the override allows: one carried block boundary, forward and backward."""
    inputs, grad_h, initial, grad_final = state_case("bottom_to_top", torch.float32, seed=2)
    h, final, grads, grad_initial = chained_scan(
        emu, inputs, grad_h, "bottom_to_top", [3], 0, initial, grad_final, tile=tile
    )
    ref_h, ref_final, ref_grads, ref_initial = reference_with_state(
        inputs, grad_h, "bottom_to_top", None, initial, grad_final
    )
    assert rel_error(h, ref_h) <= FWD_TOL[torch.float32] and rel_error(final, ref_final) <= FWD_TOL[torch.float32]
    for got, ref in zip([*grads, grad_initial], [*ref_grads, ref_initial], strict=True):
        assert rel_error(got, ref) <= GRAD_TOL[torch.float32]


def test_carried_state_on_the_v1_forward(emu):
    """A 70-row line with a 16-channel tile is too long for v2: the v1 forward carries the state as well."""
    inputs, grad_h, initial, grad_final = state_case("left_to_right", torch.float32, seed=3, shape=(1, 70, 4, 2, 1))
    h, final, grads, grad_initial = chained_scan(
        emu, inputs, grad_h, "left_to_right", [1], 0, initial, grad_final, tile=16
    )
    assert emu.last_forward_split()["kernel"] == "v1"
    ref_h, ref_final, ref_grads, ref_initial = reference_with_state(
        inputs, grad_h, "left_to_right", None, initial, grad_final
    )
    assert rel_error(h, ref_h) <= FWD_TOL[torch.float32] and rel_error(final, ref_final) <= FWD_TOL[torch.float32]
    for got, ref in zip([*grads, grad_initial], [*ref_grads, ref_initial], strict=True):
        assert rel_error(got, ref) <= GRAD_TOL[torch.float32]


def test_carried_state_through_an_empty_block(emu):
    """A block of zero lines passes the state (and its gradient) through unchanged."""
    x = torch.zeros(1, 3, 0, 2)
    state = torch.randn(1, 3, 2)
    h, final = emu.scan_forward(x, x, torch.zeros(1, 3, 0, 3, 2), 0, 0, state, True)
    assert h.shape == x.shape
    torch.testing.assert_close(final, state, rtol=0, atol=0)
    grad_initial = emu.scan_backward(x, x, x, torch.zeros(1, 3, 0, 3, 2), 0, 0, state, 2 * state)[3]
    torch.testing.assert_close(grad_initial, 2 * state, rtol=0, atol=0)


# ---- Band edges of the single-direction op --------------------------------------------------------------------


def check_band(emu, direction, dtype, chunk=0, tile=0, **case):
    """The binding's band scan with edge rows against the fp64 reference: h and every gradient, the edge rows' too."""
    inputs, grad_h, edges = band_case(direction, dtype, **case)
    h, grads, grad_edges = band_scan(emu, inputs, grad_h, direction, chunk, edges, tile)
    ref_h, ref_grads, ref_edges = band_reference(inputs, grad_h, direction, chunk or None, edges)
    assert h.dtype == dtype
    errors = {"h": (rel_error(h, ref_h), FWD_TOL[dtype])}
    for name, got, ref in zip(("x", "lam", "gates"), grads, ref_grads, strict=True):
        errors[f"grad {name}"] = (rel_error(got, ref), GRAD_TOL[dtype])
    for name, got, ref in zip(("above", "below"), grad_edges, ref_edges, strict=True):
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous(), name
        errors[f"grad {name}"] = (rel_error(got, ref), GRAD_TOL[dtype])
    bad = {k: v for k, v in errors.items() if not v[0] <= v[1]}
    assert not bad, f"emulated band scan vs reference (error, tolerance): {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("direction", HORIZONTAL)
def test_band_edges_match_reference(emu, direction, chunk, dtype):
    """Both edge rows given (strided), odd sizes; chunked: a group's first line reads no edge row."""
    check_band(emu, direction, dtype, chunk)


@pytest.mark.parametrize(
    "edges", [(True, False), (False, True), (True, True)], ids=["above only", "below only", "both"]
)
def test_band_of_one_row(emu, edges):
    """One row: offset -1 and +1 are the edge rows (all three neighbours valid with both given)."""
    check_band(emu, "left_to_right", torch.float32, shape=(2, 1, 6, 4, 2), above=edges[0], below=edges[1])


@pytest.mark.parametrize("tile", [1, 2, 4, 8, 16])
def test_band_edges_every_tile(emu, tile):
    """Every tile width: 16-byte packs of v2 (and single channels below a pack) carrying the edge rows."""
    check_band(emu, "right_to_left", torch.bfloat16, tile=tile, shape=(1, 4, 5, 16, 16))
    split = emu.last_forward_split()
    assert split["kernel"] == "v2" and split["tile"] == tile and split["pack"] == (8 if tile % 8 == 0 else 1)


def test_band_edges_on_the_v1_forward(emu):
    """A 70-row band with a 16-channel tile is too long for v2: the v1 forward reads the edge rows too."""
    check_band(emu, "left_to_right", torch.float32, chunk=2, tile=16, shape=(1, 70, 5, 2, 1))
    assert emu.last_forward_split()["kernel"] == "v1"
