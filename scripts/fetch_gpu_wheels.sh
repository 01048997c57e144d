#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that a fresh GPU machine without network needs on top of its
# image: the "wheel" lines of scripts/gpu_packages.txt (the one list of what the GPU check imports; the "image"
# lines are on the GPU image already). scripts/gpu_check.sh installs them offline from .whl/ (git-ignored):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#
#   bash scripts/fetch_gpu_wheels.sh            # into .whl/ at the repository root (replaces what is there)
#
# --no-deps: every needed package is named, one version each (two versions of one package stop the install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mapfile -t PACKAGES < <(awk '$1 == "wheel" { print $2 }' scripts/gpu_packages.txt)
((${#PACKAGES[@]})) || { echo "scripts/gpu_packages.txt names no wheel" >&2; exit 1; }
rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls -l .whl
du -sh .whl
