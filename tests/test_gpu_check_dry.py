"""The GPU check end to end on the CPU (``scripts/gpu_check.sh --dry-run``), and the one list of what it imports.

GPU time is rare and short: every line the check runs after its build (timed loops, memory statistics, JSON and PNG
writers, the profiler count, the hires stage loop, the summary) runs here first, through the same benchmark code, so
a typo costs a CI run, not a GPU window. The files are read back against the fields the README's table promises.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "build", "pytest", "bench", "tiles", "hires"]
FILES = ["cuda_scan.json", "cuda_tiles.json", "gpu_check.log", "hires_unet.json", "pytest.xml", "summary.json"]
PNGS = ["cuda_scan.png", "hires_unet.png"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_fields() -> dict[str, dict[str, list[str]]]:
    """{file: {"every": [...], "measured": [...], "not": [...]}} from the README's table of result fields."""
    fields = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+\.json`", cells[0]):
            every, measured, absent = (re.findall(r"`(\w+)`", cell) for cell in cells[1:])
            fields[cells[0].strip("`")] = {"every": every, "measured": measured, "not": absent}
    return fields


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, float]:
    """(OUT_DIR of one dry run, its wall seconds)."""
    from gspn_diffusers.ops import cuda

    if cuda.find_cuda_home() is None:
        pytest.skip("the kernel's host emulation needs the CUDA headers (nvcc's toolkit), which this machine lacks")
    out = tmp_path_factory.mktemp("gpu_check_dry")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = this interpreter
        "GSPN_GIT_COMMIT": "given-commit",
    }
    env.pop("GSPN_DIFFUSERS_BACKEND", None)
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, seconds


def test_dry_run_runs_every_step(dry_run):
    out, seconds = dry_run
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in summary["steps"]), (summary["steps"], log[-4000:])
    assert summary["device"] == "cpu (dry run)" and summary["dry_run"] is True and summary["arch"] is None
    assert summary["git_commit"] == "given-commit" or len(summary["git_commit"]) == 40
    # The emulated kernel's tests ran (not just the GPU tests' skips) and passed.
    assert summary["pytest"]["failures"] == summary["pytest"]["errors"] == 0, summary["pytest"]
    assert summary["pytest"]["tests"] - summary["pytest"]["skipped"] >= 10, summary["pytest"]
    # The headline numbers of the summary come from the files, as on the GPU.
    assert summary["cuda_scan.json"] and all(row["kernel_forward_ms"] > 0 for row in summary["cuda_scan.json"])
    assert {row["attention"] for row in summary["hires_unet.json"]} == {"gspn", "gspn-whole", "original"}
    wheels = log.split("=== wheels", 1)[1].split("=== build", 1)[0]
    assert "nothing to install" in wheels or "removed afterwards" in wheels, wheels
    assert set(FILES) <= {p.name for p in out.iterdir()}
    assert seconds < 540, "the dry run must stay well inside the GPU run's own deadline"


