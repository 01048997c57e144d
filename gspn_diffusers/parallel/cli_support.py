"""What ``gspn-diffusers generate --parallel patch|cfg`` needs: the process group, the wrapped pipeline call, and
which process saves."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from .api import parallelize
from .comm import init_distributed


class ParallelGeneration:
    """Joins the launcher's process group at creation (before the model loads, so each process takes its own GPU);
    a no-op without ``--parallel``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.saves = True
        if args.parallel is not None:
            init_distributed()
            rank = dist.get_rank()
            if rank != 0:  # one log of the run: process 0's; warnings and errors still from each, named
                logging.getLogger("gspn_diffusers").setLevel(logging.WARNING)
                for handler in logging.getLogger().handlers:
                    handler.setFormatter(logging.Formatter(f"%(levelname)s [process {rank}] %(message)s"))

    @contextmanager
    def around(self, pipe: Any) -> Iterator[dict[str, Any]]:
        """Patch parallelism around the pipeline call; yields the call's extra arguments.

        Process 0 decodes and saves; the others stop at the latent once the last UNet call is done.
        """
        args = self.args
        if args.parallel is None:
            yield {}
            return
        with parallelize(
            pipe, mode=args.parallel_mode, warmup_steps=args.warmup_steps, split_cfg=args.parallel == "cfg"
        ) as ctx:
            self.saves = ctx.is_main_process
            call: dict[str, Any] = {} if self.saves else {"output_type": "latent"}
            if args.parallel == "cfg" and hasattr(pipe, "plan_stages"):
                call["split_cfg"] = False  # the CFG halves go to the two groups, batched in one UNet call
            yield call
