#!/usr/bin/env bash
# Set up, then run the main job on the built-in tiny SD-XL model: convert to GSPN, save, and generate
# landscape images with the GSPN weights and with the original attention, all offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
out=${OUT_DIR:-gspn_outputs/demo}
gspn-diffusers convert --tiny sdxl --output "$out/gspn_weights" --overwrite  # the demo may run again
gspn-diffusers generate --tiny sdxl --gspn-weights "$out/gspn_weights" \
    --prompt "a lighthouse at dawn" --height 128 --width 256 --steps 5 --seed 0 --output "$out/gspn.png"
gspn-diffusers generate --tiny sdxl --original \
    --prompt "a lighthouse at dawn" --height 128 --width 256 --steps 5 --seed 0 --output "$out/original.png"
echo "Demo outputs in $out/"
