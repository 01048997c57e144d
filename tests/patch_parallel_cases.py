"""Cases run by the patch-parallel tests, in the worker processes (torch.multiprocessing, gloo) and, for the
single-process reference, in the test process itself; kept out of the test module so the workers import only this.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_pipe(kind: str, gspn: bool, hires: bool):
    """A tiny pipeline; GSPN layers get seeded random gates and merges (zero-initialised gates would hide edges)."""
    from gspn_diffusers import GSPNConfig, convert
    from gspn_diffusers.tiny import tiny_pipeline

    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    if gspn:
        # local scans of 3 lines in one level: group boundaries that do and do not fall on band edges
        convert(pipe, GSPNConfig.from_preset(kind, chunk_size=None, layer_chunk_sizes={"*down_blocks.1*": 3}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for name, param in pipe.unet.named_parameters():
                if ".gspn." in name:
                    param.data.normal_(0.0, 0.5).add_(0.5 if "merge" in name else 0.0)
    if hires:
        from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline

        cls = GSPNDemoFusionSDXLPipeline if kind == "sdxl" else GSPNDemoFusionPipeline
        pipe = cls.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, case: dict) -> torch.Tensor:
    kwargs = dict(
        num_inference_steps=case["steps"],
        height=case["height"],
        width=case["width"],
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        guidance_scale=case.get("guidance", 7.5),
    )
    if case.get("hires"):
        kwargs.update(local_denoising=case.get("local", "whole"), skip_ratio=0.4)
    return pipe("a lighthouse at dawn", **kwargs).images


def worker(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    """One process: run every case under ``parallelize`` and let process 0 save the latents and call stats."""
    import torch.distributed as dist

    from gspn_diffusers.parallel import ParallelError, parallelize

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results, pipes = {}, {}
    for case in cases:
        key = (case["kind"], case.get("gspn", False), case.get("hires", False))
        if key not in pipes:
            pipes[key] = build_pipe(*key)
        pipe = pipes[key]
        started = time.perf_counter()
        try:
            with parallelize(
                pipe, mode=case["mode"], warmup_steps=case.get("warmup", 4), split_cfg=case.get("split_cfg", False)
            ) as ctx:
                if case.get("fail_rank") == rank:
                    pipe.unet.conv_in.register_forward_hook(_fail)
                latent = run_case(pipe, case)
            results[case["name"]] = {
                "latent": latent,
                "calls": [vars(c) for c in ctx.calls],
                "restored": "forward" not in vars(pipe.unet),
            }
        except ParallelError as error:
            elapsed = time.perf_counter() - started
            results[case["name"]] = {"error": str(error), "type": type(error).__name__, "seconds": elapsed}
            if type(error).__name__ == "PeerFailedError":
                torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
                return
        except Exception as error:  # the failing process of a failure case: record, stay alive a while, die
            results[case["name"]] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            time.sleep(case.get("linger", 0))
            raise
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _fail(module, args, output):
    raise RuntimeError("injected failure in conv_in")
