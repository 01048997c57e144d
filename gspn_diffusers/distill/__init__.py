"""Distillation of the GSPN modules from the frozen original UNet (the teacher), with Accelerate.

``gspn-diffusers distill ...``, ``accelerate launch distill/train_gspn_distill.py ...`` or
``accelerate launch -m gspn_diffusers.distill.train ...``; see :mod:`gspn_diffusers.distill.train` for
the loop, :mod:`.data` for the datasets, :mod:`.conditioning` for the UNet inputs, :mod:`.losses` for
the loss terms, :mod:`.cache` for ``--cache_latents``, :mod:`.checkpoints` for checkpoints that
survive interruption, :mod:`.validation` for the validation grid (FSDP-safe) and
:mod:`.laion_subset` for preparing a LAION subset.
"""

from __future__ import annotations
