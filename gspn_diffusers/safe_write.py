"""Write a file under a temporary name and rename it into place, so that an interrupted or failed
write never leaves a half-written file (or destroys the previous one) at the final path.

The temporary name is unique (``tempfile.mkstemp``: two processes or threads writing the same file, such as
two evaluations sharing the FID reference cache, never write into one temporary file), and the file that is
renamed into place gets the permissions a new file would get from ``open()`` (``0o666`` less the umask: 0644
usually), not the 0600 of mkstemp or of a writer's own temporary file (safetensors' ``save_file``), so weights
and results written for a team stay readable by it. A write that runs out of space raises
:class:`~.errors.GSPNDiskFullError`, which names the folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import GSPNDiskFullError, is_disk_full


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask (read without changing it
    where Linux says it, else by setting and restoring it, which is not thread-safe but takes nanoseconds)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_beside(path: str | Path) -> Path:
    """A new, empty, uniquely named hidden file beside ``path`` (same folder, so the final rename is atomic; same
    suffix, so format-by-extension writers work), with the permissions of a new file (see :func:`new_file_mode`)."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    try:
        os.fchmod(descriptor, new_file_mode())
    finally:
        os.close(descriptor)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block succeeds and is removed when it
    fails. A failure for lack of space (``OSError`` ENOSPC, or a library's wrapper of it) becomes
    :class:`~.errors.GSPNDiskFullError` naming the folder; the file at ``path`` is then as it was."""
    path = Path(path)
    temporary: Path | None = None
    try:
        temporary = temporary_beside(path)
        yield temporary
        # Again after the writer: some replace the file they are given by their own temporary file (safetensors
        # writes through Rust's tempfile, mode 0600), so the mode set at creation may be gone.
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    except Exception as error:
        if is_disk_full(error) and not isinstance(error, GSPNDiskFullError):
            raise GSPNDiskFullError(path) from error
        raise
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
