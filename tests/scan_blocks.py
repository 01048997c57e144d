"""Helpers for the carried-state tests of the kernel binding (tests/test_cuda_emulation.py on the host emulation,
tests/test_cuda_kernel.py on the GPU): cut the scan axis into blocks, chain them through ``scan_forward`` /
``scan_backward`` with the carried state, and an independent reference with an initial state."""

from __future__ import annotations

import torch

from gspn_diffusers.ops import DIRECTIONS, gspn_scan_reference


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
        *g, carry = module.scan_backward(gh, x, lam, gates, d, chunk, init, carry, tile=tile)
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
