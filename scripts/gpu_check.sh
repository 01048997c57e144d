#!/usr/bin/env bash
# Everything the GSPN CUDA path needs checked on a GPU, in one command of at most 9 minutes, for a fresh GPU machine
# with no network (python3 with a CUDA torch, nvcc, ninja; diffusers and open_clip come as wheels in .whl/, fetched
# beforehand with scripts/fetch_gpu_wheels.sh). Run from the repository root:
#
#   bash scripts/gpu_check.sh OUT_DIR
#   bash scripts/gpu_check.sh OUT_DIR --dry-run     # or GSPN_CHECK_DRY=1: every step on the CPU, about a minute
#
# Steps, each under its own time limit and never past the overall deadline; a failed step does not stop the others:
#   wheels   install .whl/*.whl offline into /tmp/site
#   build    JIT-build the extension for this GPU's arch only (MAX_JOBS=16), cached for the next steps
#   pytest   tests/test_cuda_kernel.py and tests/test_processor.py (junit XML)
#   bench    benchmarks/bench_cuda_scan.py: the table of the GPU-path issue (JSON + PNG)
#   tiles    the fused forward per GSPN_DIFFUSERS_CUDA_TILE value (JSON)
#   hires    benchmarks/bench_hires_unet.py: SD-XL UNet call time and peak memory per stage size, GSPN with and
#            without line-block inference and the original attention in windows (JSON + PNG)
# OUT_DIR receives at most 8 files: summary.json (device, versions, commit, every step's status and seconds),
# gpu_check.log, pytest.xml, cuda_scan.json, cuda_scan.png, cuda_tiles.json, hires_unet.json, hires_unet.png.
# GSPN_GIT_COMMIT names the commit where the tree has no .git (the device tool copies files only).
#
# The dry run (CI runs it, tests/test_gpu_check_dry.py) executes the same steps and the same benchmark code on the
# CPU, so the first GPU window is not spent on a typo: the kernel through its host emulation
# (GSPN_DIFFUSERS_BACKEND=emulation), wall-clock time and resident memory through the same helper
# (gspn_diffusers/benchmarking.py) where the GPU run uses CUDA events and torch.cuda's statistics, tiny shapes and the
# tiny SD-XL UNet. Differences: wheels installs into a temporary folder that it then removes (nothing where Python
# looks), build loads the emulation instead of compiling with nvcc, pytest runs the CPU tests of the emulated kernel
# (tests/test_cuda_kernel.py is collected and skips). It writes the same files, "device": "cpu (dry run)".
set -u
OUT="${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--dry-run]}"
DRY="${GSPN_CHECK_DRY:-0}"
case "${2:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2 ;;
esac
[[ "$DRY" == 1 ]] || DRY=0
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
: >"$LOG"
DEADLINE=$((SECONDS + ${GSPN_CHECK_SECONDS:-520}))  # then the summary; a killed step may take 10 s more: < 540 s
STEPS_JSON=""
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/gspn_torch_ext GSPN_CHECK_DRY="$DRY"
if ((DRY)); then
    # One thread: the tiny models are all per-op overhead, and on a shared CPU more threads make them 10-100x slower.
    export GSPN_DIFFUSERS_BACKEND=emulation OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# run NAME LIMIT_S COMMAND...: runs COMMAND with a timeout of min(LIMIT_S, time left before the deadline), logs it,
# and records {name, status, rc, seconds} for the summary.
run() {
    local name="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((limit > left)) && limit=$left
    local status rc start=$SECONDS
    if ((limit < 5)); then
        status="skipped: no time left"
        rc=-1
        echo "=== $name: $status" | tee -a "$LOG"
    else
        echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
        # SIGINT first, so pytest still writes its junit report; SIGKILL 10 s later.
        timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
        rc=$?
        if ((rc == 0)); then status="ok"; elif ((rc == 124 || rc == 137)); then status="timeout"; else status="failed"; fi
        echo "=== $name: $status (rc $rc, $((SECONDS - start)) s)" | tee -a "$LOG"
    fi
    STEPS_JSON+="{\"name\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - start))},"
}

# dry_wheels: the wheels step of the dry run, into a temporary target removed afterwards (the shared environment and
# /tmp/site stay as they are); without .whl/ (fetch_gpu_wheels.sh not run here) there is nothing to install.
dry_wheels() {
    local target rc=0
    target="$(mktemp -d)"
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "dry run: installing .whl/ offline into $target, removed afterwards"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$target" .whl/*.whl
        rc=$?
        ls "$target"
    else
        echo "dry run: no .whl/ here (scripts/fetch_gpu_wheels.sh fills it); nothing to install"
    fi
    rm -rf "$target"
    return $rc
}
export -f dry_wheels

