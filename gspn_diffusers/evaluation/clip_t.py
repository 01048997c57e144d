"""CLIP-T (open_clip): the mean cosine similarity of image and caption embeddings, on the paper's scale (0.307).

:func:`load_clip` finds the weights (a tag in the Hugging Face cache, or a file) and loads them; the
runner calls it before generating, so an offline machine without the weights, or a junk weights
file, stops at once with the file to provide, not after hours of sampling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-g-14"
DEFAULT_CLIP_PRETRAINED = "laion2b_s12b_b42k"  # LinFusion's CLIP-T model
CLIP_T_DEFINITION = "mean cosine similarity of open_clip image and caption embeddings (paper scale, e.g. 0.307)"


@dataclass
class ClipModel:
    """An open_clip model with its eval preprocessing and tokenizer, and the names it is reported under."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str


def clip_checkpoint(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED) -> Path:
    """The local file of open_clip weights ``pretrained`` (a tag such as laion2b_s12b_b42k, or a file path).

    A tag is looked up in open_clip's Hugging Face cache (and downloaded unless offline); when that
    fails the message names the hub repository, the file and the cache folder.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {model_name!r}; see open_clip.list_models() (e.g. ViT-g-14).")
    candidate = Path(pretrained).expanduser()
    if candidate.is_file():
        return candidate
    config = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not config:
        if candidate.suffix in (".bin", ".pt", ".pth", ".safetensors") or os.sep in pretrained:
            raise FileNotFoundError(f"open_clip weights file {pretrained!r} does not exist.")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"{pretrained!r} is neither a file nor an open_clip tag of {model_name} (tags: {tags}).")
    try:
        return Path(open_clip.download_pretrained(config))
    except (OSError, RuntimeError) as error:
        from huggingface_hub.constants import HF_HUB_CACHE

        if config.get("hf_hub"):
            repo, filename = os.path.split(config["hf_hub"])
            source = (
                f"run `huggingface-cli download {repo} {filename or 'open_clip_pytorch_model.bin'}` on a machine with "
                f"internet and copy the Hugging Face cache to {HF_HUB_CACHE}"
            )
        else:
            source = f"download {config.get('url')} into the open_clip cache ~/.cache/clip"
        raise FileNotFoundError(
            f"The open_clip weights {model_name}/{pretrained} are not available offline: {source}, or pass the "
            f"weights file with --clip-pretrained PATH. ({error})"
        ) from error


def load_clip(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    device: str | torch.device = "cpu",
    checkpoint: Path | None = None,
) -> ClipModel:
    """The open_clip model from ``checkpoint`` (default: :func:`clip_checkpoint`) with the tag's preprocessing.

    A file that is not open_clip weights of ``model_name`` (truncated, another model, not a
    checkpoint at all) raises a ``ValueError`` naming the file.
    """
    import open_clip

    checkpoint = checkpoint or clip_checkpoint(model_name, pretrained)
    config = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=str(checkpoint),
            device=device,
            image_mean=config.get("mean"),
            image_std=config.get("std"),
            image_interpolation=config.get("interpolation"),
            image_resize_mode=config.get("resize_mode"),
        )
    except Exception as error:  # any failure to read the file means a bad file: say which one
        raise ValueError(
            f"{checkpoint} is not a valid open_clip {model_name} checkpoint ({type(error).__name__}: {error}); "
            f"download the {model_name}/{pretrained} weights again or pass the right file with --clip-pretrained."
        ) from error
    return ClipModel(model.eval(), preprocess, open_clip.get_tokenizer(model_name), model_name, pretrained)


def mean_cosine(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[float, int]:
    """Sum of the row-wise cosine similarities (float32 and up) and the row count: CLIP-T's sufficient statistics."""
    image = nn.functional.normalize(image_embeddings.float(), dim=-1)
    text = nn.functional.normalize(text_embeddings.float(), dim=-1)
    return float((image * text).sum()), image.shape[0]


class ClipTScore:
    """CLIP-T accumulator: the mean cosine similarity between each image's and its caption's CLIP embedding.

    Unlike torchmetrics' CLIPScore (100 x the cosine, negatives clipped to 0) it reports the plain
    mean cosine, the scale of the GSPN and LinFusion papers. ``prefix`` is prepended to every
    caption (LinFusion uses "A photo depicts ").
    """

    def __init__(self, clip: ClipModel, device: str | torch.device = "cpu", prefix: str = "") -> None:
        self.clip, self.device, self.prefix = clip, device, prefix
        clip.model.to(device)
        self.total, self.count = 0.0, 0

    @torch.no_grad()
    def update(self, pixels: torch.Tensor, captions: Sequence[str]) -> None:
        """``pixels``: images after ``clip.preprocess``, stacked; ``captions``: one per image."""
        tokens = self.clip.tokenizer([self.prefix + caption for caption in captions]).to(self.device)
        total, count = mean_cosine(
            self.clip.model.encode_image(pixels.to(self.device)), self.clip.model.encode_text(tokens)
        )
        self.total += total
        self.count += count

    def compute(self) -> float:
        """The score over all processes of a distributed run (the sums are all-reduced, as torchmetrics does)."""
        stats = torch.tensor([self.total, self.count], dtype=torch.float64, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        total, count = stats.tolist()
        if count == 0:
            raise ValueError("CLIP-T needs at least one image.")
        return total / count
