"""The registered custom ops (``torch.ops.gspn_diffusers.*``) under ``torch.library.opcheck``, and the kernel's
shared-gate path where a pack of channels straddles gate channels, both on the host emulation of the kernel.

``opcheck`` compares each op's fake (meta) implementation with what the real one returns, checks the schema
(no aliasing, no mutation), the autograd registration and AOT dispatch with dynamic shapes. On CPU tensors the
ops run the kernel's own source compiled for the host, so the real code path of a GPU call is what is checked:
non-square latents (H != W), carried state, every direction, chunked and global.
"""

from __future__ import annotations

import pytest
import torch

from gspn_diffusers.ops import DIRECTIONS, cuda, gspn_scan_fused_reference, gspn_scan_reference

OPS = ("scan", "scan_backward", "scan_fused", "scan_fused_backward")
B, H, W, C, G = 2, 3, 5, 8, 4  # H != W: a fake impl that swaps the perpendicular axis gets the wrong state shape


def op_args(op: torch._ops.OpOverloadPacket, **values) -> tuple:
    """Positional arguments of ``op`` in its schema's order, by name; an argument added later with a default (a
    new optional input) takes its default, so these cases keep checking the ops as their signatures grow."""
    args = []
    for argument in op.default._schema.arguments:
        if argument.name in values:
            args.append(values.pop(argument.name))
        elif argument.has_default_value():
            args.append(argument.default_value)
        else:
            pytest.fail(f"{op} has a required argument {argument.name!r} that this test does not know")
    assert not values, f"{op} has no arguments {sorted(values)}"
    return tuple(args)


def rand(gen: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen) * (high - low) + low).requires_grad_(grad)


def perpendicular(direction: int) -> int:
    """Lines of the state: rows (H) for the horizontal scans, columns (W) for the vertical ones."""
    return H if DIRECTIONS[direction] in ("left_to_right", "right_to_left") else W


def test_every_registered_op_is_checked_here(emulation):
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if "gspn_diffusers::" in name}
    assert registered == set(OPS), "a new custom op needs an opcheck case in this file"


@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("with_state", [True, False], ids=["carried state", "no state"])
@pytest.mark.parametrize("direction", range(4), ids=DIRECTIONS)
def test_opcheck_scan_and_its_backward(emulation, direction, with_state, chunk):
    gen = torch.Generator().manual_seed(direction)
    x, lam = rand(gen, B, H, W, C), rand(gen, B, H, W, C, low=0.1)
    gates = rand(gen, B, H, W, 3, G, low=-2, high=2)
    state = rand(gen, B, perpendicular(direction), C) if with_state else None
    scan = torch.ops.gspn_diffusers.scan
    values = dict(x=x, lam=lam, gate_logits=gates, direction=direction, chunk=chunk, initial_state=state)
    torch.library.opcheck(scan, op_args(scan, **values, verify=False))

    h, final = scan(*op_args(scan, **values, verify=False))
    assert h.shape == (B, H, W, C) and final.shape == (B, perpendicular(direction), C)
    grad_h = rand(gen, B, H, W, C, grad=False)
    grad_final = rand(gen, *final.shape, grad=False) if with_state else None
    backward = torch.ops.gspn_diffusers.scan_backward
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    torch.library.opcheck(backward, op_args(backward, grad_h=grad_h, grad_final=grad_final, **detached, verify=False))
    # The state's gradient has the state's shape (an empty tensor stands for "no state").
    grads = backward(*op_args(backward, grad_h=grad_h, grad_final=grad_final, **detached, verify=False))
    assert grads[3].shape == ((B, perpendicular(direction), C) if with_state else (0,))


@pytest.mark.parametrize("chunk,normalize", [(0, True), (2, False)])
@pytest.mark.parametrize("shared_u,skip", [(False, True), (True, False)], ids=["u per direction", "shared u, no skip"])
def test_opcheck_fused_and_its_backward(emulation, chunk, normalize, shared_u, skip):
    gen = torch.Generator().manual_seed(7)
    values = dict(
        x=rand(gen, B, H, W, C),
        lam=rand(gen, B, H, W, C, low=0.1),
        gate_logits=rand(gen, B, H, W, 4, 3, G, low=-2, high=2),
        u=rand(gen, B, H, W, C) if shared_u else rand(gen, B, H, W, 4, C),
        merge=rand(gen, 4, C),
        skip=rand(gen, C) if skip else None,
        chunk=chunk,
        normalize=normalize,
        eps=1e-6,
    )
    fused = torch.ops.gspn_diffusers.scan_fused
    torch.library.opcheck(fused, op_args(fused, **values, verify=False))
    backward = torch.ops.gspn_diffusers.scan_fused_backward
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    grad_y = rand(gen, B, H, W, C, grad=False)
    torch.library.opcheck(backward, op_args(backward, grad_y=grad_y, **detached, verify=False))


