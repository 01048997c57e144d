"""Named evaluation protocols: every choice that moves FID / CLIP-T, set at once so that numbers are comparable.

``linfusion`` is LinFusion's published evaluation code (``src/eval``): 30k COCO-2014 captions
(its ``assets/captions.txt``, caption i with seed i), the model's native size, 25 steps, guidance
7.5; FID by clean-fid against the whole val2014 folder, both sides center-cropped to a square and
resized to 256 with Lanczos; CLIP-T as the mean cosine of ViT-g-14 ``laion2b_s12b_b42k`` on the
same 256 px square, with "A photo depicts " before each caption. ``gspn-paper`` is the same at
1024x1024: the GSPN paper reports SD-1.5 at 1024 (FID 30.86, CLIP-T 0.307) beside LinFusion's
numbers without spelling out its own settings, so LinFusion's are assumed. Explicit settings
override a preset; the overrides are recorded in ``results.json``.
"""

from __future__ import annotations

from typing import Any

# The vocabulary of the settings (kept here, import-free, so that the CLI's --help stays fast).
FID_BACKENDS = ("clean-fid", "torchmetrics")
FID_RESIZE_FILTERS = ("bicubic", "lanczos")
REFERENCE_SETS = ("selected", "folder")

_LINFUSION: dict[str, Any] = {
    "height": None,
    "width": None,
    "num_inference_steps": 25,
    "guidance_scale": 7.5,
    "num_captions": 30000,
    "clip_model": "ViT-g-14",
    "clip_pretrained": "laion2b_s12b_b42k",
    "clip_prefix": "A photo depicts ",
    "clip_image_size": 256,
    "fid_backend": "clean-fid",
    "fid_size": 256,
    "fid_resize": "lanczos",
    "fid_reference": "folder",
}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "gspn-paper": {**_LINFUSION, "height": 1024, "width": 1024},
    "linfusion": _LINFUSION,
}


def resolve_protocol(protocol: str | None, explicit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings of ``protocol`` with the ``explicit`` ones on top, and the overrides that changed a preset value.

    Returns ``(settings, overrides)`` where ``overrides`` maps each overridden key to
    ``{"protocol": preset value, "used": explicit value}``. Without a protocol, ``explicit`` is returned.
    """
    if protocol is None:
        return dict(explicit), {}
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}.")
    preset = PROTOCOLS[protocol]
    overrides = {
        key: {"protocol": preset[key], "used": value}
        for key, value in explicit.items()
        if key in preset and value != preset[key]
    }
    return {**preset, **explicit}, overrides
