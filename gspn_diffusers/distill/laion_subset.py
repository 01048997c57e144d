"""A curated LAION subset for distillation: filter a parquet of URLs and captions, then download it.

Distilling GSPN needs a few hundred thousand good images, not LAION at large (the peers use about
169k-212k LAION-Aesthetics images). Filtering is done on the metadata first (pandas), so only the
images that will be used are downloaded: a minimum short side (images are trained at 512 px for
SD-1.5 and 1024 px for SD-XL and should not be upscaled), a maximum aspect ratio (a square crop of a
panorama shows little of it), a minimum aesthetic score (LAION-Aesthetics' predictor; 6.5 is the
``6.5+`` subset), optional watermark / NSFW probability limits, a non-empty caption, unique URLs,
and at most ``max_samples`` rows, drawn with a seed. The download is img2dataset's ``download()``
into webdataset shards, the layout the trainer reads (``--train_data_dir shards/``); img2dataset is
imported only then, so the filter works (and is tested) without it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Column names as LAION's parquets spell them (LAION-5B, LAION-Aesthetics V2, COYO), matched case-insensitively.
COLUMNS = {
    "url": ("URL", "url"),
    "caption": ("TEXT", "caption", "text"),
    "width": ("WIDTH", "original_width"),
    "height": ("HEIGHT", "original_height"),
    "aesthetic": ("AESTHETIC_SCORE", "aesthetic", "aesthetic_score"),
    "watermark": ("pwatermark", "watermark_score"),
    "unsafe": ("punsafe", "nsfw_score"),
}


@dataclass(frozen=True)
class SubsetFilter:
    """Which rows of a LAION parquet make the subset (``None`` turns a limit off)."""

    min_side: int = 512
    max_aspect_ratio: float = 2.0
    min_aesthetic: float | None = 6.5
    max_watermark: float | None = 0.5
    max_unsafe: float | None = 0.5
    max_samples: int | None = None
    seed: int = 0


def find_column(columns: Sequence[str], kind: str, override: str | None = None) -> str | None:
    """The column of ``kind`` (see :data:`COLUMNS`), or ``override`` if given (which must exist)."""
    if override is not None:
        if override not in columns:
            raise ValueError(
                f"Column {override!r} (for the {kind}) is not in the parquet; its columns: {list(columns)}."
            )
        return override
    lowered = {c.lower(): c for c in columns}
    return next((lowered[n.lower()] for n in COLUMNS[kind] if n.lower() in lowered), None)


def filter_rows(table: Any, limits: SubsetFilter, overrides: dict[str, str] | None = None) -> tuple[Any, dict]:
    """Apply ``limits`` to a pandas DataFrame; returns the kept rows (URL, caption and size columns) and counts.

    A limit whose column the parquet lacks is an error (pass ``None`` to skip it), so a subset is
    never silently less curated than asked.
    """
    overrides = overrides or {}
    columns = {kind: find_column(list(table.columns), kind, overrides.get(kind)) for kind in COLUMNS}
    for kind in ("url", "caption"):
        if columns[kind] is None:
            raise ValueError(
                f"The parquet has no {kind} column (looked for {', '.join(COLUMNS[kind])}; columns: "
                f"{list(table.columns)}); name it with --{kind}_col."
            )
    size_limit = limits.min_side or limits.max_aspect_ratio or None
    needs = {"width": size_limit, "height": size_limit, "aesthetic": limits.min_aesthetic}
    needs.update(watermark=limits.max_watermark, unsafe=limits.max_unsafe)
    for kind, limit in needs.items():
        if limit is not None and columns[kind] is None:
            raise ValueError(
                f"A {kind} limit was asked for but the parquet has no {kind} column (looked for "
                f"{', '.join(COLUMNS[kind])}); name it with --{kind}_col or turn the limit off."
            )
    counts = {"input": len(table)}
    keep = table[columns["url"]].notna() & table[columns["caption"]].fillna("").astype(str).str.strip().ne("")
    counts["with_url_and_caption"] = int(keep.sum())
    if size_limit is not None:
        width, height = table[columns["width"]], table[columns["height"]]
        short, long = width.where(width < height, height), width.where(width >= height, height)
        if limits.min_side:
            keep &= short >= limits.min_side
            counts["min_side"] = int(keep.sum())
        if limits.max_aspect_ratio:
            keep &= long <= limits.max_aspect_ratio * short
            counts["max_aspect_ratio"] = int(keep.sum())
    for kind, limit, above in (
        ("aesthetic", limits.min_aesthetic, True),
        ("watermark", limits.max_watermark, False),
        ("unsafe", limits.max_unsafe, False),
    ):
        if limit is not None:
            values = table[columns[kind]]
            keep &= (values >= limit) if above else (values <= limit)
            counts[kind] = int(keep.sum())
    kept = table[keep].drop_duplicates(subset=columns["url"])
    counts["unique_urls"] = len(kept)
    if limits.max_samples is not None and len(kept) > limits.max_samples:
        kept = kept.sample(n=limits.max_samples, random_state=limits.seed).sort_index()
    counts["kept"] = len(kept)
    wanted = [columns[k] for k in ("url", "caption", "width", "height", "aesthetic") if columns[k] is not None]
    kept = kept[wanted].rename(columns={columns["url"]: "URL", columns["caption"]: "TEXT"})
    return kept.reset_index(drop=True), counts


def filter_parquets(
    inputs: Sequence[Path], output: Path, limits: SubsetFilter, overrides: dict[str, str] | None = None
) -> dict:
    """Read one or more parquet files, filter them together and write the subset as one parquet."""
    import pandas as pd

    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"Parquet file(s) not found: {', '.join(missing)}.")
    table = pd.concat([pd.read_parquet(p) for p in inputs], ignore_index=True)
    kept, counts = filter_rows(table, limits, overrides)
    output.parent.mkdir(parents=True, exist_ok=True)
    kept.to_parquet(output, index=False)
    logger.info("Kept %d of %d rows -> %s (%s)", counts["kept"], counts["input"], output, counts)
    return counts


def download(parquet: Path, output_dir: Path, image_size: int, processes: int, threads: int) -> None:
    """img2dataset's download into webdataset shards, images resized (only down) to ``image_size`` short side."""
    try:
        from img2dataset import download as img2dataset_download
    except ImportError as error:
        raise ImportError(
            "Downloading needs img2dataset, which is not installed: pip install img2dataset (or run with "
            "--filter_only and download the filtered parquet yourself)."
        ) from error
    img2dataset_download(
        url_list=str(parquet),
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        output_format="webdataset",
        output_folder=str(output_dir),
        image_size=image_size,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        processes_count=processes,
        thread_count=threads,
        save_additional_columns=["AESTHETIC_SCORE"] if _has_column(parquet, "AESTHETIC_SCORE") else None,
        enable_wandb=False,
    )


