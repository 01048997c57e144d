"""The gspn-diffusers command line on the built-in tiny models."""

from __future__ import annotations

import argparse
import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import gspn_diffusers
from gspn_diffusers.cli import main
from gspn_diffusers.cli_args import DTYPE_NAMES, LOCAL_MODES, TINY_KINDS, add_config_args, config_from_args
from gspn_diffusers.serialization import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_convert_then_generate(tmp_path, kind):
    weights = tmp_path / "weights"
    assert main(["convert", "--tiny", kind, "--output", str(weights), "--gate-rank", "2"]) == 0
    assert (weights / CONFIG_NAME).is_file() and (weights / WEIGHTS_NAME).is_file()
    image_path = tmp_path / "out" / "image.png"
    args = [
        "generate",
        "--tiny",
        kind,
        "--gspn-weights",
        str(weights),
        "--prompt",
        "a lighthouse",
        "--height",
        "64",
        "--width",
        "128",
        "--steps",
        "2",
        "--output",
        str(image_path),
    ]
    assert main(args) == 0
    assert Image.open(image_path).size == (128, 64)


def test_generate_original_attention(tmp_path):
    image_path = tmp_path / "original.png"
    args = [
        "generate",
        "--tiny",
        "sd15",
        "--original",
        "--prompt",
        "x",
        "--height",
        "128",
        "--width",
        "64",
        "--steps",
        "1",
        "--output",
        str(image_path),
    ]
    assert main(args) == 0
    assert Image.open(image_path).size == (64, 128)


