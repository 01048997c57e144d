"""ControlNet under patch parallelism: the ControlNet runs on this process's band, as the UNet does, and its
residuals stay band-local, since the band UNet call adds them to its own band's features.

The ControlNet's forward is replaced like the UNet's and its layers are patched the same way (convolutions with
halo rows, whole-image GroupNorm, ``attn1``). Its control image is in pixels, ``s`` times the latent's rows (the
VAE scale factor), and its conditioning embedding's convolutions run at those finer levels, downsampling by
stride 2 down to the latent: the band of the control image is the latent band's rows times ``s``, whose edges are
even at every finer level, so the same halo rule holds there (a conv's halo needs no level; the level-aware
layers, GroupNorm and ``attn1``, only run at the latent's levels and below).

It is called once per step before the UNet, on the same latent and timestep; the runtime names its calls apart
from the UNet's (per-model call keys) and its layers get ids after the UNet's, so their kept values and message
tags never meet. A ``MultiControlNetModel`` sums its nets' residuals: each net is patched alone, and the sum of
band-local residuals is band-local.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetOutput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from .bands import BandPlan, downsampling_factor, plan_bands
from .errors import ParallelConfigError
from .forward import BandForward, timestep_value

_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


def pipeline_controlnets(pipe: Any, factor: int) -> list[tuple[str, ControlNetModel]]:
    """The ControlNets of ``pipe`` (its ``controlnet`` component; each net of a ``MultiControlNetModel``) by the
    names their calls get, refusing what a band cannot run: another kind of ControlNet, one that pools its
    residuals over the whole image, or one whose levels are not the UNet's (``factor``)."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return []
    if isinstance(controlnet, MultiControlNetModel):
        nets = [(f"controlnet.{k}", net) for k, net in enumerate(controlnet.nets)]
    else:
        nets = [("controlnet", controlnet)]
    for name, net in nets:
        if not isinstance(net, ControlNetModel):
            raise ParallelConfigError(
                f"Patch parallelism runs Diffusers' ControlNetModel (or GSPNControlNetModel) on bands; the "
                f"pipeline's {name} is a {type(net).__name__}."
            )
        if net.config.global_pool_conditions:
            raise ParallelConfigError(
                f"The pipeline's {name} pools its residuals over the whole image (global_pool_conditions): patch "
                "parallelism cannot run it on bands."
            )
        if downsampling_factor(net.config) != factor:
            raise ParallelConfigError(
                f"The pipeline's {name} downsamples by {downsampling_factor(net.config)}, the UNet by {factor}: its "
                "residuals cannot match the UNet's bands."
            )
    return nets


def residuals_of(kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The ControlNet residuals among a UNet call's keyword arguments, named for error messages."""
    down = kwargs.get(_RESIDUALS[0])
    mid = kwargs.get(_RESIDUALS[1])
    named = [(f"{_RESIDUALS[0]}[{k}]", r) for k, r in enumerate(down or ())]
    return named + ([(_RESIDUALS[1], mid)] if mid is not None else [])


def check_residual_batches(
    residuals: list[tuple[str, torch.Tensor]], batch: int, split: bool, controlnet_half: int | None
) -> None:
    """Under a CFG split (``split``) of a UNet call of ``batch``, each residual must be either of the whole batch
    (then it is halved with the other inputs) or the half a split ControlNet call just returned (``controlnet_half``).

    Anything else cannot be matched to this process's half: guess mode's residuals, for one, are made on the
    conditional batch alone and padded with zeros for the unconditional one.
    """
    if not split:
        return
    for name, residual in residuals:
        if residual.shape[0] == batch or residual.shape[0] == controlnet_half == batch // 2:
            continue
        raise ParallelConfigError(
            f"With a CFG split, the UNet's {name} has a batch of {residual.shape[0]} for a UNet batch of {batch}: "
            "it is neither the whole batch nor the half the ControlNet made (guess mode with several images?); "
            "run without split_cfg."
        )


def check_band_residuals(residuals: list[tuple[str, torch.Tensor]], plan: BandPlan, band: int) -> None:
    """Every residual has this band's rows at its level (the level whose width it has): it was made on this band.

    A ControlNet that ``parallelize`` did not patch (not the pipeline's ``controlnet``) gives whole-image
    residuals, which the band's features cannot take.
    """
    for name, residual in residuals:
        rows, width = residual.shape[-2:]
        levels = [level for level in range(plan.levels) if plan.level_width(level) == width]
        expected = sorted({plan.heights(level)[band] for level in levels})
        if rows not in expected:
            raise ParallelConfigError(
                f"The UNet's {name} is {rows}x{width}, but this process's band of the {plan.height}x{plan.width} "
                f"latent ({plan.size} bands) has {' or '.join(map(str, expected)) or 'no level of that width, so no'} "
                "rows at that level: ControlNet residuals must come from the pipeline's own controlnet, which "
                "parallelize() runs on the same band."
            )


def pixel_scale(sample: torch.Tensor, cond: torch.Tensor) -> int:
    """How many control-image rows (and columns) one latent row holds: the VAE scale factor, an integer."""
    (height, width), (cond_height, cond_width) = sample.shape[-2:], cond.shape[-2:]
    scale = cond_height // height
    if cond_height != scale * height or cond_width != scale * width or scale < 1:
        raise ParallelConfigError(
            f"The control image is {cond_height}x{cond_width} for a {height}x{width} latent: patch parallelism cuts "
            "it with the latent, so it must be the latent's size times one integer factor."
        )
    return scale


class BandControlNetForward(BandForward):
    """The ControlNet on this process's band of the latent and the same rows of the control image; returns the
    band-local residuals (not gathered) for the band UNet call that follows."""

    def __init__(self, original: Callable, *args: Any, name: str = "controlnet", **kwargs: Any) -> None:
        super().__init__(original, *args, **kwargs)
        self.name = name
        self.signature = inspect.signature(original)

    def _band_call(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        runtime, comm = self.runtime, self.runtime.comm
        call = dict(self.signature.bind(sample, timestep, *args, **kwargs).arguments)
        return_dict = call.pop("return_dict", True)
        batch = sample.shape[0]
        if self._cfg_split(batch):
            call = self._half(call, batch)
            runtime.controlnet_half_batch = batch // 2
        sample, cond = call["sample"], call["controlnet_cond"]
        scale = pixel_scale(sample, cond)
        plan = plan_bands(*sample.shape[-2:], comm.size, self.factor)
        runtime.begin_call(plan, tuple(sample.shape), timestep_value(call["timestep"]), model=self.name)
        start, end = plan.rows(comm.rank)
        call["sample"] = sample[:, :, start:end]
        call["controlnet_cond"] = cond[:, :, start * scale : end * scale]
        with runtime.band_call():
            down, mid = self.original(**call, return_dict=False)
        runtime.end_call()
        if return_dict:
            return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
        return down, mid
