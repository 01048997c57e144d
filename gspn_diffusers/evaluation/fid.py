"""FID: image preprocessing, the Inception backends (clean-fid or torchmetrics), feature statistics, the distance.

Every image, real or generated, is center-cropped to a square and resized to ``--fid-size`` (with
``--fid-resize``), then handed to a backend that applies its own preprocessing and Inception:

- ``clean-fid``: clean-fid's "clean" resize to 299 (PIL bicubic on float channels) and its
  TensorFlow-ported Inception (``inception-2015-12-05.pt``), as LinFusion evaluates.
- ``torchmetrics``: torchmetrics' Inception (torch-fidelity's port of the same network, weights
  ``weights-inception-2015-12-05-6726825d.pth``), which resizes internally (bilinear).

Both produce 2048-d pool features. Statistics are float64 sums (all-reduced across processes), and
the Frechet distance is computed once, here, for every backend. The backend's weights are loaded
and run on one image before any generation, so a missing or junk file stops the run at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .protocols import FID_BACKENDS, FID_RESIZE_FILTERS

logger = logging.getLogger(__name__)

RESIZE_FILTERS = dict(zip(FID_RESIZE_FILTERS, (Image.Resampling.BICUBIC, Image.Resampling.LANCZOS), strict=True))
# backend -> (file name, download URL) of its Inception weights
FID_WEIGHTS = {
    "clean-fid": (
        "inception-2015-12-05.pt",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    ),
    "torchmetrics": (
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    ),
}
_INCEPTION_SIZE = 299


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def fid_weights_cache_path(backend: str = "torchmetrics") -> Path:
    """Where a backend's Inception weights are looked for: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS[backend][0]


def fid_weights(backend: str = "torchmetrics", path: str | Path | None = None) -> Path:
    """The local Inception weights of ``backend``: ``path`` if given, else the torch hub cache (downloaded if online).

    With ``HF_HUB_OFFLINE=1`` no download is tried; a missing file raises a message naming the file,
    its URL and the folder to put it in.
    """
    name, url = FID_WEIGHTS[backend]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FID weights {str(path)!r} do not exist; download {url} ({backend} backend).")
        return path
    cached = fid_weights_cache_path(backend)
    if cached.is_file():
        return cached
    hint = (
        f"The Inception weights of the {backend} FID backend ({name}) are not in the torch hub cache: download "
        f"{url} on a machine with internet and put it at {cached} (torch hub checkpoints folder, set by "
        "$TORCH_HOME), or pass its path with --fid-weights."
    )
    if _offline():
        raise FileNotFoundError(hint + " (HF_HUB_OFFLINE is set, so no download was tried.)")
    logger.info("Downloading the %s Inception weights to %s", backend, cached)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached))
    except OSError as error:
        raise FileNotFoundError(f"{hint} The download failed: {error}") from error
    return cached


def fid_image(image: Image.Image, size: int, resize: str = "bicubic") -> Image.Image:
    """The largest centered square of ``image``, resized to ``size`` x ``size`` (antialiased ``resize`` filter)."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), RESIZE_FILTERS[resize])


def uint8_tensor(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` uint8: what torchmetrics' Inception (and the test feature extractors) take."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class FidBackend:
    """An Inception (or test) feature model and the per-image preparation it expects.

    ``prepare`` runs in the data loader workers (PIL image at the FID size -> tensor); ``model``
    maps a batch of prepared tensors to ``(N, D)`` features.
    """

    name: str
    model: nn.Module
    prepare: Callable[[Image.Image], torch.Tensor]
    weights: Path | None
    description: str


class _CleanFidInception(nn.Module):
    """clean-fid's Inception (its TorchScript port of the TF FID network) on clean-resized float images."""

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W

        name = FID_WEIGHTS["clean-fid"][0]
        if weights.name == name:
            self.inception = InceptionV3W(str(weights.parent), download=False)
        else:  # clean-fid loads <folder>/<its file name>: show it the file under that name
            with tempfile.TemporaryDirectory() as folder:
                os.symlink(weights.resolve(), Path(folder) / name)
                self.inception = InceptionV3W(folder, download=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception(images)


def _clean_resize(image: Image.Image) -> torch.Tensor:
    from cleanfid.resize import build_resizer

    resized = build_resizer("clean")(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def load_fid_backend(backend: str = "torchmetrics", weights: str | Path | None = None) -> FidBackend:
    """The backend's Inception from its weights file, checked on one image (on the CPU).

    A file that is not the expected Inception weights raises a ``ValueError`` naming the file.
    """
    if backend not in FID_BACKENDS:
        raise ValueError(f"Unknown FID backend {backend!r}; expected one of {', '.join(FID_BACKENDS)}.")
    path = fid_weights(backend, weights)
    try:
        if backend == "clean-fid":
            model: nn.Module = _CleanFidInception(path)
            prepare, probe = _clean_resize, torch.zeros(1, 3, _INCEPTION_SIZE, _INCEPTION_SIZE)
            description = "clean-fid Inception-v3 (TF FID weights, TorchScript), clean resize to 299, pool3 2048-d"
        else:
            from torchmetrics.image.fid import NoTrainInceptionV3

            model = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path))
            prepare, probe = uint8_tensor, torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
            description = "torchmetrics Inception-v3 (torch-fidelity, TF FID weights), bilinear to 299, pool3 2048-d"
        with torch.no_grad():
            shape = tuple(model.eval()(probe).shape)
    except Exception as error:  # any failure to load or run the file means a bad file: say which one
        raise ValueError(
            f"{path} is not the {backend} Inception weights ({type(error).__name__}: {error}); download "
            f"{FID_WEIGHTS[backend][1]} again and pass it with --fid-weights."
        ) from error
    if shape != (1, 2048):
        raise ValueError(f"{path}: the {backend} Inception gives features of shape {shape}, expected (1, 2048).")
    return FidBackend(backend, model, prepare, path, description)


def custom_fid_backend(feature_extractor: nn.Module) -> FidBackend:
    """A backend around a feature model that takes uint8 ``(N, 3, S, S)`` images (tests, smoke runs)."""
    return FidBackend("custom", feature_extractor, uint8_tensor, None, type(feature_extractor).__name__)


def feature_dim(backend: FidBackend, size: int, device: str | torch.device) -> int:
    """The width of the backend's features (so a process with no images can still join the all-reduce)."""
    with torch.no_grad():
        return backend.model(backend.prepare(Image.new("RGB", (size, size)))[None].to(device)).shape[1]


class GaussianStats:
    """Running float64 sums of features (count, sum, sum of outer products): mean and covariance of a set."""

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        features = features.reshape(features.shape[0], -1).to(self.sum.device, torch.float64)
        self.count += features.shape[0]
        self.sum += features.sum(0)
        self.outer += features.T @ features

    def all_reduce(self) -> None:
        """Sum the statistics of every process of a distributed run (no-op in a single process)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in (self.count, self.sum, self.outer):
                torch.distributed.all_reduce(tensor)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Mean, unbiased covariance (as numpy's ``np.cov``) and the number of samples."""
        n = int(self.count.item())
        if n < 2:
            raise ValueError(f"FID needs at least 2 images on each side, got {n}.")
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean.cpu().numpy(), cov.cpu().numpy(), n


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``; the trace of the root is the sum of the square roots
    of the eigenvalues of ``S1 S2`` (real for covariances), which stays defined when a covariance is
    singular (few samples), unlike ``scipy.linalg.sqrtm``."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    sigma1, sigma2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace)
