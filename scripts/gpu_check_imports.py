"""Which packages the GPU check imports, against the one list of what its machine has (scripts/gpu_packages.txt).

    python scripts/gpu_check_imports.py          # JSON report; exit status 1 where something is not in the list

The GPU machine has no network: a module that the check imports from a package neither on its image nor among the
wheels of scripts/fetch_gpu_wheels.sh fails there, in the few minutes a GPU is lent. This walks, here, everything
scripts/gpu_check.sh runs: the Python files it names (benchmarks, the pytest selections of both runs and their
conftest), the modules its inline Python imports, and then, recursively, every module of this package and every local
helper they reach. Each import statement counts, also those inside functions (the benchmarks import lazily), and each
is imported so that this package's modules it loads are walked too. Every module those statements name must come
from the standard library, this package, a local helper or a distribution named in the list, and every wheel's own
requirements (they install ``--no-deps``) must be named too. What third-party packages import in turn is reported,
not judged: the image's packages come with their own dependencies, in versions other than this environment's.
Distributions are found from the installed metadata here (``importlib.metadata.packages_distributions``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gspn_diffusers"
PACKAGES_FILE = ROOT / "scripts" / "gpu_packages.txt"
CHECK_SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# What pytest loads beside the test files that gpu_check.sh names.
ALWAYS = (ROOT / "tests" / "conftest.py",)
# The GPU machine's Python, for the markers of the wheels' requirements.
TARGET_PYTHON = "3.12"


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def listed_packages(path: Path = PACKAGES_FILE) -> dict[str, set[str]]:
    """{"wheel": names, "image": names} of the list (normalised, versions dropped)."""
    kinds: dict[str, set[str]] = {"wheel": set(), "image": set()}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] not in kinds or len(words) < 2:
            raise ValueError(f"{path}:{number}: expected 'wheel NAME==VERSION' or 'image NAME ...', got {line!r}")
        kinds[words[0]].update(normalize(re.split(r"[=<>!~;\[ ]", word, maxsplit=1)[0]) for word in words[1:])
    return kinds


def check_files(script: Path = CHECK_SCRIPT) -> tuple[list[Path], set[str]]:
    """(the Python files gpu_check.sh runs, the modules its inline Python imports)."""
    text = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    files = sorted({ROOT / match for match in re.findall(r"\b(?:benchmarks|tests)/[\w/]+\.py\b", text)})
    modules = set(re.findall(r"\bfrom\s+([A-Za-z_][\w.]*)\s+import\b", text))
    modules |= {m for m in re.findall(r"(?:^|[;\"]\s*)import\s+([A-Za-z_][\w.]*)", text, re.MULTILINE)}
    return files + [p for p in ALWAYS if p not in files], modules


def module_name_of(path: Path) -> str | None:
    """The package module a file of this checkout is (None for a script or a local helper)."""
    try:
        parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    except ValueError:
        return None
    if parts[0] != PACKAGE:
        return None
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(path: Path) -> set[str]:
    """Absolute names of the modules every import statement of a file names (and ``from X import y`` submodules)."""
    module = module_name_of(path)
    package = module if module and path.name == "__init__.py" else (module.rpartition(".")[0] if module else None)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    continue
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def is_local(file: str | None) -> bool:
    """A module file of this checkout (torch names some of its generated modules by a relative path: not local)."""
    if not file or not Path(file).is_absolute():
        return False
    return Path(file).resolve().is_relative_to(ROOT) and ".venv" not in Path(file).parts


def walk(files: list[Path], modules: set[str]) -> tuple[set[str], list[str]]:
    """Import everything the files and modules name, recursively through this checkout's modules.

    Returns (every module name an import statement of a local file names, the imports that failed as
    "name: error"); a ``from X import name`` that is not a submodule is tried as one and skipped quietly.
    """
    for folder in {str(p.parent) for p in files}:
        if folder not in sys.path:
            sys.path.insert(0, folder)  # what running the script or pytest's rootdir-relative import puts there
    pending = set(modules)
    for path in files:
        pending |= imports_in(path)
    named = set(pending)
    seen_files = {p.resolve() for p in files}
    failed: list[str] = []
    done: set[str] = set()
    while pending:
        name = pending.pop()
        if name in done or not name:
            continue
        done.add(name)
        parent = name.rpartition(".")[0]
        try:
            if parent and parent in sys.modules and importlib.util.find_spec(name) is None:
                continue  # `from package import function`
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and (name == error.name or name.startswith(error.name + ".")) and parent in sys.modules:
                continue  # a name inside a module, not a submodule
            failed.append(f"{name}: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - a module that fails to import is reported, not fatal
            failed.append(f"{name}: {type(error).__name__}: {error}")
            continue
        for loaded in list(sys.modules.values()):
            file = getattr(loaded, "__file__", None)
            if is_local(file) and file.endswith(".py") and Path(file).resolve() not in seen_files:
                seen_files.add(Path(file).resolve())
                found = imports_in(Path(file))
                named |= found
                pending |= found - done
    return named, sorted(failed)


def is_foreign(top: str) -> bool:
    """Not the standard library, this package or a local helper (a module of tests/ or benchmarks/)."""
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top in (PACKAGE, "__main__"):
        return False
    module = sys.modules.get(top)
    return not (module is not None and is_local(getattr(module, "__file__", None)))


def distributions_of(top: str, owners: dict[str, list[str]]) -> set[str]:
    """The distributions that install a top-level module here; its own name where it is not installed."""
    return {normalize(d) for d in owners.get(top, ())} or {normalize(top)}


def uncovered(direct: dict[str, list[str]], allowed: set[str]) -> dict[str, list[str]]:
    """{top-level module: its distributions} for the imports that no allowed distribution provides."""
    return {top: dists for top, dists in direct.items() if not set(dists) & allowed}


def report() -> dict:
    """What the check's code imports, and what the list does not cover (see the module doc)."""
    listed = listed_packages()
    allowed = listed["wheel"] | listed["image"] | {"torch"}
    files, inline = check_files()
    named, failed = walk(files, inline)
    owners = metadata.packages_distributions()
    direct: dict[str, list[str]] = {}
    for top in sorted({name.partition(".")[0] for name in named}):
        if is_foreign(top):
            direct[top] = sorted(distributions_of(top, owners))
    unlisted = uncovered(direct, allowed)
    # A failed import matters where it is this checkout's or from no listed package: a listed one missing here
    # (e.g. matplotlib outside the test extra) is still on the GPU machine.
    failures = [f for f in failed if not distributions_of(f.partition(".")[0].partition(":")[0], owners) & allowed]
    # Modules the third-party packages load in turn (their own dependencies, optional imports of what happens to be
    # installed here): for information; the image's packages come with their dependencies.
    indirect = sorted(
        {
            top
            for top in {name.partition(".")[0] for name in sys.modules}
            if top not in direct and is_foreign(top) and not distributions_of(top, owners) & allowed
        }
    )
    return {
        "files": [str(p.relative_to(ROOT)) for p in files],
        "direct_imports": direct,
        "unlisted": unlisted,
        "failed_imports": failures,
        "failed_imports_of_listed_packages": [f for f in failed if f not in failures],
        "indirect_unlisted": indirect,
        "wheel_requirements_missing": wheel_requirements_missing(listed["wheel"], allowed),
    }


def wheel_requirements_missing(wheels: set[str], allowed: set[str]) -> dict[str, list[str]]:
    """{wheel: its requirements (for the GPU machine's Python, no extras) that the list does not name}."""
    from packaging.requirements import Requirement

    environment = {"python_version": TARGET_PYTHON, "python_full_version": f"{TARGET_PYTHON}.0", "extra": ""}
    missing: dict[str, list[str]] = {}
    for wheel in sorted(wheels):
        try:
            requires = metadata.requires(wheel) or []
        except metadata.PackageNotFoundError:
            missing[wheel] = ["(not installed here: cannot read its requirements)"]
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if normalize(requirement.name) not in allowed:
                missing.setdefault(wheel, []).append(text)
    return missing


def main() -> int:
    result = report()
    print(json.dumps(result, indent=1))
    problems = [k for k in ("unlisted", "failed_imports", "wheel_requirements_missing") if result[k]]
    if problems:
        print(f"not covered by {PACKAGES_FILE.relative_to(ROOT)}: {', '.join(problems)}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
