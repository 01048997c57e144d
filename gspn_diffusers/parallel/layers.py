"""Band versions of the UNet layers that look beyond a band's rows: convolutions, GroupNorm, softmax ``attn1``.

Each ``patch_*`` returns the ``make`` function of :meth:`~.patching.Patches.forward`: the new forward runs the
original one unless the runtime is inside a band-split call. Exact calls exchange synchronously; stale calls use
the neighbours' values of the previous step (:meth:`~.runtime.Runtime.exchange`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParallelConfigError
from .runtime import Runtime, splice


def conv_halo(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Rows a band's conv needs from the band above and below, or None for a conv that is local (1x1).

    The top halo is the padding; the bottom one, ``k - pad - stride``, is 0 for the stride-2 downsamplers
    (band edges are even at every downsampling level, so the last output row ends inside the band).
    """
    kh = conv.kernel_size[0]
    if kh == 1:
        return None
    if (
        not isinstance(conv.padding, tuple)
        or conv.padding_mode != "zeros"
        or conv.dilation[0] != 1
        or kh % 2 == 0
        or conv.padding[0] != (kh - 1) // 2
    ):
        raise ParallelConfigError(
            f"Patch parallelism supports odd, zero-padded 'same'-style convolutions; got {conv} in the UNet."
        )
    pad, stride = conv.padding[0], conv.stride[0]
    return pad, max(0, kh - pad - stride)


def patch_conv(runtime: Runtime, conv: nn.Conv2d, layer_id: int) -> Callable[[Callable], Callable]:
    top, bottom = conv_halo(conv)
    pad = conv.padding[0]

    def make(original: Callable) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not runtime.active:
                return original(x)
            comm = runtime.comm
            above_exists, below_exists = comm.rank > 0, comm.rank < comm.size - 1
            rows = x.shape[2]
            if rows < max(top, bottom):
                raise ParallelConfigError(f"A band of {rows} rows is thinner than the halo of {conv}.")

            def start():
                def buffer(count: int) -> torch.Tensor:
                    return x.new_empty(x.shape[0], x.shape[1], count, x.shape[3])

                return comm.exchange_neighbours(
                    x[:, :, :bottom] if above_exists and bottom else None,
                    x[:, :, rows - top :] if below_exists and top else None,
                    buffer(top) if above_exists and top else None,
                    buffer(bottom) if below_exists and bottom else None,
                    tag=layer_id,
                )

            above, below = runtime.exchange(layer_id, start)
            shape = list(x.shape)
            if above is None:
                shape[2] = pad  # the image's own zero padding at the top edge
                above = x.new_zeros(shape)
            if below is None:
                shape[2] = pad if not below_exists else 0
                below = x.new_zeros(shape)
            padded = torch.cat([above.to(x.dtype), x, below.to(x.dtype)], dim=2)
            return F.conv2d(
                padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups
            )

        return forward

    return make


def band_group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G, 3) float64: count, mean and sum of squared deviations of each group over this band."""
    xg = x.reshape(x.shape[0], groups, -1).float()
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    count = torch.full_like(mean, xg.shape[-1])
    return torch.stack([count, mean, var * count], dim=-1).double()


def combine_stats(stats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-image mean and (biased) variance from every band's (count, mean, M2): Chan's parallel formula."""
    stacked = torch.stack(stats)
    count, mean, m2 = stacked.unbind(-1)
    total = count.sum(0)
    whole_mean = (count * mean).sum(0) / total
    whole_m2 = m2.sum(0) + (count * (mean - whole_mean) ** 2).sum(0)
    return whole_mean, whole_m2 / total


def patch_group_norm(runtime: Runtime, norm: nn.GroupNorm, layer_id: int) -> Callable[[Callable], Callable]:
    """Whole-image statistics: every band's (count, mean, M2) gathered; stale calls take the other bands' from
    the previous step and this band's fresh ones (DistriFusion's corrected GroupNorm)."""

    def make(original: Callable) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not runtime.active:
                return original(x)
            comm = runtime.comm
            own = band_group_stats(x, norm.num_groups)
            gathered = list(runtime.exchange(layer_id, lambda: comm.all_gather_list(own.to(comm.device))))
            gathered = [g.to(own.device) for g in gathered]
            gathered[comm.rank] = own
            mean, var = combine_stats(gathered)
            rstd = torch.rsqrt(var + norm.eps)
            xg = x.reshape(x.shape[0], norm.num_groups, -1).float()
            y = ((xg - mean.float()[..., None]) * rstd.float()[..., None]).reshape(x.shape).to(x.dtype)
            if norm.affine:
                view = (1, -1) + (1,) * (x.dim() - 2)
                y = y * norm.weight.view(view) + norm.bias.view(view)
            return y

        return forward

    return make


def gather_tokens(runtime: Runtime, layer_id: int, tokens: torch.Tensor) -> torch.Tensor:
    """Every band's tokens (B, N, C), in image row-major order; stale calls splice this band's fresh ones into
    the previous step's."""
    if tokens.dim() != 3:
        raise ParallelConfigError(f"Self-attention got {tuple(tokens.shape)}; patch parallelism needs (B, N, C).")
    comm, sizes = runtime.comm, runtime.token_counts()
    gathered = runtime.exchange(layer_id, lambda: comm.all_gather_dim(tokens, 1, sizes))
    if runtime.exact:
        return gathered
    return splice(gathered, tokens, 1, sizes, comm.rank)


def patch_attention(runtime: Runtime, attn: nn.Module, layer_id: int) -> Callable[[Callable], Callable]:
    """Softmax self-attention: this band's queries against every band's keys and values (the gathered tokens,
    passed as the ``encoder_hidden_states`` the processor projects to K and V)."""
    if getattr(attn, "norm_cross", None) is not None or getattr(attn, "residual_connection", False):
        raise ParallelConfigError("Patch parallelism supports self-attention without norm_cross or residual.")

    def make(original: Callable) -> Callable:
        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            if not runtime.active or encoder_hidden_states is not None:
                return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            if attention_mask is not None:
                raise ParallelConfigError("Patch parallelism does not support self-attention masks.")
            full = gather_tokens(runtime, layer_id, hidden_states)
            return original(hidden_states, full, None, **kwargs)

        return forward

    return make
