"""Cases run by the patch-parallel tests, in the worker processes (torch.multiprocessing, gloo) and, for the
single-process reference, in the test process itself; kept out of the test module so the workers import only this.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pipe_key(case: dict) -> tuple:
    """What a case's pipeline is built from (the arguments of :func:`build_pipe`); equal keys share one pipeline."""
    return (case["kind"], case.get("gspn", False), case.get("hires", False), case.get("controlnet"))


def controlnet_for(unet, seed: int = 0):
    """The ControlNet of ``unet`` (``GSPNControlNetModel`` for a GSPN UNet, with its GSPN weights) with its
    zero-initialised output convolutions made non-zero, the conditioning embedding's strongly: otherwise the
    residuals are zero (or barely depend on the control image) and the tests could not see a wrong band of it.
    The residual convolutions are small (0.03 x N(0, 1)): larger ones drown the UNet's own attention layers (GSPN
    and softmax UNets would then give nearly the same latent, and their band exchanges would go untested)."""
    from diffusers import ControlNetModel

    from gspn_diffusers import GSPNControlNetModel, is_converted

    cls = GSPNControlNetModel if is_converted(unet) else ControlNetModel
    with torch.random.fork_rng(devices=[]):  # the conditioning embedding's random init: the same in every process
        torch.manual_seed(seed)
        controlnet = cls.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        zeroed.append(controlnet.controlnet_cond_embedding.conv_out)
        for module in zeroed:
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
        for module in zeroed[:-1]:
            module.weight.mul_(0.03)
        controlnet.controlnet_cond_embedding.conv_out.weight.mul_(30)
    return controlnet


def _with_controlnet(pipe, kind: str, controlnet: str, hires: bool):
    """``pipe`` with a ControlNet (``"one"``) or a MultiControlNetModel of two (``"multi"``)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    nets = [controlnet_for(pipe.unet, seed) for seed in range(2 if controlnet == "multi" else 1)]
    model = MultiControlNetModel(nets) if controlnet == "multi" else nets[0]
    if hires:
        return pipe, model  # the high-resolution pipeline takes it in from_pipe
    cls = StableDiffusionXLControlNetPipeline if kind == "sdxl" else StableDiffusionControlNetPipeline
    return cls(**pipe.components, controlnet=model), None


def control_image(height: int, width: int):
    """Random pixels: every row of the control image counts, so a band cut in the wrong place shows."""
    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def build_pipe(kind: str, gspn: bool, hires: bool, controlnet: str | None = None):
    """A tiny pipeline; GSPN layers get seeded random gates and merges (zero-initialised gates would hide edges).
    ``controlnet``: ``"one"`` or ``"multi"`` for Diffusers' ControlNet pipeline of the family (or the
    high-resolution pipeline's ``controlnet``)."""
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
    extra = {}
    if controlnet:
        pipe, model = _with_controlnet(pipe, kind, controlnet, hires)
        extra = {"controlnet": model} if model is not None else {}
        pipe.set_progress_bar_config(disable=True)
    if hires:
        from gspn_diffusers.models import gspn_components
        from gspn_diffusers.pipelines import GSPNDemoFusionPipeline, GSPNDemoFusionSDXLPipeline

        cls = GSPNDemoFusionSDXLPipeline if kind == "sdxl" else GSPNDemoFusionPipeline
        pipe = cls.from_pipe(pipe, **gspn_components(pipe), **extra)
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
    if case.get("images"):
        kwargs.update(num_images_per_prompt=case["images"])
    if case.get("controlnet"):
        images = [control_image(case["height"], case["width"])] * (2 if case["controlnet"] == "multi" else 1)
        scale = case.get("control_scale", 1.0)
        if case.get("hires"):
            kwargs.update(control_image=images[0], controlnet_conditioning_scale=scale)
        else:
            multi = case["controlnet"] == "multi"
            kwargs.update(image=images if multi else images[0], guess_mode=case.get("guess_mode", False))
            kwargs.update(controlnet_conditioning_scale=[scale, scale] if multi else scale)
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
        key = pipe_key(case)
        if key not in pipes:
            pipes[key] = build_pipe(*key)
        pipe = pipes[key]
        started = time.perf_counter()
        target = pipe.unet if case.get("unet_only") else pipe  # unet_only: the ControlNet stays whole
        try:
            with parallelize(
                target, mode=case["mode"], warmup_steps=case.get("warmup", 4), split_cfg=case.get("split_cfg", False)
            ) as ctx:
                if case.get("fail_rank") == rank:
                    pipe.unet.conv_in.register_forward_hook(_fail)
                latent = run_case(pipe, case)
            results[case["name"]] = {
                "latent": latent,
                "calls": [vars(c) for c in ctx.calls],
                "restored": all("forward" not in vars(m) for m in _models(pipe)),
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


def _models(pipe) -> list:
    """The UNet and the ControlNet nets of ``pipe``: the models whose forwards patch parallelism replaces."""
    controlnet = getattr(pipe, "controlnet", None)
    nets = list(getattr(controlnet, "nets", [controlnet] if controlnet is not None else []))
    return [pipe.unet, *nets]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, cases: list[dict], out_dir, expect_failure: bool = False) -> list[dict]:
    """Run ``cases`` in ``world`` worker processes (gloo); every process's results, the elapsed seconds in the
    first one's ``_elapsed``."""
    import torch.multiprocessing as mp

    out = str(out_dir)
    start = time.perf_counter()
    try:
        mp.start_processes(worker, args=(world, _free_port(), cases, out), nprocs=world, start_method="spawn")
    except mp.ProcessRaisedException:
        if not expect_failure:
            raise
    elapsed = time.perf_counter() - start
    results = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    results[0]["_elapsed"] = elapsed
    return results


def _fail(module, args, output):
    raise RuntimeError("injected failure in conv_in")
