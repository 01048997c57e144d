"""Which compiled arch of a build serves which GPU: the rule of ``ops.policy.arch_covered`` and the build flags of
``ops.cuda_build`` it must agree with. Hand-written cases, each on an edge an off-by-one would cross.

CUDA's rule: machine code (SASS) for sm_XY runs on sm_XZ with Z >= Y (same major, not older minor, never another
major); PTX for compute_XY is compiled by the driver for any sm >= XY. Our builds ship SASS for every listed
arch and PTX of the newest only.
"""

from __future__ import annotations

import re

import pytest

from gspn_diffusers.ops import cuda_build
from gspn_diffusers.ops.policy import arch_covered

DEFAULT = [75, 80, 86, 89, 90]  # what CUDA 13's nvcc builds by default (README)


@pytest.mark.parametrize(
    "sm,archs,covered",
    [
        # same major, not older: SASS of 8.0 runs on 8.6 and 8.9, SASS of 8.6 not on 8.0
        (86, [80], True),
        (89, [80], True),
        (80, [86], False),
        (80, [80], True),
        (87, [86], True),
        # another major never runs SASS: 8.x code on 7.x; 7.5 on 8.0 only through 7.5's PTX (it is the newest)
        (80, [75], True),
        (75, [80, 86], False),
        (70, [75], False),
        (72, [75], False),
        # PTX of the newest: any newer GPU, however far, but not an older one and not via an older arch's PTX
        (90, [80], True),
        (100, [90], True),
        (120, [75, 90], True),
        (89, [90], False),
        (80, [75, 90], False),  # between two archs of other majors: 7.5's SASS is another major, 9.0's PTX too new
        (86, [75, 90], False),
        # the default build covers every GPU from Turing on, and nothing older
        (75, DEFAULT, True),
        (87, DEFAULT, True),
        (90, DEFAULT, True),
        (100, DEFAULT, True),
        (70, DEFAULT, False),
        (61, DEFAULT, False),
        # an empty build covers nothing
        (90, [], False),
    ],
)
def test_arch_covered_by_hand(sm, archs, covered):
    assert arch_covered(sm, archs) is covered


def _driver_coverage(sm: int, flags: list[str]) -> bool:
    """What the CUDA driver would run, read from nvcc's -gencode flags (independent of the policy's code)."""
    sass, ptx = [], []
    for flag in flags:
        arch, code = re.fullmatch(r"-gencode=arch=compute_(\d+),code=(sm|compute)_(\d+)", flag).group(1, 2)
        (sass if code == "sm" else ptx).append(int(arch))
    return any(a // 10 == sm // 10 and a <= sm for a in sass) or any(sm >= a for a in ptx)


@pytest.mark.parametrize("archs", ["7.5;8.0;8.6;8.9;9.0", "8.0", "9.0;8.6", "7.5,9.0", "8.6;8.0;8.6"])
def test_policy_agrees_with_what_the_build_flags_ship(archs):
    """For every GPU from sm_50 to sm_130, the policy's answer equals the driver's for the build's -gencode flags:
    a build that shipped PTX of another arch, or dropped one, would disagree somewhere."""
    flags = cuda_build.arch_flags(archs)
    numbers = [int(n) for n in cuda_build.arch_numbers(archs)]
    assert flags[-1] == f"-gencode=arch=compute_{max(numbers)},code=compute_{max(numbers)}"  # PTX of the newest
    assert sum("code=compute_" in flag for flag in flags) == 1
    for sm in range(50, 131):
        assert arch_covered(sm, numbers) is _driver_coverage(sm, flags), f"sm_{sm}, build {archs}"


def test_the_compiled_arch_list_is_sorted_and_deduplicated():
    """``compiled_archs()`` of a module comes from GSPN_COMPILED_ARCHS, which is this list: the newest is last."""
    assert cuda_build.arch_numbers("9.0;8.6;8.6;7.5") == ["75", "86", "90"]
    cxx, _ = cuda_build.compile_flags("9.0;8.6;7.5")
    assert "-DGSPN_COMPILED_ARCHS=75,86,90" in cxx
