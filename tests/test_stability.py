"""The stability property: row-stochastic gates keep a GSPN module bounded at 8x the latent size."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from gspn_diffusers.attention import to_gspn_attention
from gspn_diffusers.module import GSPNModule
from gspn_diffusers.ops import gspn_scan_fused
from gspn_diffusers.ops.reference import normalized_gates


def test_normalized_gates_are_row_stochastic_with_boundary_rule():
    logits = 5 * torch.randn(2, 7, 5, 3, 4, dtype=torch.float64)
    w = normalized_gates(logits)
    torch.testing.assert_close(w.sum(dim=3), torch.ones(2, 7, 5, 4, dtype=torch.float64))
    assert (w >= 0).all()
    assert (w[:, 0, :, 0] == 0).all() and (w[:, -1, :, 2] == 0).all()


def test_normalized_fused_scan_is_a_weighted_average_at_any_size():
    torch.manual_seed(0)
    for size in (8, 64):
        x = torch.randn(1, size, size, 4)
        lam = torch.rand(1, size, size, 4) + 0.01
        gates = 4 * torch.randn(1, size, size, 4, 3, 4)
        u = torch.ones(1, size, size, 4)
        merge = torch.full((4,), 0.25)
        y = gspn_scan_fused(x, lam, gates, u, merge, normalize=True)
        assert torch.isfinite(y).all()
        assert y.abs().max() <= x.abs().max() * (1 + 1e-5)


def test_module_output_stays_bounded_at_8x_latent_size():
    torch.manual_seed(0)
    channels = 32
    attn = Attention(query_dim=channels, heads=4, dim_head=8)
    module = GSPNModule(channels, gate_rank=4)
    to_gspn_attention(attn, module)
    torch.nn.init.normal_(module.gate_up.weight, std=1.0)  # strongly varying gates, not the uniform init
    peaks = {}
    for size in ((16, 16), (128, 128)):
        module.latent_size = size
        hidden = torch.randn(2, size[0] * size[1], channels)
        with torch.no_grad():
            out = attn(hidden)
        assert torch.isfinite(out).all()
        peaks[size] = out.abs().amax()
    ratio = peaks[(128, 128)] / peaks[(16, 16)]
    assert ratio < 2.0, f"output grew {ratio:.2f}x from a 16x16 to a 128x128 latent"
