"""Loading the pipelines the command line works on: a hub name, a local folder, or a built-in tiny model."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .convert import get_unet
from .errors import GSPNFileNotFoundError, GSPNUserError
from .hub import looks_like_repo_id
from .tiny import TINY_KINDS, tiny_pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is fp16 on a GPU (what SD checkpoints ship) and fp32 on the CPU (where fp16 is slow)."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise GSPNUserError(f"Unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def native_size(pipe: DiffusionPipeline) -> int:
    """The pixel size the UNet was trained at (512 for SD-1.5, 1024 for SD-XL): its latent sample size x the VAE
    factor. Generation defaults to it, and above it the high-resolution pipeline takes over."""
    size = get_unet(pipe).config.sample_size
    return (size if isinstance(size, int) else max(size)) * pipe.vae_scale_factor


def check_model_source(model: str) -> Path | None:
    """The local folder ``model`` names, or None for a hub name that may be cached or downloaded.

    A name that cannot be a hub id (``./x``, ``a/b/c``, ``~/x``) and does not exist is "no such folder" at once; a
    hub id that is not cached on an offline machine is refused before Diffusers' own, less helpful, error.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise GSPNFileNotFoundError(
                f"{model!r} is a local path but not a Diffusers pipeline folder (no model_index.json); pass the "
                "folder saved by `pipe.save_pretrained(...)` or a hub name such as "
                "stabilityai/stable-diffusion-xl-base-1.0."
            )
        return path
    where = f"no such folder (relative to {Path.cwd()})"
    if model.startswith((".", "/", "~")) or ("/" in model and not looks_like_repo_id(model)):
        raise GSPNFileNotFoundError(f"--model {model!r}: {where}; pass a Diffusers pipeline folder or a hub name.")
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if is_offline_mode() and not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        raise GSPNFileNotFoundError(
            f"--model {model!r}: {where}, and no pipeline of that name in the Hugging Face cache (HF_HUB_OFFLINE=1, "
            "so nothing is downloaded); pass a local pipeline folder, or download the model first."
        )
    return None


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
        raise GSPNUserError("Pass exactly one of a model (hub name or local folder) or a tiny model kind.")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if tiny is not None:
        if tiny not in TINY_KINDS:
            raise GSPNUserError(f"Unknown tiny model {tiny!r}; expected one of {', '.join(TINY_KINDS)}.")
        pipe = tiny_pipeline(tiny).to(device)
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    path = check_model_source(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path or model), torch_dtype=torch_dtype)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GSPNUserError(
            f"Could not load the pipeline {model!r} ({reason}). It is neither a local pipeline folder (relative to "
            f"{Path.cwd()}) nor a hub model that could be downloaded (offline machines need it in the cache or on "
            "disk)."
        ) from error
    return pipe.to(device)
