"""The lean GSPN band layer of patch parallelism (one direction's gates at a time, values and normalisers
interleaved), fed the true boundary lines of the whole image, equals the GSPN module's own whole-image output.

The boundary lines are built here from the module's whole gate logits and separate scans of the values and of ones
(the normaliser), interleaved as the documented layout ``[h_0, z_0, h_1, z_1, ...]``: a band that interleaved
differently, or up-projected another direction's gate rows, would disagree with them and with the module.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from gspn_diffusers.module import GSPNModule
from gspn_diffusers.ops import DIRECTIONS, gspn_scan
from gspn_diffusers.parallel import gspn as band_layer
from gspn_diffusers.parallel.gspn import Band, exact_band, stale_band, vertical_state_needed

HEIGHT, WIDTH, CHANNELS = 11, 5, 8
BOUNDS = (0, 4, 8, 11)  # chunk_size 4 is cut at both band edges, 3 at neither
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def layer_case(dtype, normalize, gate_channels, chunk_size, line_blocks):
    torch.manual_seed(0)
    attn = Attention(query_dim=CHANNELS, heads=2, dim_head=CHANNELS // 2).to(dtype)
    gspn = GSPNModule(
        CHANNELS,
        gate_rank=2,
        gate_channels=gate_channels,
        chunk_size=chunk_size,
        normalize=normalize,
        line_block_tokens=0 if line_blocks else None,
        line_block_lines=3,
    ).to(dtype)
    with torch.no_grad():
        for param in gspn.parameters():
            param.normal_()
    gspn.latent_size = (HEIGHT, WIDTH)
    return attn, gspn, torch.randn(2, HEIGHT * WIDTH, CHANNELS, dtype=dtype)


def whole_scans(attn, gspn, tokens) -> list[torch.Tensor]:
    """Each direction's whole-image scan in the boundary lines' layout: values and normalisers interleaved."""
    value, lam, _ = gspn.projections(attn, tokens, HEIGHT, WIDTH)
    gates = gspn.gate_logits(tokens, HEIGHT, WIDTH, value.dtype)
    scans = []
    for d, direction in enumerate(DIRECTIONS):
        h = gspn_scan(value, lam, gates[..., d, :, :], direction, gspn.chunk_size)
        if gspn.normalize:
            z = gspn_scan(torch.ones_like(value), lam, gates[..., d, :, :], direction, gspn.chunk_size)
            h = torch.stack([h, z], dim=-1).flatten(-2)
        scans.append(h)
    return scans


def pack(scans: list[torch.Tensor], row: int, vertical: str | None) -> torch.Tensor:
    """A band edge's boundary lines: both horizontal scans' row, then the vertical scan's where a state crosses."""
    ltr, rtl = scans[0][:, row], scans[1][:, row]
    return torch.stack([ltr, rtl] + ([scans[DIRECTIONS.index(vertical)][:, row]] if vertical else []), dim=1)


def edges(a: int, b: int, chunk_size: int | None) -> tuple[bool, bool]:
    """Whether a vertical state crosses the band's top / bottom edge."""
    return a > 0 and vertical_state_needed(a, chunk_size), b < HEIGHT and vertical_state_needed(b, chunk_size)


def received(scans: list[torch.Tensor], a: int, b: int, needed: tuple[bool, bool]) -> tuple:
    """The boundary lines band [a, b) receives: the whole scans' rows a - 1 and b (None at an image edge)."""
    above = pack(scans, a - 1, "top_to_bottom" if needed[0] else None) if a > 0 else None
    below = pack(scans, b, "bottom_to_top" if needed[1] else None) if b < HEIGHT else None
    return above, below


