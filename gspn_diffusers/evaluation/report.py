"""Evaluation results: the JSON document of a run, its short table, and the comparison of two runs."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .files import write_text_atomically

RESULTS_NAME = "results.json"
RESULTS_FORMAT = "gspn-diffusers-evaluation"
RESULTS_VERSION = 2  # 2: CLIP-T as a mean cosine (version 1 stored 100 x the cosine)
_PACKAGES = (
    "gspn-diffusers",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "torchmetrics",
    "torch-fidelity",
    "clean-fid",
    "open_clip_torch",
)
# metric -> (label, whether lower is better, decimals shown: CLIP-T differences live in the third decimal)
METRICS = {"fid": ("FID", True, 3), "clip_t": ("CLIP-T", False, 4)}
_SETTING_ROWS = ("protocol", "model", "gspn_weights", "num_captions", "resolution", "steps", "guidance_scale", "seed")


def library_versions() -> dict[str, str | None]:
    def _version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: _version(name) for name in _PACKAGES}


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    path = Path(output_dir) / RESULTS_NAME
    write_text_atomically(path, json.dumps(results, indent=2) + "\n")
    return path


def load_results(run: str | Path) -> dict[str, Any]:
    """The results of a run, given its folder or its ``results.json``."""
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / RESULTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No evaluation results at {str(path)!r}; pass a run folder written by `evaluate`.")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a gspn-diffusers evaluation results file.")
    clip_t = results.get("metrics", {}).get("clip_t", {})
    if results.get("format_version", 1) == 1 and isinstance(clip_t.get("value"), float):
        clip_t["value"] /= 100.0  # version 1 stored 100 x the cosine: put it on today's scale
        clip_t["scale"] = "cosine (converted from a version 1 file)"
    return results


def _cell(value: Any, decimals: int = 3) -> str:
    """Metrics with their decimals; settings as given."""
    if value is None:
        return "-"
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def _setting(results: dict[str, Any], key: str) -> Any:
    settings = results["settings"]
    if key == "resolution":
        return f"{settings['width']}x{settings['height']}"
    if key == "gspn_weights":
        return "original attention" if settings.get("original") else settings.get("gspn_weights")
    return settings.get(key)


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def format_table(results: dict[str, Any]) -> str:
    """A short two-column table: the metrics, then the settings that define the run."""
    rows = [
        [label, _cell(results["metrics"].get(key, {}).get("value"), decimals)]
        for key, (label, _, decimals) in METRICS.items()
    ]
    rows += [[key, str(_setting(results, key))] for key in _SETTING_ROWS]
    return _render(["", "value"], rows)


def format_comparison(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Two runs side by side with the metric deltas (B - A); settings that differ are marked with ``*``."""
    rows = []
    for key, (label, lower_is_better, decimals) in METRICS.items():
        va, vb = (r["metrics"].get(key, {}).get("value") for r in (a, b))
        delta = None if va is None or vb is None else round(vb - va, decimals)  # as shown: +0.000 is neither
        better = "" if not delta else " (better)" if (delta < 0) == lower_is_better else " (worse)"
        rows.append(
            [
                f"{label} ({'lower' if lower_is_better else 'higher'} is better)",
                _cell(va, decimals),
                _cell(vb, decimals),
                (f"{delta:+.{decimals}f}" + better) if delta is not None else "-",
            ]
        )
    for key in _SETTING_ROWS:
        sa, sb = _setting(a, key), _setting(b, key)
        rows.append([key + (" *" if sa != sb else ""), str(sa), str(sb), ""])
    for key, field in (("clip_t", "model"), ("clip_t", "caption_prefix"), ("fid", "model"), ("fid", "preprocessing")):
        ma, mb = (r["metrics"].get(key, {}).get(field) for r in (a, b))
        if ma != mb:
            rows.append([f"{METRICS[key][0]} {field} *", _cell(ma), _cell(mb), "not comparable"])
    return _render(["", names[0], names[1], "B - A"], rows)
