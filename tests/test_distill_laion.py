"""The LAION-subset preparation: the parquet filter on a tiny parquet (no network, no img2dataset)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gspn_diffusers.distill.laion_subset import SubsetFilter, filter_rows, main

ROWS = [
    # url, caption, width, height, aesthetic, watermark, unsafe, what it tests
    ("http://a/0.jpg", "a cat", 1024, 1024, 7.0, 0.1, 0.0),  # kept
    ("http://a/1.jpg", "a dog", 1536, 1024, 6.6, 0.2, 0.1),  # kept (aspect 1.5)
    ("http://a/2.jpg", "too small", 1000, 1400, 7.0, 0.1, 0.0),  # short side 1000 < 1024
    ("http://a/3.jpg", "panorama", 3000, 1024, 7.0, 0.1, 0.0),  # aspect 2.93 > 2
    ("http://a/4.jpg", "plain", 1024, 1024, 5.0, 0.1, 0.0),  # aesthetic 5 < 6.5
    ("http://a/5.jpg", "stock photo", 1024, 1024, 7.0, 0.9, 0.0),  # watermark
    ("http://a/6.jpg", "unsafe", 1024, 1024, 7.0, 0.1, 0.8),  # NSFW
    ("http://a/7.jpg", "", 1024, 1024, 7.0, 0.1, 0.0),  # no caption
    (None, "no url", 1024, 1024, 7.0, 0.1, 0.0),  # no URL
    ("http://a/0.jpg", "a cat again", 1024, 1024, 7.0, 0.1, 0.0),  # duplicate URL
    ("http://a/10.jpg", "a tall tree", 1024, 2048, 6.5, 0.5, 0.5),  # kept: every limit met exactly
]
COLUMNS = ["URL", "TEXT", "WIDTH", "HEIGHT", "AESTHETIC_SCORE", "pwatermark", "punsafe"]


def _parquet(path: Path) -> Path:
    pd.DataFrame(ROWS, columns=COLUMNS).to_parquet(path)
    return path


def test_filter_keeps_exactly_the_rows_within_every_limit():
    kept, counts = filter_rows(pd.DataFrame(ROWS, columns=COLUMNS), SubsetFilter(min_side=1024))
    assert kept["URL"].tolist() == ["http://a/0.jpg", "http://a/1.jpg", "http://a/10.jpg"]
    assert kept["TEXT"].tolist() == ["a cat", "a dog", "a tall tree"]
    assert counts["input"] == 11 and counts["kept"] == 3
    assert counts["with_url_and_caption"] == 9
    assert counts["min_side"] == 8 and counts["max_aspect_ratio"] == 7


def test_limits_can_be_turned_off_and_samples_capped():
    table = pd.DataFrame(ROWS, columns=COLUMNS)
    loose = SubsetFilter(min_side=512, max_aspect_ratio=4.0, min_aesthetic=None, max_watermark=None, max_unsafe=None)
    kept, _ = filter_rows(table, loose)
    assert len(kept) == 8  # everything with a URL and a caption, duplicates removed
    capped, _ = filter_rows(table, SubsetFilter(**{**loose.__dict__, "max_samples": 3, "seed": 1}))
    again, _ = filter_rows(table, SubsetFilter(**{**loose.__dict__, "max_samples": 3, "seed": 1}))
    assert len(capped) == 3 and capped.equals(again)
    assert set(capped["URL"]) <= set(kept["URL"])


def test_missing_columns_are_named():
    table = pd.DataFrame(ROWS, columns=COLUMNS).drop(columns=["AESTHETIC_SCORE"])
    with pytest.raises(ValueError, match="no aesthetic column"):
        filter_rows(table, SubsetFilter())
    renamed = pd.DataFrame(ROWS, columns=COLUMNS).rename(columns={"URL": "link"})
    with pytest.raises(ValueError, match="no url column"):
        filter_rows(renamed, SubsetFilter())
    kept, _ = filter_rows(renamed, SubsetFilter(min_side=1024), {"url": "link"})
    assert len(kept) == 3


def test_script_filters_a_parquet_and_explains_a_missing_img2dataset(tmp_path):
    source = _parquet(tmp_path / "laion.parquet")
    counts = main([str(source), "--output_dir", str(tmp_path / "out"), "--min_side", "1024", "--filter_only"])
    assert counts["kept"] == 3
    assert pd.read_parquet(tmp_path / "out" / "subset.parquet")["URL"].tolist()[-1] == "http://a/10.jpg"
    script = Path(__file__).resolve().parents[1] / "distill" / "prepare_laion_subset.py"
    result = subprocess.run(
        [sys.executable, str(script), str(source), "--output_dir", str(tmp_path / "dl"), "--min_side", "1024"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if importlib.util.find_spec("img2dataset") is None:
        assert result.returncode == 2
        assert "pip install img2dataset" in result.stderr
        assert "Traceback" not in result.stderr
    assert (tmp_path / "dl" / "subset.parquet").is_file()
