#!/usr/bin/env bash
# Set up, then run the test suite (CPU; GPU tests are skipped where no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check gspn_diffusers tests benchmarks scripts pipelines distill
ruff format --check gspn_diffusers tests benchmarks scripts pipelines distill
# Compile and link the CUDA kernel (no GPU needed) so a broken kernel cannot land; skips only without nvcc.
python scripts/check_cuda_build.py
python -m pytest -q "$@"
