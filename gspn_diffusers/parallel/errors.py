"""The errors of patch parallelism: each says what went wrong in one line, and whether every process saw it."""

from __future__ import annotations

from ..errors import GSPNUserError


class ParallelError(GSPNUserError):
    """A failure of patch-parallel inference, reported as one line. ``everywhere``: every process raises the same
    error (a check that all of them compute alike), so only the first process needs to report it."""

    everywhere = False


class ParallelConfigError(ParallelError):
    """A setting or input that patch parallelism cannot serve (world size, latent too small); seen everywhere."""

    everywhere = True


class PeerFailedError(ParallelError):
    """Another process failed (or stopped answering): this one stops too, naming the first failure it knows."""