@pytest.mark.parametrize("line_blocks", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3, 4])
@pytest.mark.parametrize("gate_channels", [None, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_band_with_true_boundary_lines_equals_the_module(dtype, normalize, gate_channels, chunk_size, line_blocks):
    attn, gspn, tokens = layer_case(dtype, normalize, gate_channels, chunk_size, line_blocks)
    tol = dict(rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    with torch.no_grad():
        assert gspn.uses_line_blocks(tokens.shape[1]) == line_blocks
        want = gspn(attn, tokens).reshape(2, HEIGHT, WIDTH, CHANNELS)
        scans = whole_scans(attn, gspn, tokens)
        for a, b in zip(BOUNDS[:-1], BOUNDS[1:], strict=True):
            needed = edges(a, b, chunk_size)
            above, below = received(scans, a, b, needed)
            band = Band((a, b), HEIGHT, above, below)
            mixing, to_above, to_below = stale_band(attn, gspn, tokens[:, a * WIDTH : b * WIDTH], WIDTH, band, needed)
            torch.testing.assert_close(mixing, want[:, a:b], **tol, msg=f"stale band {a}:{b}")
            # what it sends: its first lines (for the band above) and its last (for the band below)
            torch.testing.assert_close(to_above, pack(scans, a, "bottom_to_top" if needed[0] else None), **tol)
            torch.testing.assert_close(to_below, pack(scans, b - 1, "top_to_bottom" if needed[1] else None), **tol)


@pytest.mark.parametrize("block_lines", [1, 2, 3, 5, HEIGHT])
@pytest.mark.parametrize("chunk_size", [None, 3, 4])
@pytest.mark.parametrize("gate_channels", [None, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warm_up_band_streamed_in_line_blocks_equals_the_module(
    dtype, normalize, gate_channels, chunk_size, block_lines
):
    """The warm-up streams the whole image in blocks of ``line_block_lines`` (rounded up to the chunk size): blocks
    that cut a band, or hold its edge rows first, last or inside (and one block per direction: ``HEIGHT`` lines),
    each band's merge and the lines just outside it must still be the whole image's."""
    attn, gspn, tokens = layer_case(dtype, normalize, gate_channels, chunk_size, line_blocks=False)
    gspn.line_block_lines = block_lines
    tol = dict(rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    with torch.no_grad():
        want = gspn(attn, tokens).reshape(2, HEIGHT, WIDTH, CHANNELS)
        scans = whole_scans(attn, gspn, tokens)
        for a, b in zip(BOUNDS[:-1], BOUNDS[1:], strict=True):
            needed = edges(a, b, chunk_size)
            mixing, got_above, got_below = exact_band(attn, gspn, tokens, WIDTH, (a, b), HEIGHT, needed)
            torch.testing.assert_close(mixing, want[:, a:b], **tol, msg=f"warm-up band {a}:{b}")
            for got, expected in zip((got_above, got_below), received(scans, a, b, needed), strict=True):
                if expected is not None:
                    torch.testing.assert_close(got, expected, **tol, msg=f"warm-up lines of band {a}:{b}")


def test_each_scan_gets_one_directions_gates_as_they_are(monkeypatch):
    """No scan sees the gates of all four directions, nor a doubled copy for the normaliser: (B, H, W, 3, G)."""
    attn, gspn, tokens = layer_case(torch.float64, True, 2, None, False)
    seen = []

    def recording_scan(x, lam, gate_logits, *args, **kwargs):
        seen.append((x.shape[-1], tuple(gate_logits.shape[3:])))
        return gspn_scan(x, lam, gate_logits, *args, **kwargs)

    monkeypatch.setattr(band_layer, "gspn_scan", recording_scan)
    with torch.no_grad():
        stale_band(attn, gspn, tokens[:, : 4 * WIDTH], WIDTH, Band((0, 4), HEIGHT), (False, False))
    assert seen == [(2 * CHANNELS, (3, 2))] * len(DIRECTIONS)


@pytest.mark.parametrize("exact,height,width,bound", [(False, 64, 128, 30), (True, 512, 512, 10)])
def test_band_layer_memory_per_token_channel_on_meta(exact, height, width, bound):
    """One SD-XL-wide (C = G = 640, bf16) band layer traced on ``meta`` with the kernel's memory, per token and
    channel of the tokens it reads: a stale band below 30 bytes (~29; before, with the four directions' gates at
    once (24 bytes), doubled for the normaliser, and the four scans kept for the merge: 122); a warm-up call on the
    whole image, streamed in the default blocks of 64 lines, below 10 (~9.6; before, with one direction's gates
    and scan planes for the whole image: 27; with all four directions': 104)."""
    from gspn_diffusers.pipelines.tracing import gspn_band_layer_peak

    rows, channels = (16, 48), 640
    peak = gspn_band_layer_peak(channels, 16, height, width, rows, exact=exact)
    tokens = 2 * width * (height if exact else rows[1] - rows[0])
    assert peak < bound * tokens * channels
