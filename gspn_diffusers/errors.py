"""The exceptions that mean "the user passed something wrong", as opposed to a bug.

The command line prints these as one line and exits with status 2; anything else keeps its
traceback. They subclass the builtin a caller would expect (``ValueError``, ``FileNotFoundError``,
``FileExistsError``), so ``except ValueError`` around the library keeps working.
"""

from __future__ import annotations


class GSPNUserError(ValueError):
    """A bad argument, file or config; the message says which one and what to do."""


class GSPNFileNotFoundError(GSPNUserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class GSPNFileExistsError(GSPNUserError, FileExistsError):
    """Writing would replace results the user already has (pass ``overwrite``)."""