# ---- shared gates whose channel groups straddle the kernel's 16-byte packs ---------------------------------------


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-2)
    return float((got.double() - expected.double()).abs().max() / scale)


TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


@pytest.fixture
def tile(monkeypatch):
    """A tile that holds whole 16-byte packs (8 channels), so the forward runs kernel v2 with vector packs."""
    monkeypatch.setenv(cuda.TILE_ENV, "8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_group", [3, 5, 6])
def test_shared_gates_straddling_packs_match_the_reference(emulation, tile, dtype, per_group):
    """C/G channels share a gate channel. With C/G = 3, 5 or 6 and packs of 4 (fp32) or 8 (bf16) channels, the
    packs start inside a gate group (offsets 1, 2, 4, ...) and span two or three groups, which the pack's per-channel
    gate index must follow; the current suite only has C/G that the pack width divides (offset 0)."""
    g = 8
    c = per_group * g
    pack = 16 // torch.tensor([], dtype=dtype).element_size()
    assert c % pack == 0 and per_group % pack != 0  # packs of whole channels that start inside a gate group
    gen = torch.Generator().manual_seed(per_group)
    inputs = [
        rand(gen, 1, 4, 6, c, grad=False),
        rand(gen, 1, 4, 6, c, low=0.1, grad=False),
        rand(gen, 1, 4, 6, 4, 3, g, low=-3, high=3, grad=False),
        rand(gen, 1, 4, 6, 4, c, grad=False),
        rand(gen, 4, c, grad=False),
        rand(gen, c, grad=False),
    ]
    upstream = torch.randn(1, 4, 6, c, generator=gen)

    def run(fn, tensors, out_dtype):
        leaves = [t.detach().to(out_dtype).requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(upstream.to(out_dtype))
        return out.detach(), [leaf.grad for leaf in leaves]

    got, got_grads = run(lambda *a: cuda.kernel_scan_fused(*a, chunk_size=None, normalize=True), inputs, dtype)
    split = emulation.last_forward_split()
    assert split["kernel"] == "v2" and split["pack"] == pack, split  # the vector-pack path, not single channels
    expected, ref_grads = run(
        lambda *a: gspn_scan_fused_reference(*a, chunk_size=None, normalize=True), inputs, torch.float64
    )
    assert rel_error(got, expected) <= TOL[dtype]
    for name, g_got, g_ref in zip(["x", "lam", "gates", "u", "merge", "skip"], got_grads, ref_grads, strict=True):
        assert rel_error(g_got, g_ref) <= 3 * TOL[dtype], name


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_single_scan_shared_gates_straddling_packs(emulation, tile, direction):
    """The single-direction op (what line-block inference runs) with C/G = 3 over packs of 4 fp32 channels, with a
    carried state: output, final state and every gradient against the reference."""
    g, c = 4, 12
    gen = torch.Generator().manual_seed(3)
    x, lam = rand(gen, 2, 4, 7, c, grad=False), rand(gen, 2, 4, 7, c, low=0.1, grad=False)
    gates = rand(gen, 2, 4, 7, 3, g, low=-3, high=3, grad=False)
    perp = 4 if direction in ("left_to_right", "right_to_left") else 7
    state = rand(gen, 2, perp, c, grad=False)
    up_h, up_final = torch.randn(x.shape, generator=gen), torch.randn(state.shape, generator=gen)
    results = []
    for fn, dtype in ((cuda.kernel_scan, torch.float32), (gspn_scan_reference, torch.float64)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, lam, gates, state)]
        h, final = fn(*leaves[:3], direction, None, initial_state=leaves[3], return_final_state=True)
        ((h * up_h.to(dtype)).sum() + (final * up_final.to(dtype)).sum()).backward()
        results.append([h.detach(), final.detach(), *(leaf.grad for leaf in leaves)])
        if fn is cuda.kernel_scan:
            split = emulation.last_forward_split()
            assert split["kernel"] == "v2" and split["pack"] == 4, split
    for name, got, expected in zip(["h", "final", "x", "lam", "gates", "state"], *results, strict=True):
        assert rel_error(got, expected) <= 3 * TOL[torch.float32], name