def _generate(tmp_path, *extra: str) -> list[str]:
    return ["generate", "--tiny", "sd15", "--prompt", "x", "--output", str(tmp_path / "x.png"), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--steps", "-3"], "argument --steps: must be >= 1, got -3"),
        (["--height", "0"], "argument --height: must be >= 1, got 0"),
        (["--width", "100"], "argument --width: must be a multiple of 8"),
        (["--chunk-size", "0"], "argument --chunk-size: must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(_generate(tmp_path, *extra))
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_user_mistakes_are_one_line_errors_before_any_model_loads(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    no_model = str(tmp_path / "no_such_model")

    def error_of(argv: list[str]) -> str:
        caplog.clear()
        assert main(argv) == 2
        assert len(caplog.records) == 1 and "Traceback" not in caplog.text
        return caplog.records[0].getMessage()

    # Each of these names a model folder that does not exist: the argument is refused before loading is tried.
    base = ["generate", "--model", no_model, "--prompt", "x"]
    assert "unknown image extension '(none)'" in error_of([*base, "--output", str(tmp_path / "image")])
    assert "PIL can read .psd but not write it" in error_of([*base, "--output", str(tmp_path / "image.psd")])
    weights = str(tmp_path / "w")
    message = error_of([*base, "--gspn-weights", weights, "--chunk-size", "8", "--output", str(tmp_path / "a.png")])
    assert "--chunk-size would be ignored" in message
    message = error_of([*base, "--original", "--chunk-size", "global", "--output", str(tmp_path / "a.png")])
    assert "--original with --chunk-size" in message
    message = error_of([*base, "--skip-ratio", "1", "--output", str(tmp_path / "a.png")])
    assert message.startswith("--skip-ratio 1.0: each stage's strength must be in (0, 1]")
    assert "GSPN weights folder" in error_of([*base, "--gspn-weights", weights, "--output", str(tmp_path / "a.png")])
    if not torch.cuda.is_available():
        message = error_of([*base, "--device", "cuda", "--output", str(tmp_path / "a.png")])
        assert "--device cuda: PyTorch sees no CUDA GPU" in message
    assert "no such folder" in error_of(["convert", "--model", no_model, "--output", str(tmp_path / "w")])
    assert "no such folder" in error_of(["convert", "--model", "./models/sd15", "--output", str(tmp_path / "w")])
    # A relative org/name-like path that is neither a folder nor cached is not sent to the hub (offline).
    message = error_of(["convert", "--model", "models/sd15", "--output", str(tmp_path / "w")])
    assert "no such folder" in message and "Hugging Face cache" in message


def test_convert_does_not_replace_weights_without_overwrite(tmp_path, caplog):
    weights = tmp_path / "weights"
    assert main(["convert", "--tiny", "sd15", "--output", str(weights), "--gate-rank", "2"]) == 0
    before = (weights / WEIGHTS_NAME).read_bytes()
    caplog.set_level(logging.ERROR)
    assert main(["convert", "--tiny", "sd15", "--output", str(weights)]) == 2
    assert "already holds GSPN weights; pass --overwrite" in caplog.text
    assert (weights / WEIGHTS_NAME).read_bytes() == before
    assert main(["convert", "--tiny", "sd15", "--output", str(weights), "--overwrite"]) == 0
    assert (weights / WEIGHTS_NAME).read_bytes() != before  # gate rank 4 now: other shapes


def test_chunk_size_global_overrides_the_preset():
    args = argparse.Namespace(preset="sd15", gate_rank=None, gate_channels=None, chunk_size=None)
    assert config_from_args(args, unet=None).layer_chunk_sizes  # the preset's local layers
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--preset", "sd15", "--chunk-size", "global"])
    config = config_from_args(args, unet=None)
    assert config.chunk_size is None and config.layer_chunk_sizes == {}


def test_parser_choices_match_the_library():
    from gspn_diffusers.loading import DTYPES
    from gspn_diffusers.pipelines.demofusion import LOCAL_MODES as LIBRARY_LOCAL_MODES
    from gspn_diffusers.tiny import TINY_KINDS as LIBRARY_TINY_KINDS

    assert (TINY_KINDS, DTYPE_NAMES, LOCAL_MODES) == (LIBRARY_TINY_KINDS, tuple(DTYPES), LIBRARY_LOCAL_MODES)


def test_high_resolution_run_prints_no_empty_module_list_warning(capfd):
    from gspn_diffusers.pipelines import GSPNDemoFusionSDXLPipeline
    from gspn_diffusers.tiny import tiny_pipeline

    GSPNDemoFusionSDXLPipeline.from_pipe(tiny_pipeline("sdxl"))
    assert "should be kept in float32: []" not in capfd.readouterr().err


def test_help_is_fast_and_imports_neither_torch_nor_diffusers():
    code = (
        "import sys, time; t = time.perf_counter(); from gspn_diffusers.cli import build_parser; "
        "build_parser().format_help(); build_parser('generate'); build_parser('distill'); build_parser('evaluate'); "
        "print(time.perf_counter() - t, 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]
    assert float(out[0]) < 2.0  # about 0.05 s on a 2-core CPU machine; torch alone takes 1.5 s to import


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """gspn_diffusers modules that ``path`` imports (module-level statements only, if asked: those under ``if
    TYPE_CHECKING:`` count), with their parents."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # a type-only import (under `if TYPE_CHECKING:`) still ties the two modules in a circle
        nodes = nodes + [
            inner
            for node in tree.body
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in node.body
        ]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, [base, node.module]))
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in found if name.startswith("gspn_diffusers") and name != module}


def test_import_graph_has_no_circles_and_no_library_module_imports_the_cli():
    root = Path(gspn_diffusers.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    cli_modules = {"gspn_diffusers.cli", "gspn_diffusers.distill.cli", "gspn_diffusers.evaluation.cli"}
    cli_modules |= {"gspn_diffusers.distill.args"}  # the trainer's flags
    entry_scripts = {"gspn_diffusers.distill.train"}  # `accelerate launch -m ...`: parses its own arguments
    for module, path in modules.items():
        imported = _imports(path, module, top_level_only=False)
        assert "gspn_diffusers.cli" not in imported, f"{module} imports the main CLI"
        if module not in cli_modules | entry_scripts:
            assert "gspn_diffusers.cli_args" not in imported, f"library module {module} imports the CLI arguments"
    graph = {module: _imports(path, module, top_level_only=True) & set(modules) for module, path in modules.items()}
    assert _find_circle(graph) is None
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "a.x": set()}) == ["a", "b", "c", "a"]


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import circle through module-level imports, or None. A package importing its own submodules (and they
    their parent package) is the normal package layout, not a circle."""

    def visit(module: str, stack: list[str]) -> list[str] | None:
        if module in stack:
            return [*stack[stack.index(module) :], module]
        for child in sorted(graph[module]):
            if not child.startswith(module + "."):
                circle = visit(child, [*stack, module])
                if circle:
                    return circle
        return None

    return next((circle for module in sorted(graph) if (circle := visit(module, []))), None)


def test_a_failed_image_save_leaves_the_previous_file_and_no_partial_one(tmp_path):
    from gspn_diffusers.pipelines.cli_support import save_image

    class FailingImage:
        def save(self, path):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")

    (tmp_path / "a.png").write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        save_image(FailingImage(), tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"previous"


def test_distill_flag_choices_are_the_library_s():
    """The trainer's choices are listed without importing torch or Diffusers; they must stay the library's."""
    from diffusers.optimization import SchedulerType

    from gspn_diffusers.distill import args, losses

    assert sorted(args.LR_SCHEDULERS) == sorted(t.value for t in SchedulerType)
    assert (args.FEATURE_LOSSES, args.FEATURE_REDUCTIONS) == (losses.FEATURE_LOSSES, losses.FEATURE_REDUCTIONS)
