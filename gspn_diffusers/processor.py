"""The GSPN attention processor: replaces one self-attention (``attn1``) of a Diffusers UNet.

It is installed with ``attn.set_processor`` on the existing ``Attention`` module, so the pretrained
projections stay where they are and are reused, reading GSPN as linear attention (the paper's
Eq. 5): ``v = to_v(x)`` is propagated, ``lam = softplus(to_k(x))`` weighs what enters the
propagation, ``u = sigmoid(to_q(x))`` gates what leaves it, and ``to_out`` projects the result.
The new parameters are a low-rank gate projection, the per-direction merge and an optional skip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LINE_BLOCK_LINES, LINE_BLOCK_TOKENS
from .line_block import line_block_scan_fused
from .ops import DIRECTIONS, NUM_GATES, gspn_scan_fused


class GSPNAttnProcessor(nn.Module):
    """GSPN in place of softmax self-attention, for any (H, W) the enclosing transformer sees.

    Args:
        channels: C, the inner dimension of the attention (``attn.to_v.out_features``).
        gate_rank: the gate projection is C -> C / gate_rank -> 4 x 3 x gate_channels.
        gate_channels: G, gate channels per direction (``None``: C).
        chunk_size: ``None`` for global GSPN, k for local GSPN in groups of k lines.
        use_skip: learn a per-channel skip D * v, initialised to zero.
        normalize: divide by the scan of lam alone, so the output is a weighted average of v and
            keeps its scale at resolutions never seen in training.
        line_block_tokens: without gradients, latents of more tokens than this run line-block inference
            (:mod:`gspn_diffusers.line_block`): the gates exist one block of lines at a time instead of
            (B, H, W, 4, 3, G) at once; same result. ``None`` never does.
        line_block_lines: lines per block of line-block inference.

    The latent size of the current call is set by a forward pre-hook on the enclosing
    ``Transformer2DModel`` (see :mod:`gspn_diffusers.convert`) in :attr:`latent_size`; the token
    count alone cannot tell 64x128 from 128x64.
    """

    def __init__(
        self,
        channels: int,
        gate_rank: int = 4,
        gate_channels: int | None = None,
        chunk_size: int | None = None,
        use_skip: bool = True,
        normalize: bool = True,
        line_block_tokens: int | None = LINE_BLOCK_TOKENS,
        line_block_lines: int = LINE_BLOCK_LINES,
    ) -> None:
        super().__init__()
        gate_channels = channels if gate_channels is None else gate_channels
        if channels % gate_channels != 0:
            raise ValueError(f"gate_channels={gate_channels} must divide the attention channels {channels}.")
        if line_block_lines < 1:
            raise ValueError(f"line_block_lines must be a positive number of lines; got {line_block_lines}.")
        hidden = max(1, channels // gate_rank)
        self.channels = channels
        self.gate_channels = gate_channels
        self.chunk_size = chunk_size
        self.normalize = normalize
        self.line_block_tokens = line_block_tokens
        self.line_block_lines = line_block_lines
        self.gate_down = nn.Linear(channels, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, len(DIRECTIONS) * NUM_GATES * gate_channels)
        # Zero-initialised up-projection: at conversion every valid neighbour gets the same weight,
        # a smooth and stable propagation that distillation then shapes.
        nn.init.zeros_(self.gate_up.weight)
        nn.init.zeros_(self.gate_up.bias)
        # sigmoid(q) averages 1/2, so merge weights of 2/4 start the output at the scale of the
        # convex average that softmax attention produces.
        self.merge = nn.Parameter(torch.full((len(DIRECTIONS), channels), 2.0 / len(DIRECTIONS)))
        self.skip = nn.Parameter(torch.zeros(channels)) if use_skip else None
        self.latent_size: tuple[int, int] | None = None

    def extra_repr(self) -> str:
        mode = "global" if self.chunk_size is None else f"local(chunk_size={self.chunk_size})"
        return f"channels={self.channels}, gate_channels={self.gate_channels}, {mode}, normalize={self.normalize}"

    def _latent_hw(self, num_tokens: int) -> tuple[int, int]:
        if self.latent_size is None:
            raise RuntimeError(
                "GSPNAttnProcessor does not know the latent height and width of this call. It must run inside a "
                "UNet converted with gspn_diffusers.convert(), which records them from the enclosing "
                "Transformer2DModel."
            )
        height, width = self.latent_size
        if height * width != num_tokens:
            raise RuntimeError(
                f"GSPNAttnProcessor got {num_tokens} tokens but the enclosing transformer saw a {height}x{width} "
                "latent; this attention is not a spatial self-attention of that transformer."
            )
        return height, width

    def _line_blocks(self, num_tokens: int) -> bool:
        """Line-block inference applies: no gradient is recorded and the latent is above the threshold."""
        threshold = self.line_block_tokens
        return threshold is not None and num_tokens > threshold and not torch.is_grad_enabled()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same signature as Diffusers' processors.

        Args:
            attn: the ``Attention`` module whose projections are reused.
            hidden_states: (B, H*W, C) tokens in row-major order.
            encoder_hidden_states: must be ``None``: GSPN replaces self-attention only.
            attention_mask: must be ``None``: a spatial scan has no token mask.
            temb: unused; accepted because Diffusers passes it to every processor.
        """
        if encoder_hidden_states is not None:
            raise ValueError(
                "GSPNAttnProcessor replaces self-attention only; cross-attention must keep its processor."
            )
        if attention_mask is not None:
            raise ValueError("GSPNAttnProcessor does not support attention masks on spatial self-attention.")
        residual = hidden_states
        batch, num_tokens, _ = hidden_states.shape
        height, width = self._latent_hw(num_tokens)

        def spatial(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, height, width, t.shape[-1])

        # Under autocast the projections return the autocast dtype but softplus/sigmoid may return fp32; the op
        # gets one dtype (the value's), or the kernel's same-dtype check would send the call to the reference.
        value = spatial(attn.to_v(hidden_states))
        dtype = value.dtype
        lam = F.softplus(spatial(attn.to_k(hidden_states))).to(dtype)
        gate = torch.sigmoid(spatial(attn.to_q(hidden_states))).to(dtype)
        if self._line_blocks(num_tokens):
            out = line_block_scan_fused(
                value,
                lam,
                gate,
                spatial(self.gate_down(hidden_states)),
                self.gate_up.weight,
                self.gate_up.bias,
                self.merge,
                self.skip,
                self.chunk_size,
                self.normalize,
                self.line_block_lines,
            )
        else:
            gate_logits = self.gate_up(self.gate_down(hidden_states)).to(dtype)
            gate_logits = gate_logits.reshape(batch, height, width, len(DIRECTIONS), NUM_GATES, self.gate_channels)
            out = gspn_scan_fused(
                value, lam, gate_logits, gate, self.merge, self.skip, self.chunk_size, normalize=self.normalize
            )
        out = attn.to_out[0](out.reshape(batch, num_tokens, -1))
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
