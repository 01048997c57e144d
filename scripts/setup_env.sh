#!/usr/bin/env bash
# Create .venv with torch installed first (so pip never swaps it for another build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    echo "Installing $TORCH_SPEC (first run only) ..."
    # shellcheck disable=SC2086
    python -m pip install -q $TORCH_SPEC
fi
python -m pip install -q -e ".[${EXTRAS:-test}]"