def _has_column(parquet: Path, name: str) -> bool:
    import pyarrow.parquet as pq

    return name in pq.read_schema(parquet).names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parquet", nargs="+", type=Path, help="LAION metadata parquet file(s): URL, TEXT, ...")
    parser.add_argument("--output_dir", type=Path, required=True, help="Webdataset shards (and subset.parquet).")
    parser.add_argument("--min_side", type=int, default=512, help="Minimum short side in pixels (1024 for SD-XL).")
    parser.add_argument("--max_aspect_ratio", type=float, default=2.0, help="Maximum long/short side ratio.")
    parser.add_argument("--min_aesthetic", type=float, default=6.5, help="Minimum aesthetic score (negative: off).")
    parser.add_argument("--max_watermark", type=float, default=0.5, help="Maximum watermark probability (>1: off).")
    parser.add_argument("--max_unsafe", type=float, default=0.5, help="Maximum NSFW probability (>1: off).")
    parser.add_argument("--max_samples", type=int, default=169_000, help="At most this many images (0: all).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the choice among more rows than --max_samples.")
    for kind in COLUMNS:
        parser.add_argument(f"--{kind}_col", default=None, help=f"Name of the {kind} column (default: detected).")
    parser.add_argument("--image_size", type=int, default=None, help="Stored short side (default: --min_side).")
    parser.add_argument("--processes", type=int, default=16, help="img2dataset processes.")
    parser.add_argument("--threads", type=int, default=64, help="img2dataset threads per process.")
    parser.add_argument("--filter_only", action="store_true", help="Write subset.parquet and stop (no download).")
    args = parser.parse_args(argv)
    for name in ("min_side", "processes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.max_aspect_ratio < 1:
        parser.error("--max_aspect_ratio is long side / short side, at least 1.")
    return args


def limits_from_args(args: argparse.Namespace) -> SubsetFilter:
    return SubsetFilter(
        min_side=args.min_side,
        max_aspect_ratio=args.max_aspect_ratio,
        min_aesthetic=args.min_aesthetic if args.min_aesthetic >= 0 else None,
        max_watermark=args.max_watermark if args.max_watermark <= 1 else None,
        max_unsafe=args.max_unsafe if args.max_unsafe <= 1 else None,
        max_samples=args.max_samples or None,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Filter, write ``output_dir/subset.parquet`` and (unless ``--filter_only``) download the shards."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    overrides = {kind: getattr(args, f"{kind}_col") for kind in COLUMNS if getattr(args, f"{kind}_col")}
    subset = args.output_dir / "subset.parquet"
    counts = filter_parquets(args.parquet, subset, limits_from_args(args), overrides)
    if not args.filter_only:
        download(subset, args.output_dir, args.image_size or args.min_side, args.processes, args.threads)
    return counts


def cli(argv: Sequence[str] | None = None) -> int:
    """The script's entry point: a user error (missing file or column, no img2dataset) is one message."""
    try:
        main(argv)
    except (ValueError, OSError, ImportError) as error:
        logger.error("%s", error)
        return 2
    return 0