if ((DRY)); then
    run wheels 60 bash -c dry_wheels
    echo "arch: none (dry run on the CPU)" | tee -a "$LOG"
    run build 240 python3 -c "import sys; from gspn_diffusers.ops.extension import load_emulation, load_error
sys.exit(0 if load_emulation() else f'the host emulation did not build: {load_error(\"emulation\")}')"
    run pytest 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernel.py tests/test_emulation_backend.py \
        -k "not torch_compile" --junitxml="$OUT/pytest.xml"
    # Tiny shapes the emulation runs in seconds (C >= 64: flash attention's heads are 64 wide); batch 1.
    SCAN_ARGS=(--dry-run --shapes 64:2x3 64:4x6 --batch 1 --warmup 1 --repeats 3)
    TILE_ARGS=(--dry-run --tile-shapes 64:4x6 --batch 1 --warmup 1 --repeats 3)
    HIRES_ARGS=(--dry-run --sizes 64x64 192x128 --line-block-tokens 64 --budget-s 100)
else
    run wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    ARCH="${GSPN_DIFFUSERS_CUDA_ARCH:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
    export GSPN_DIFFUSERS_CUDA_ARCH="$ARCH"
    echo "arch $ARCH" | tee -a "$LOG"
    run build 240 python3 -c "from gspn_diffusers.ops.cuda import build_extension; build_extension(verbose=True)"
    run pytest 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernel.py tests/test_processor.py \
        --junitxml="$OUT/pytest.xml"
    SCAN_ARGS=()
    TILE_ARGS=(--warmup 1 --repeats 5)
    HIRES_ARGS=(--budget-s 140)
fi
run bench 120 python3 benchmarks/bench_cuda_scan.py --out "$OUT" "${SCAN_ARGS[@]}"
run tiles 40 python3 benchmarks/bench_cuda_scan.py --out "$OUT" --tiles 0 1 2 4 8 16 "${TILE_ARGS[@]}"
run hires 160 python3 benchmarks/bench_hires_unet.py --out "$OUT" "${HIRES_ARGS[@]}"

STEPS_JSON="[${STEPS_JSON%,}]" OUT="$OUT" python3 - <<'EOF' 2>&1 | tee -a "$LOG"
"""summary.json: where this ran, each step's outcome, the pytest counts and the headline numbers."""
import json
import os
import platform
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])


def command(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


summary = {"steps": json.loads(os.environ["STEPS_JSON"]), "machine": platform.node()}
summary["git_commit"] = command("git", "rev-parse", "HEAD") or os.environ.get("GSPN_GIT_COMMIT", "unknown")
summary["nvcc"] = (command("nvcc", "--version") or "").splitlines()[-1:]
summary["driver"] = command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
summary["arch"] = os.environ.get("GSPN_DIFFUSERS_CUDA_ARCH")
summary["dry_run"] = os.environ.get("GSPN_CHECK_DRY") == "1"
try:
    import torch

    summary.update(torch=torch.__version__, cuda=torch.version.cuda)
    if summary["dry_run"]:
        from gspn_diffusers.benchmarking import DRY_RUN_DEVICE

        summary.update(device=DRY_RUN_DEVICE, capability=None)
    else:
        summary.update(device=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
except Exception as error:  # noqa: BLE001 - the summary is written whatever broke
    summary["torch_error"] = repr(error)
try:
    suite = ET.parse(out / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["pytest"]["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
except (OSError, ET.ParseError, IndexError) as error:
    summary["pytest"] = {"error": repr(error)}
headline = {
    "cuda_scan.json": ("latent", "gate_channels", "kernel_forward_ms", "kernel_forward_pct_peak", "x_sdpa"),
    "hires_unet.json": ("attention", "width", "height", "call_s", "peak_gib"),
}
for name, keys in headline.items():
    try:
        rows = json.loads((out / name).read_text())["rows"]
        summary[name] = [{k: row.get(k) for k in keys} for row in rows]
    except (OSError, ValueError, KeyError) as error:
        summary[name] = {"error": repr(error)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("device", "git_commit", "steps", "pytest") if k in summary}, indent=1))
EOF
