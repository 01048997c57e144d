"""The exceptions that mean "the user passed something wrong", and the one-line words for the failures a user meets.

The command line prints these as one line and exits with status 2; anything else keeps its
traceback. They subclass the builtin a caller would expect (``ValueError``, ``FileNotFoundError``,
``FileExistsError``, ``OSError``), so ``except ValueError`` around the library keeps working.

:func:`failure_message` is the command line's one place that turns what the machine does to a run (out of
memory, a full disk) into one line that says what to change; the commands supply only their own flags' advice.
It imports nothing heavy: torch is looked at only when it is already loaded.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path


class GSPNUserError(ValueError):
    """A bad argument, file or config; the message says which one and what to do."""


class GSPNFileNotFoundError(GSPNUserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class GSPNFileExistsError(GSPNUserError, FileExistsError):
    """Writing would replace results the user already has (pass ``overwrite``)."""


class GSPNNotWritableError(GSPNUserError, PermissionError):
    """A place the run will write to cannot be written (read-only, no permission, a file in the way)."""


class GSPNDiskFullError(OSError):
    """A write ran out of space (ENOSPC, or a quota: EDQUOT); the message names the folder and what is left there.

    Raised from the writers that write aside and rename (:mod:`.safe_write`, the evaluation's files), so the
    message can also say that the file at the final path is as it was before.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        folder = path.parent
        free = _free_bytes(folder)
        left = f", {format_size(free)} free there" if free is not None else ""
        super().__init__(
            errno.ENOSPC,
            f"No space left on the disk of {folder}{left} while writing {path.name}; nothing was replaced (the file "
            f"there, if any, is as it was). Free some space there or write to another folder.",
        )
        self.path = path

    def __str__(self) -> str:  # OSError's "[Errno 28] ..." prefix is noise in a one-line message
        return self.strerror or super().__str__()


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(error: BaseException) -> bool:
    """An OSError with ENOSPC/EDQUOT, or a library's wrapper of one (safetensors raises its own
    ``SafetensorError('... No space left on device (os error 28)')``)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA, and MPS in recent torch), and the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), which is not a MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if out_of_memory is not None and isinstance(error, out_of_memory):
        return True
    if isinstance(error, RuntimeError):
        text = str(error)
        return "can't allocate memory" in text or "out of memory" in text.lower()
    return False


def format_size(size: float) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (``3.2 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def failure_message(error: BaseException, out_of_memory_advice: str | None = None) -> str | None:
    """One line for a failure that is the machine's, not a bug: out of memory (with ``out_of_memory_advice``, the
    command's flags to lower) or a full disk; ``None`` for anything else (the caller keeps its traceback)."""
    if is_out_of_memory(error):
        advice = out_of_memory_advice or "use smaller inputs"
        return f"Out of memory ({_first_line(error)}): {advice}."
    if isinstance(error, GSPNDiskFullError):
        return str(error)
    if is_disk_full(error):
        filename = getattr(error, "filename", None)
        where = f" writing {filename}" if filename else ""
        free = _free_bytes(Path(filename).parent) if filename else None
        left = f" ({format_size(free)} free there)" if free is not None else ""
        reason = _first_line(error)
        return f"No space left on the disk{where}{left}: free some space or write to another folder ({reason})."
    return None


def probe_writable(folder: str | Path, flag: str) -> Path:
    """Create ``folder`` (and its parents) and write and remove a probe file in it, so that a run that will write
    there fails now, in one line naming ``flag``, instead of after the work (a read-only mount, no permission,
    a file where a folder should be, a full disk)."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".gspn-write-probe-{os.getpid()}"
        with open(probe, "wb") as file:
            file.write(b"probe")
        probe.unlink()
    except OSError as error:
        if is_disk_full(error):
            raise GSPNDiskFullError(folder / ".gspn-write-probe") from error
        reason = error.strerror or type(error).__name__
        raise GSPNNotWritableError(
            f"{flag} {str(folder)!r} cannot be written ({reason}); choose a folder you can write to, or fix its "
            "permissions. Nothing was computed yet."
        ) from None
    return folder
