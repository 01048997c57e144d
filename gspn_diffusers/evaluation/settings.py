"""What defines an evaluation run (:class:`EvaluationConfig`) and the checks of its settings before anything loads.

Its own module, below both the runner and the scoring pass, so neither imports the other to know the settings
(they formed an import circle through ``runner``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GSPNUserError
from .clip_t import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from .protocols import FID_BACKENDS, FID_RESIZE_FILTERS, PROTOCOLS, REFERENCE_SETS, resolve_protocol


@dataclass
class EvaluationConfig:
    """What defines an evaluation run; everything here is recorded in ``results.json``.

    Captions come from a COCO ``annotation_file`` (``num_captions`` images picked by ``seed``,
    default 30000) or a ``captions_file`` (one a line, caption i with seed i, default all lines).
    ``image_dir`` holds the FID reference images: the COCO images of the selected captions
    (``fid_reference="selected"``) or the whole folder (``"folder"``); ``None`` picks ``"selected"`` for
    COCO annotations and ``"folder"`` for a captions file (which names no images). ``height``/``width``
    default to the model's native size. :meth:`from_protocol` fills the settings of a named protocol.
    """

    annotation_file: str | None
    image_dir: str | None
    output_dir: str
    captions_file: str | None = None
    num_captions: int | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    safety_checker: bool = False
    batch_size: int = 1
    metric_batch_size: int = 32
    num_workers: int = 0
    fid_backend: str = "torchmetrics"
    fid_size: int = 299
    fid_resize: str = "bicubic"
    fid_reference: str | None = None
    fid_weights: str | None = None
    fid_cache: str | None = None
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED
    clip_prefix: str = ""
    clip_image_size: int | None = None
    protocol: str | None = None
    protocol_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_protocol(
        cls, protocol: str | None, annotation_file: str | None, image_dir: str | None, output_dir: str, **settings
    ) -> EvaluationConfig:
        """A config with the settings of ``protocol`` (:mod:`.protocols`); ``settings`` override them (recorded)."""
        values, overrides = resolve_protocol(protocol, settings)
        return cls(annotation_file, image_dir, output_dir, **values, protocol=protocol, protocol_overrides=overrides)

    def __post_init__(self) -> None:
        if self.fid_reference is None:
            self.fid_reference = "folder" if self.captions_file is not None else "selected"

    def check(self) -> None:
        """Refuse impossible settings with a message that says what to pass, before anything is loaded."""
        problems = []
        if (self.annotation_file is None) == (self.captions_file is None):
            problems.append("pass exactly one caption source: --annotations (COCO) or --captions FILE")
        if self.num_captions is not None and self.num_captions < 1:
            problems.append(f"--num-captions must be at least 1, got {self.num_captions}")
        if self.num_inference_steps < 1:
            problems.append(f"--steps must be at least 1, got {self.num_inference_steps}")
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and (value < 8 or value % 8):
                problems.append(f"{name} must be a positive multiple of 8, got {value}")
        for name, value in (("--batch-size", self.batch_size), ("--metric-batch-size", self.metric_batch_size)):
            if value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        if self.num_workers < 0:
            problems.append(f"--num-workers must be 0 or more, got {self.num_workers}")
        if self.fid_size < 16:
            problems.append(f"--fid-size must be at least 16 pixels, got {self.fid_size}")
        if self.clip_image_size is not None and self.clip_image_size < 16:
            problems.append(f"--clip-image-size must be at least 16 pixels, got {self.clip_image_size}")
        for name, value, choices in (
            ("--fid-backend", self.fid_backend, FID_BACKENDS),
            ("--fid-resize", self.fid_resize, FID_RESIZE_FILTERS),
            ("--fid-reference", self.fid_reference, REFERENCE_SETS),
        ):
            if value not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            problems.append(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if Path(self.output_dir).expanduser().is_file():
            problems.append(f"--output-dir {self.output_dir} is a file; pass a folder")
        if problems:
            raise GSPNUserError("Invalid evaluation settings: " + "; ".join(problems) + ".")
