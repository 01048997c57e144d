"""Write a file under a temporary name and rename it into place, so that an interrupted or failed
write never leaves a half-written file (or destroys the previous one) at the final path."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder and suffix, so format-by-extension writers work);
    it replaces ``path`` when the block succeeds and is removed when it fails."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
