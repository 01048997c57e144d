"""FID (torchmetrics, Inception-v3 FID weights of torch-fidelity) and CLIP-T (open_clip), with fail-fast weight checks.

The weight checks (:func:`inception_weights` and :func:`clip_checkpoint`) only find or download a
file; they run before generation so that an offline machine without the weights stops at once with
the exact file to provide, not after hours of sampling. The models are built after generation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:  # torchmetrics takes a second to import: only when a metric is built
    from torchmetrics.image.fid import FrechetInceptionDistance

logger = logging.getLogger(__name__)

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_NAME = "inception-v3-compat (torch-fidelity, TF FID weights), pool3 2048-d"
DEFAULT_CLIP_MODEL = "ViT-g-14"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"
CLIP_T_SCALE = 100.0


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def inception_cache_path() -> Path:
    """Where torchmetrics/torch-fidelity look for the Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def inception_weights(path: str | Path | None = None) -> Path:
    """The local Inception-v3 FID weights: ``path`` if given, else the torch hub cache (downloaded if online).

    With ``HF_HUB_OFFLINE=1`` no download is tried; a missing file raises a message naming the file
    and the folder to put it in.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception FID weights {str(path)!r} do not exist; download {INCEPTION_URL}.")
        return path
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    hint = (
        f"The Inception-v3 FID weights are not in the torch hub cache: download {INCEPTION_URL} on a machine "
        f"with internet and put it at {cached} (torch hub checkpoints folder, set by $TORCH_HOME), or pass "
        "its path with --fid-weights."
    )
    if _offline():
        raise FileNotFoundError(hint + " (HF_HUB_OFFLINE is set, so no download was tried.)")
    logger.info("Downloading the Inception-v3 FID weights to %s", cached)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached))
    except OSError as error:
        raise FileNotFoundError(f"{hint} The download failed: {error}") from error
    return cached


def build_fid(
    feature_extractor: nn.Module | None = None, weights: str | Path | None = None
) -> FrechetInceptionDistance:
    """A torchmetrics ``FrechetInceptionDistance`` on uint8 ``(N, 3, H, W)`` images.

    ``feature_extractor`` replaces Inception (it receives the uint8 images and returns ``(N, d)``
    features); otherwise the standard FID Inception with the weights of :func:`inception_weights`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:
        return FrechetInceptionDistance(feature=feature_extractor, normalize=False)
    return FrechetInceptionDistance(
        feature=2048, normalize=False, feature_extractor_weights_path=str(inception_weights(weights))
    )


@dataclass
class ClipModel:
    """An open_clip model with its eval preprocessing and tokenizer, and the names it is reported under."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str


def clip_checkpoint(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED) -> Path:
    """The local file of open_clip weights ``pretrained`` (a tag such as laion2b_s34b_b88k, or a file path).

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
    """The open_clip model from ``checkpoint`` (default: :func:`clip_checkpoint`) with the tag's preprocessing."""
    import open_clip

    checkpoint = checkpoint or clip_checkpoint(model_name, pretrained)
    config = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name,
        pretrained=str(checkpoint),
        device=device,
        image_mean=config.get("mean"),
        image_std=config.get("std"),
        image_interpolation=config.get("interpolation"),
        image_resize_mode=config.get("resize_mode"),
    )
    return ClipModel(model.eval(), preprocess, open_clip.get_tokenizer(model_name), model_name, pretrained)


class ClipTScore:
    """CLIP-T accumulator: 100 x the mean cosine similarity between each image's and its caption's CLIP embedding.

    Unlike torchmetrics' CLIPScore, negative cosines are not clipped to 0, so the mean is unbiased.
    """

    def __init__(self, clip: ClipModel, device: str | torch.device = "cpu") -> None:
        self.clip, self.device = clip, device
        clip.model.to(device)
        self.total, self.count = 0.0, 0

    @torch.no_grad()
    def update(self, pixels: torch.Tensor, captions: Sequence[str]) -> None:
        """``pixels``: images after ``clip.preprocess``, stacked; ``captions``: one per image."""
        tokens = self.clip.tokenizer(list(captions)).to(self.device)
        image_features = nn.functional.normalize(self.clip.model.encode_image(pixels.to(self.device)).float(), dim=-1)
        text_features = nn.functional.normalize(self.clip.model.encode_text(tokens).float(), dim=-1)
        self.total += (image_features * text_features).sum().item()
        self.count += len(captions)

    def compute(self) -> float:
        """The score over all processes of a distributed run (the sums are all-reduced, as torchmetrics does)."""
        stats = torch.tensor([self.total, self.count], dtype=torch.float64, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        total, count = stats.tolist()
        if count == 0:
            raise ValueError("CLIP-T needs at least one image.")
        return CLIP_T_SCALE * total / count
