"""Tiny random metric models (a feature extractor for FID, an open_clip CLIP) for offline tests and smoke runs.

They run the real metric code end to end in milliseconds; their numbers mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# A tiny CLIP in open_clip's model-config layout (ViT image tower, text transformer, 32 px, CLIP's vocabulary).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(folder: Path, name: str) -> str:
    """Register :data:`TINY_CLIP_CONFIG` with open_clip under ``name`` (its JSON written to ``folder``), so the
    loading path for named models (``--clip-model NAME --clip-pretrained FILE``) can run offline."""
    import open_clip

    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return name


def tiny_clip(seed: int = 0) -> ClipModel:
    """A random open_clip CLIP (:data:`TINY_CLIP_CONFIG`) with open_clip's real tokenizer."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    preprocess = open_clip.image_transform(32, is_train=False)
    return ClipModel(model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32"), "tiny-random-clip", "random")
