"""Distillation of the GSPN modules from the frozen original UNet (the teacher), with Accelerate.

``gspn-diffusers distill ...`` or ``accelerate launch -m gspn_diffusers.distill.train ...``; see
:mod:`gspn_diffusers.distill.train` for the loop, :mod:`.data` for the datasets and :mod:`.losses`
for the loss terms.
"""

from __future__ import annotations
