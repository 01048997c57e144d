"""Loading the pipelines the command line works on: a hub name, a local folder, or a built-in tiny model."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .convert import get_unet
from .tiny import TINY_KINDS, tiny_pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is fp16 on a GPU (what SD checkpoints ship) and fp32 on the CPU (where fp16 is slow)."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def native_size(pipe: DiffusionPipeline) -> int:
    """The pixel size the UNet was trained at (512 for SD-1.5, 1024 for SD-XL): its latent sample size x the VAE
    factor. Generation defaults to it, and above it the high-resolution pipeline takes over."""
    size = get_unet(pipe).config.sample_size
    return (size if isinstance(size, int) else max(size)) * pipe.vae_scale_factor


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def load_pipeline(
    model: str | None = None,
    tiny: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> DiffusionPipeline:
    """A text-to-image pipeline from a hub name or local folder (``model``), or a tiny one (``tiny``).

    Fails with a message that says what to pass when the folder does not exist or the name can
    be neither found locally nor downloaded.
    """
    if (model is None) == (tiny is None):
        raise ValueError("Pass exactly one of a model (hub name or local folder) or a tiny model kind.")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if tiny is not None:
        if tiny not in TINY_KINDS:
            raise ValueError(f"Unknown tiny model {tiny!r}; expected one of {', '.join(TINY_KINDS)}.")
        pipe = tiny_pipeline(tiny).to(device)
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{model!r} is a local path but not a Diffusers pipeline folder (no model_index.json); pass the "
                "folder saved by `pipe.save_pretrained(...)` or a hub name such as "
                "stabilityai/stable-diffusion-xl-base-1.0."
            )
    elif _looks_like_path(model):
        raise FileNotFoundError(f"Model folder {model!r} does not exist.")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, torch_dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise OSError(
            f"Could not load the pipeline {model!r}: {error}\nIt is neither a local pipeline folder nor a model in "
            "the Hugging Face cache that could be downloaded (offline machines need the weights in the cache or on "
            "disk)."
        ) from error
    return pipe.to(device)
