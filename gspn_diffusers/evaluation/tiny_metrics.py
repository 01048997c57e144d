"""Tiny random metric models (a feature extractor for FID, an open_clip CLIP) for offline tests and smoke runs.

They run the real metric code end to end in milliseconds; their numbers mean nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip_t import ClipModel


class TinyFeatureExtractor(nn.Module):
    """A random conv net standing in for Inception: uint8 ``(N, 3, H, W)`` images -> ``(N, 16)`` features."""

    num_features = 16

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2),
                nn.ReLU(),
                nn.Conv2d(8, self.num_features, 3, stride=2),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 255.0)


def tiny_clip(seed: int = 0) -> ClipModel:
    """A random open_clip CLIP (ViT image tower, text transformer, 32 px) with open_clip's real tokenizer."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=16,
            vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        )
    preprocess = open_clip.image_transform(32, is_train=False)
    return ClipModel(model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32"), "tiny-random-clip", "random")
