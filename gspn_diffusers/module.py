"""The GSPN module of one converted self-attention: its parameters and the propagation they drive.

It lives on the ``Attention`` layer itself (``attn1.gspn``), not inside the attention processor:
Diffusers rebuilds processors with ``processor.__class__()`` and swaps them freely, so a processor
must be stateless and the weights must belong to a module of the model (they are then saved by
``save_pretrained``, moved by ``.to()``, sharded by FSDP and rebuilt from the model's config).
The pretrained projections are reused, reading GSPN as linear attention (the paper's Eq. 5):
``v = to_v(x)`` is propagated, ``lam = softplus(to_k(x))`` weighs what enters the propagation,
``u = sigmoid(to_q(x))`` gates what leaves it. The new parameters are a low-rank gate projection,
the per-direction merge and an optional skip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LINE_BLOCK_LINES, LINE_BLOCK_TOKENS
from .line_block import line_block_scan_fused
from .ops import DIRECTIONS, NUM_GATES, gspn_scan_fused


class GSPNModule(nn.Module):
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
    ``Transformer2DModel`` (see :mod:`gspn_diffusers.models`) in :attr:`latent_size`; the token
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

    def latent_hw(self, num_tokens: int) -> tuple[int, int]:
        """The (H, W) of this call, checked against the token count."""
        if self.latent_size is None:
            raise RuntimeError(
                "This GSPN layer does not know the latent height and width of this call. It must run inside a "
                "model converted with gspn_diffusers.convert(), which records them from the enclosing "
                "Transformer2DModel."
            )
        height, width = self.latent_size
        if height * width != num_tokens:
            raise RuntimeError(
                f"A GSPN layer got {num_tokens} tokens but the enclosing transformer saw a {height}x{width} latent; "
                "this attention is not a spatial self-attention of that transformer."
            )
        return height, width

    def uses_line_blocks(self, num_tokens: int) -> bool:
        """Line-block inference applies: no gradient is recorded and the latent is above the threshold."""
        threshold = self.line_block_tokens
        return threshold is not None and num_tokens > threshold and not torch.is_grad_enabled()

    def projections(
        self, attn: nn.Module, hidden_states: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``v = to_v(x)``, ``lam = softplus(to_k(x))``, ``u = sigmoid(to_q(x))`` as (B, H, W, C), in one dtype.

        Under autocast the projections return the autocast dtype but softplus/sigmoid may return fp32; the op gets one
        dtype (the value's), or the kernel's same-dtype check would send the call to the reference.
        """

        def spatial(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], height, width, t.shape[-1])

        value = spatial(attn.to_v(hidden_states))
        lam = F.softplus(spatial(attn.to_k(hidden_states))).to(value.dtype)
        gate = torch.sigmoid(spatial(attn.to_q(hidden_states))).to(value.dtype)
        return value, lam, gate

    def gate_hidden(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The (B, H, W, C / gate_rank) gate down-projection of the tokens: all the gate logits need, at a fraction of
        their size (line-block inference and patch-parallel bands up-project one direction at a time from it)."""
        return self.gate_down(hidden_states).reshape(hidden_states.shape[0], height, width, -1)

    def gate_logits(self, hidden_states: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The (B, H, W, 4 directions, 3, G) gate logits of the tokens."""
        logits = self.gate_up(self.gate_hidden(hidden_states, height, width)).to(dtype)
        return logits.unflatten(-1, (len(DIRECTIONS), NUM_GATES, self.gate_channels))

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """GSPN's token mixing of ``hidden_states`` (B, H*W, C) with ``attn``'s projections, before ``to_out``."""
        batch, num_tokens, _ = hidden_states.shape
        height, width = self.latent_hw(num_tokens)
        value, lam, gate = self.projections(attn, hidden_states, height, width)
        if self.uses_line_blocks(num_tokens):
            out = line_block_scan_fused(
                value,
                lam,
                gate,
                self.gate_hidden(hidden_states, height, width),
                self.gate_up.weight,
                self.gate_up.bias,
                self.merge,
                self.skip,
                self.chunk_size,
                self.normalize,
                self.line_block_lines,
            )
        else:
            gate_logits = self.gate_logits(hidden_states, height, width, value.dtype)
            out = gspn_scan_fused(
                value, lam, gate_logits, gate, self.merge, self.skip, self.chunk_size, normalize=self.normalize
            )
        return out.reshape(batch, num_tokens, -1)
