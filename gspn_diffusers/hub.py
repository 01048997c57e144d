"""Where GSPN weights live: a local folder or a Hugging Face hub repo, as PEFT adapters do.

``load_gspn("org/name")`` fetches only the two checkpoint files with ``snapshot_download`` (or reads
them from the hub cache when offline); ``save_gspn(..., push_to_hub=True)`` uploads the folder with
its model card. This module imports nothing heavy, so the command line can check names early.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import GSPNFileNotFoundError, GSPNUserError

CONFIG_NAME = "gspn_config.json"
WEIGHTS_NAME = "gspn_weights.safetensors"
MODEL_CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` (one slash, hub characters, not starting with ``.``/``/``/``~``): may be a hub repo."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def holds_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` already holds (part of) a GSPN checkpoint that a save would replace."""
    return any((Path(directory) / name).exists() for name in CHECKPOINT_FILES)


def resolve_checkpoint(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local folder of a GSPN checkpoint: ``name_or_path`` itself when it is a folder, else the hub snapshot
    of the repo ``org/name`` (downloaded, or from the cache when ``HF_HUB_OFFLINE=1``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise GSPNUserError(f"GSPN weights {str(name_or_path)!r} is a file; pass the folder that holds {CONFIG_NAME}.")
    name = str(name_or_path)
    if not looks_like_repo_id(name):
        raise GSPNFileNotFoundError(
            f"GSPN weights folder {name!r} does not exist (no such folder, relative to {Path.cwd()}); pass the "
            "folder written by save_gspn or `gspn-diffusers convert --output`, or a hub repo id org/name."
        )
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=list(CHECKPOINT_FILES)))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
        where = "in the Hugging Face cache (HF_HUB_OFFLINE=1: no download)" if is_offline_mode() else "on the hub"
        raise GSPNFileNotFoundError(
            f"GSPN weights {name!r}: no such local folder (relative to {Path.cwd()}) and no such repo {where} "
            f"({type(error).__name__}). Pass a folder written by save_gspn, or a hub repo that holds {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}."
        ) from error
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise GSPNFileNotFoundError(
            f"Hub repo {name!r} (snapshot {folder}) has no {' or '.join(missing)}: it is not a GSPN checkpoint."
        )
    return folder


def check_push_args(repo_id: str | None) -> str:
    """The repo id to push to, checked before anything is written (a bad id or an offline machine fails early)."""
    from huggingface_hub import is_offline_mode
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise GSPNUserError("push_to_hub=True needs repo_id='org/name' (the hub repo to create or update).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise GSPNUserError(f"repo_id {repo_id!r} is not a valid hub repo id: {error}") from error
    if is_offline_mode():
        raise GSPNUserError("push_to_hub=True needs the network, but HF_HUB_OFFLINE is set; unset it to upload.")
    return repo_id


def push_checkpoint(
    directory: Path, repo_id: str, private: bool | None = None, token: str | None = None, commit_message: str = ""
) -> str:
    """Create ``repo_id`` if needed and upload the checkpoint files and model card; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, private=private, token=token, exist_ok=True)
    commit = upload_folder(
        repo_id=repo.repo_id,
        folder_path=directory,
        allow_patterns=[*CHECKPOINT_FILES, MODEL_CARD_NAME],
        commit_message=commit_message or "Upload GSPN weights",
        token=token,
    )
    return str(getattr(commit, "commit_url", commit))


def model_card(
    config: dict[str, Any],
    num_layers: int,
    family: str,
    base_model: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """The README.md saved beside the weights: YAML metadata the hub indexes, then what the weights are.

    ``training`` (e.g. ``{"dataset": "laion-169k", "steps": 20000}``) and ``metrics`` (e.g. ``{"FID": 21.3}``)
    are written when known; freshly converted weights say they are not distilled. ``family`` is the preset family
    of the UNet (``sd15`` or ``sdxl``).
    """
    tags = ["gspn", "diffusers", "text-to-image", "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion"]
    meta = ["---", "library_name: gspn-diffusers"]
    if base_model and looks_like_repo_id(base_model) and not Path(base_model).expanduser().exists():
        meta.append(f"base_model: {base_model}")
    meta += ["tags:", *(f"- {tag}" for tag in tags), "---"]
    base_name = f"`{base_model}`" if base_model else "the base model"
    lines = [
        *meta,
        "",
        "# GSPN weights for Diffusers",
        "",
        f"Every UNet self-attention (`attn1`, {num_layers} layers) of {base_name} is "
        "replaced by a GSPN module (Generalized Spatial Propagation Network). Only the GSPN weights are here; "
        "load them into the base pipeline:",
        "",
        "```python",
        "import gspn_diffusers",
        'gspn_diffusers.load_gspn(pipe, "<this repo or folder>")',
        "```",
        "",
        "## GSPN config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Training",
        "",
    ]
    if training:
        lines += [f"- {key}: {value}" for key, value in training.items()]
    else:
        lines.append("Not recorded: freshly converted weights are initialised from Q/K/V and not distilled.")
    lines += ["", "## Metrics", ""]
    lines += [f"- {key}: {value}" for key, value in metrics.items()] if metrics else ["Not measured."]
    return "\n".join(lines) + "\n"
