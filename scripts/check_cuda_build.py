"""CI check: compile AND link the GSPN CUDA extension on a machine without a GPU, and check what it exports.

    python scripts/check_cuda_build.py [--archs 8.0] [--build-dir build/cuda_check]

Nothing runs the kernels here (no GPU); this proves that csrc/ compiles with nvcc, links against torch, imports,
and exposes the functions gspn_diffusers.ops.cuda calls, so a broken kernel cannot land. Skips (exit 0, with a
message) only where no nvcc or no CUDA build of torch is present; any build error exits 1 with the compiler output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs",
        default=os.environ.get("GSPN_DIFFUSERS_CUDA_ARCH", "8.0"),
        help="compute capabilities to compile for (one is enough to prove the build)",
    )
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "cuda_check")
    args = parser.parse_args()

    if shutil.which("nvcc") is None:
        print("check_cuda_build: SKIPPED, nvcc is not on PATH (the CUDA kernel cannot be compiled here).")
        return 0
    import torch

    if torch.version.cuda is None:
        print(f"check_cuda_build: SKIPPED, torch {torch.__version__} is a CPU-only build (cannot compile CUDA).")
        return 0
    from gspn_diffusers.ops.cuda import EXPECTED_FUNCTIONS, build_emulation, build_extension, find_cuda_home
    from gspn_diffusers.ops.cuda_build import arch_numbers

    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("check_cuda_build: FAILED, nvcc is present but no CUDA headers were found; set CUDA_HOME.")
        return 1
    os.environ.setdefault("MAX_JOBS", "2")

    args.build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        module = build_extension(build_directory=str(args.build_dir), verbose=False, archs=args.archs)
    except Exception as error:  # noqa: BLE001 - report any build failure with its full compiler output
        print(f"check_cuda_build: FAILED to build the GSPN CUDA extension:\n{error}", file=sys.stderr)
        return 1
    missing = [name for name in (*EXPECTED_FUNCTIONS, "compiled_archs") if not hasattr(module, name)]
    if missing:
        print(f"check_cuda_build: FAILED, the module lacks {', '.join(missing)}.", file=sys.stderr)
        return 1
    archs = [int(n) for n in arch_numbers(args.archs)]
    if module.compiled_archs() != archs:
        print(f"check_cuda_build: FAILED, compiled_archs() = {module.compiled_archs()}, built for {archs}.")
        return 1
    elapsed = time.perf_counter() - start
    print(
        f"check_cuda_build: OK, compiled and linked for sm {args.archs} with {os.environ['MAX_JOBS']} jobs in "
        f"{elapsed:.0f} s (CUDA_HOME={cuda_home}); exports {', '.join(EXPECTED_FUNCTIONS)}; "
        f"compiled_archs() = {archs}."
    )
    # The same kernel source compiled for the host, run by tests/test_cuda_emulation.py against the reference.
    start = time.perf_counter()
    emulation_dir = args.build_dir / "emulation"
    emulation_dir.mkdir(parents=True, exist_ok=True)
    try:
        build_emulation(build_directory=str(emulation_dir))
    except Exception as error:  # noqa: BLE001 - report any build failure with its full compiler output
        print(f"check_cuda_build: FAILED to build the host emulation of the kernels:\n{error}", file=sys.stderr)
        return 1
    print(f"check_cuda_build: OK, host emulation of the kernels built in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