def test_dry_run_by_environment_and_usage(tmp_path):
    """GSPN_CHECK_DRY=1 is --dry-run (the summary says so even with no time left); a wrong argument is refused."""
    env = {
        **os.environ,
        "GSPN_CHECK_DRY": "1",
        "GSPN_CHECK_SECONDS": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    script = str(ROOT / "scripts" / "gpu_check.sh")
    result = subprocess.run(["bash", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu (dry run)"
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"].startswith("skipped") for s in summary["steps"])
    result = subprocess.run(["bash", script, str(tmp_path / "x"), "--dryrun"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr and not (tmp_path / "x").exists()


def test_dry_run_rows_have_the_fields_the_readme_promises(dry_run):
    out, _ = dry_run
    promised = readme_fields()
    assert sorted(promised) == ["cuda_scan.json", "cuda_tiles.json", "hires_unet.json"]
    for name, fields in promised.items():
        data = json.loads((out / name).read_text())
        assert data["meta"]["device"] == "cpu (dry run)", name
        assert data["rows"], name
        for row in data["rows"]:
            missing = [f for f in fields["every"] if f not in row]
            assert not missing, (name, missing, row)
            measured = all(f in row for f in fields["measured"])
            assert measured or any(f in row for f in fields["not"]), (name, row)
    scan = json.loads((out / "cuda_scan.json").read_text())
    # Tiny shapes: the reference and flash attention's backward run at every one; the second shape's reference is
    # predicted from the first (the skip rule's path).
    assert all("x_reference" in row and "x_sdpa_forward_backward" in row for row in scan["rows"])
    assert {(r["channels"], r["gate_channels"], r["latent"]) for r in scan["rows"]} == {
        (64, 64, "2x3"),
        (64, 8, "2x3"),
        (64, 64, "4x6"),
        (64, 8, "4x6"),
    }
    assert scan["meta"]["kernel"] == "gspn_diffusers_cuda_emulation"
    tiles = json.loads((out / "cuda_tiles.json").read_text())
    assert [r["tile"] for r in tiles["rows"]] == [0, 1, 2, 4, 8, 16]
    assert all("kernel_forward_ms" in r for r in tiles["rows"])
    hires = json.loads((out / "hires_unet.json").read_text())
    assert hires["meta"]["backend"] == "emulation" and hires["meta"]["window"] == 16
    # Each attention measured at least its first size, and the original attention's windows were reached.
    for attention in ("gspn", "gspn-whole", "original"):
        rows = [r for r in hires["rows"] if r["attention"] == attention]
        assert "call_s" in rows[0], rows
    assert [r["mode"] for r in hires["rows"] if r["attention"] == "original"] == ["whole", "windows"]


def test_dry_run_pngs_open(dry_run):
    pytest.importorskip("matplotlib", reason="the PNGs need matplotlib (pip install -e '.[test]')")
    from PIL import Image

    out, _ = dry_run
    for name in PNGS:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100, name


def test_gpu_check_imports_only_listed_packages():
    """Everything the check's Python imports (lazily too) comes from a package of scripts/gpu_packages.txt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check_imports.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0, {k: report[k] for k in ("unlisted", "failed_imports", "wheel_requirements_missing")}
    files = set(report["files"])
    assert {"benchmarks/bench_cuda_scan.py", "benchmarks/bench_hires_unet.py", "tests/test_cuda_kernel.py"} <= files
    # The walk reached the lazy imports inside the benchmarks' functions and the pytest step.
    assert {"diffusers", "pytest", "torch"} <= set(report["direct_imports"])


def test_the_import_walk_sees_lazy_and_relative_imports(tmp_path):
    check = load_script("gpu_check_imports")
    script = tmp_path / "script.py"
    script.write_text(
        "import json\n\ndef f():\n    from diffusers import UNet2DConditionModel\n    import PIL.Image\n"
    )
    assert check.imports_in(script) == {"json", "diffusers", "diffusers.UNet2DConditionModel", "PIL.Image"}
    names = check.imports_in(ROOT / "gspn_diffusers" / "ops" / "cuda.py")
    assert "gspn_diffusers.ops.backend" in names and "torch" in names


def test_the_package_list_is_the_one_the_wheels_come_from(tmp_path):
    check = load_script("gpu_check_imports")
    listed = check.listed_packages()
    assert {"diffusers", "open-clip-torch", "importlib-metadata"} <= listed["wheel"]
    assert {"transformers", "pytest", "matplotlib", "pillow"} <= listed["image"]
    assert not listed["wheel"] & listed["image"]
    # fetch_gpu_wheels.sh downloads exactly the wheel lines: it names no package itself.
    fetch = (ROOT / "scripts" / "fetch_gpu_wheels.sh").read_text()
    assert "gpu_packages.txt" in fetch and not re.search(r"\w==\d", fetch)
    awk = re.search(r"awk '([^']+)' scripts/gpu_packages.txt", fetch).group(1)
    printed = subprocess.run(["awk", awk, str(check.PACKAGES_FILE)], capture_output=True, text=True, check=True)
    assert {check.normalize(line.split("==")[0]) for line in printed.stdout.split()} == listed["wheel"]
    # A list that lacks what the check imports, or that does not parse, is caught.
    assert check.uncovered({"diffusers": ["diffusers"], "PIL": ["pillow"]}, {"pillow"}) == {"diffusers": ["diffusers"]}
    bad = tmp_path / "packages.txt"
    bad.write_text("wheels diffusers==0.42.1\n")
    with pytest.raises(ValueError, match="expected 'wheel NAME==VERSION'"):
        check.listed_packages(bad)
