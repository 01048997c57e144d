"""Stateless attention processors that run a layer's GSPN module (``attn.gspn``).

Diffusers rebuilds processors with ``processor.__class__()`` (IP-Adapter, ``unload_ip_adapter``) and
swaps them freely, so these hold nothing: the weights and the latent size live on the layer's
:class:`~gspn_diffusers.module.GSPNModule`. ``GSPNAttnProcessor`` is the plain one; the two PAG
processors are what a GSPN layer runs when Perturbed-Attention Guidance asks for its identity
processors: GSPN on the guided batch, identity attention (``to_out(to_v(x))``) on the perturbed one.
"""

from __future__ import annotations

import torch
from torch import nn


def _finish(attn: nn.Module, mixed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``to_out``, the residual and the output rescaling, as every Diffusers processor ends."""
    out = attn.to_out[1](attn.to_out[0](mixed))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class GSPNAttnProcessor:
    """Runs ``attn.gspn`` in place of softmax self-attention; Diffusers' processor signature."""

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
            attn: the converted ``Attention`` (its ``gspn`` module and projections are used).
            hidden_states: (B, H*W, C) tokens in row-major order.
            encoder_hidden_states: must be ``None``: GSPN replaces self-attention only.
            attention_mask: must be ``None``: a spatial scan has no token mask.
            temb: unused; accepted because Diffusers passes it to every processor.
        """
        _check_self_attention(encoder_hidden_states, attention_mask)
        return _finish(attn, attn.gspn(attn, hidden_states), hidden_states)


class GSPNPAGIdentitySelfAttnProcessor:
    """PAG without CFG on a GSPN layer: the batch is [guided, perturbed]."""

    chunks = 2

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Diffusers' signature; the arguments as for :class:`GSPNAttnProcessor`."""
        _check_self_attention(encoder_hidden_states, attention_mask)
        parts = hidden_states.chunk(self.chunks)
        guided, perturbed = torch.cat(parts[:-1]), parts[-1]
        guided_out = _finish(attn, attn.gspn(attn, guided), guided)
        perturbed_out = _finish(attn, attn.to_v(perturbed), perturbed)
        return torch.cat([guided_out, perturbed_out])


class GSPNPAGCFGIdentitySelfAttnProcessor(GSPNPAGIdentitySelfAttnProcessor):
    """PAG with CFG on a GSPN layer: the batch is [unconditional, conditional, perturbed]."""

    chunks = 3


GSPN_PROCESSORS = (GSPNAttnProcessor, GSPNPAGIdentitySelfAttnProcessor)


def _check_self_attention(encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    if encoder_hidden_states is not None:
        raise ValueError("GSPN replaces self-attention only; cross-attention must keep its processor.")
    if attention_mask is not None:
        raise ValueError("GSPN does not support attention masks on spatial self-attention.")
