"""The converted self-attention layer: a Diffusers ``Attention`` whose token mixing is GSPN.

Every Diffusers path that swaps processors ends in an assignment to ``attn.processor``
(``set_processor``, ``set_attn_processor``, attention slicing, xformers, fused QKV, IP-Adapter, and
PAG, which assigns directly). :class:`GSPNAttention` sees that assignment and keeps GSPN: a GSPN
processor is taken as is, PAG's identity processors become their GSPN versions, and any other
processor is meant for the softmax layers, so this layer keeps :class:`GSPNAttnProcessor` and says
so once per processor class. GSPN therefore cannot vanish behind the user's back, and what
``is_converted``, ``save_gspn`` and the forward do always agree.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)

from .module import GSPNModule
from .processor import (
    GSPN_PROCESSORS,
    GSPNAttnProcessor,
    GSPNPAGCFGIdentitySelfAttnProcessor,
    GSPNPAGIdentitySelfAttnProcessor,
)

logger = logging.getLogger(__name__)

# PAG's identity processors on a self-attention -> the same perturbation on a GSPN layer.
_PAG_EQUIVALENTS = {
    PAGIdentitySelfAttnProcessor2_0: GSPNPAGIdentitySelfAttnProcessor,
    PAGCFGIdentitySelfAttnProcessor2_0: GSPNPAGCFGIdentitySelfAttnProcessor,
}
_announced: set[str] = set()
_REPLACED_PROCESSOR = "_gspn_replaced_processor"


def _announce_once(key: str, message: str, *args: Any) -> None:
    """One info line per kind of request, not one per layer (SD-XL has 70 GSPN layers)."""
    if key not in _announced:
        _announced.add(key)
        logger.info(message, *args)


def gspn_processor_for(processor: Any) -> Any:
    """The processor a GSPN layer runs when Diffusers assigns ``processor`` to it."""
    if isinstance(processor, GSPN_PROCESSORS):
        return processor
    for pag_class, gspn_class in _PAG_EQUIVALENTS.items():
        if isinstance(processor, pag_class):
            return gspn_class()
    name = type(processor).__name__
    _announce_once(
        name,
        "GSPN stays on the converted self-attention (attn1) layers; %s applies to the other attention layers "
        "(gspn_diffusers.restore() gives back the original self-attention).",
        name,
    )
    return GSPNAttnProcessor()


class GSPNAttention(Attention):
    """An ``attn1`` converted to GSPN: ``self.gspn`` holds the GSPN parameters, the projections are reused.

    Instances are made by switching the class of an existing ``Attention`` (as ``torch.nn.utils.parametrize``
    does), so the pretrained projections, hooks and adapters stay where they are; :func:`to_plain_attention`
    switches back.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "processor":
            value = gspn_processor_for(value)
        super().__setattr__(name, value)

    def fuse_projections(self, fuse: bool = True) -> None:
        """GSPN reads q, k and v through different nonlinearities from the three projections: nothing to fuse."""
        _announce_once(
            "fuse_projections",
            "fuse_qkv_projections: the GSPN self-attention layers keep their separate projections; the other "
            "attention layers are fused.",
        )


def to_gspn_attention(attn: Attention, gspn: GSPNModule) -> GSPNAttention:
    """Convert one layer in place: ``gspn`` becomes its module, its processor the GSPN one (the old one is kept,
    outside nn.Module's registries so it is never saved, for :func:`to_plain_attention`)."""
    replaced = attn.processor
    attn.__class__ = GSPNAttention
    attn.gspn = gspn
    attn.__dict__[_REPLACED_PROCESSOR] = replaced
    attn.set_processor(GSPNAttnProcessor())
    return attn


def default_processor(attn: Attention) -> AttnProcessor | AttnProcessor2_0:
    """The processor Diffusers gives a fresh ``Attention`` (what a plain model loaded from disk runs)."""
    return AttnProcessor2_0() if hasattr(F, "scaled_dot_product_attention") and attn.scale_qk else AttnProcessor()


def to_plain_attention(attn: GSPNAttention) -> Attention:
    """Undo :func:`to_gspn_attention`: drop the GSPN module, give back the processor it replaced (Diffusers'
    default where that is unknown, as in a model loaded from disk)."""
    processor = attn.__dict__.pop(_REPLACED_PROCESSOR, None)
    del attn.gspn
    attn.__class__ = Attention
    attn.set_processor(processor if processor is not None else default_processor(attn))
    return attn
