#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that a fresh GPU machine without network needs on top of its
# image (torch 2.11 cu130, transformers, accelerate, safetensors, numpy, matplotlib, huggingface-hub, timm,
# torchvision, regex, tqdm, pillow, requests, filelock, zipp are there; diffusers and open_clip_torch are not).
# scripts/gpu_check.sh installs them offline from .whl/ (git-ignored):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#
#   bash scripts/fetch_gpu_wheels.sh            # into .whl/ at the repository root (replaces what is there)
#
# --no-deps: every needed package is named, one version each (two versions of one package stop the install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The versions this project is tested with, and what they need beyond the GPU image:
# diffusers -> importlib_metadata -> lazy-importer (zipp is there); open_clip_torch -> ftfy -> wcwidth.
PACKAGES=(
    diffusers==0.42.1
    importlib_metadata==10.2.0
    lazy-importer==0.1.0
    open_clip_torch==3.3.0
    ftfy==6.3.1
    wcwidth==0.9.4
)
rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls -l .whl
du -sh .whl
