"""The communication layer of patch parallelism: the only module that calls ``torch.distributed``.

Every exchange goes through :class:`Comm`, which counts the bytes this process sends (per UNet call: the runtime
resets the counter) and the seconds it waits, and turns a failed or timed-out collective into one
:class:`~.errors.PeerFailedError` that names the first failure any process posted. A process that fails posts its
message in the process group's key-value store before it dies, so the others stop with that message instead of
hanging (collectives also time out: the group is created with a timeout).

Bytes are what a process puts on the wire under the usual algorithms: a point-to-point send is its tensor; an
all-gather (ring) sends this process's chunk to the N - 1 others, ``(N - 1) x chunk``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ParallelConfigError, PeerFailedError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(seconds=float(os.environ.get("GSPN_PARALLEL_TIMEOUT", 300)))
_ERROR_KEY = "gspn_parallel/first_error"


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """``init_process_group`` from the launcher's environment (torchrun, accelerate launch) with a timeout.

    NCCL when CUDA is available, gloo otherwise. Nothing happens when the group already exists.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ParallelConfigError(
            "Patch parallelism runs one process per device, started by a launcher: torchrun --nproc-per-node N "
            "-m gspn_diffusers.cli generate ... (or accelerate launch); RANK/WORLD_SIZE are not set."
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timeout)


# The store outlives an aborted group here (process 0 hosts it: the others must still read a posted failure).
_state: dict = {"store": None, "aborted": False}


def _store():
    if _state["store"] is None:
        try:
            _state["store"] = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store (a custom init): failures are still raised, without the message
            return None
    return _state["store"]


def abort_after_failure() -> None:
    """Close this process's connections after a failure, so the others' waits fail now instead of at the timeout
    (gloo reports a closed peer at once; NCCL's watchdog aborts at the timeout)."""
    _state["aborted"] = True
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - experimental API: fall back to destroying the group
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            logger.debug("could not close the process group after a failure", exc_info=True)


def aborted() -> bool:
    return _state["aborted"]


def post_failure(message: str) -> None:
    """Record this process's failure for the others (the first one posted wins); never raises."""
    store = _store()
    if store is None:
        return
    try:
        store.compare_set(_ERROR_KEY, "", f"process {dist.get_rank()}: {message}")
    except Exception:  # noqa: BLE001 - the store may be gone with the failing peer
        logger.debug("could not post the failure to the store", exc_info=True)


def posted_failure() -> str | None:
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_ERROR_KEY]):
            return store.get(_ERROR_KEY).decode() or None
    except Exception:  # noqa: BLE001
        return None
    return None


class Pending:
    """An exchange in flight; :meth:`wait` returns its result once the works are done."""

    def __init__(self, comm: Comm, works: list, finish: Callable[[], object]) -> None:
        self.comm, self.works, self.finish = comm, works, finish

    def wait(self):
        if aborted():
            raise PeerFailedError("patch parallelism stopped: this process failed earlier (see its first error).")
        start = time.perf_counter()
        try:
            for work in self.works:
                work.wait()
        except Exception as error:  # gloo/NCCL errors: a peer died, or the timeout passed
            raise self.comm.peer_failure(error) from error
        finally:
            self.comm.wait_seconds += time.perf_counter() - start
        return self.finish()


class Comm:
    """Collectives over one process group (the whole world, or one CFG half), with byte and wait accounting."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        self.rank = self.ranks.index(dist.get_rank())
        _store()  # keep the store alive for the failure messages
        self.size = len(self.ranks)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.bytes_sent = 0
        self.wait_seconds = 0.0

    def peer_failure(self, error: BaseException) -> PeerFailedError:
        posted = posted_failure()
        if posted:
            return PeerFailedError(f"patch parallelism stopped: {posted}")
        return PeerFailedError(
            f"patch parallelism stopped: another process failed or stopped answering ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        )

    def _call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as error:  # noqa: BLE001
            raise self.peer_failure(error) from error

    # ------------------------------------------------------------------ point to point
    def exchange_neighbours(
        self,
        to_above: torch.Tensor | None,
        to_below: torch.Tensor | None,
        from_above: torch.Tensor | None,
        from_below: torch.Tensor | None,
        tag: int = 0,
    ) -> Pending:
        """Send to the band above / below and receive from them into the given buffers (None: no such band)."""
        works = []
        ops = [
            (to_above, self.rank - 1, True),
            (to_below, self.rank + 1, True),
            (from_above, self.rank - 1, False),
            (from_below, self.rank + 1, False),
        ]
        for tensor, peer, send in ops:
            if tensor is None:
                continue
            if send:
                tensor = tensor.contiguous()
                self.bytes_sent += tensor.numel() * tensor.element_size()
                works.append(self._call(dist.isend, tensor, dst=self.ranks[peer], tag=tag))
            else:
                works.append(self._call(dist.irecv, tensor, src=self.ranks[peer], tag=tag))

        def finish(keep=(to_above, to_below)):  # the sent tensors stay alive until the works complete
            return from_above, from_below

        return Pending(self, works, finish)

    def swap(self, tensor: torch.Tensor, peer_global_rank: int, tag: int = 0) -> torch.Tensor:
        """Send ``tensor`` to another process of the world and receive its tensor of the same shape."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        try:
            works = [
                dist.isend(tensor, dst=peer_global_rank, tag=tag),
                dist.irecv(received, src=peer_global_rank, tag=tag),
            ]
        except Exception as error:  # noqa: BLE001
            raise self.peer_failure(error) from error
        return Pending(self, works, lambda: received).wait()

    # ------------------------------------------------------------------ collectives
    def all_gather_dim(self, tensor: torch.Tensor, dim: int, sizes: list[int]) -> Pending:
        """Gather every process's ``tensor`` (of ``sizes[k]`` along ``dim``) and concatenate them along ``dim``.

        Uneven sizes are padded to the largest (the padding is sent and counted) and trimmed on arrival.
        """
        largest = max(sizes)
        pad = largest - tensor.shape[dim]
        if pad:
            shape = list(tensor.shape)
            shape[dim] = pad
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        self.bytes_sent += (self.size - 1) * tensor.numel() * tensor.element_size()
        work = self._call(dist.all_gather, out, tensor, async_op=True)

        def finish() -> torch.Tensor:
            return torch.cat([part.narrow(dim, 0, size) for part, size in zip(out, sizes, strict=True)], dim=dim)

        return Pending(self, [work], finish)

    def all_gather_list(self, tensor: torch.Tensor) -> Pending:
        """Every process's ``tensor`` (same shape everywhere), as a list in group order."""
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        self.bytes_sent += (self.size - 1) * tensor.numel() * tensor.element_size()
        work = self._call(dist.all_gather, out, tensor, async_op=True)
        return Pending(self, [work], lambda: out)

    def check_same(self, values: list[int], what: str) -> None:
        """All processes of the group hold the same ``values``, or every one raises the same clear error."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        gathered = self.all_gather_list(mine).wait()
        if any(not torch.equal(g, mine) for g in gathered):
            listing = "; ".join(f"process {self.ranks[k]}: {g.tolist()}" for k, g in enumerate(gathered))
            raise ParallelConfigError(
                f"The processes disagree on {what} ({listing}); every process must run the same pipeline call "
                "(same prompt, size, steps and seed)."
            )
