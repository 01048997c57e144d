"""Distillation of the GSPN modules from the frozen original UNet (the teacher), with Accelerate.

``gspn-diffusers distill ...``, ``accelerate launch distill/train_gspn_distill.py ...`` or
``accelerate launch -m gspn_diffusers.distill.train ...``; see :mod:`gspn_diffusers.distill.train` for
the loop, :mod:`.checks` for everything checked before a model loads, :mod:`.models` for the student,
teacher and optimizer, :mod:`.layouts` / :mod:`.shards` / :mod:`.records` for finding a dataset's
images and captions, :mod:`.data` for decoding them, :mod:`.conditioning` for the UNet inputs,
:mod:`.losses` for the loss terms, :mod:`.cache` for ``--cache_latents``, :mod:`.checkpoints` for
checkpoints that survive interruption and are verified before a resume, :mod:`.state` for what the
save hooks write, :mod:`.run_dir` for what a run may do with its output folder, :mod:`.failures` for
failures reported as one line, :mod:`.validation` for the validation grid (FSDP-safe) and
:mod:`.laion_subset` for preparing a LAION subset.
"""

from __future__ import annotations
