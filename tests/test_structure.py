"""Short, named steps: no function in ``img/`` or ``pipelines/`` is longer than ``MAX_LINES``.

A function's length is its ``def`` line to its last line (docstring, comments and nested functions
included). The jobs are small classes of named phases; the test also checks that those phases exist.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("img", "pipelines")
MAX_LINES = 60

# Declarative model builders: one keyword argument per line of a library config (UNet, VAE, text encoders,
# scheduler; vision tower, language model, LLaVA, processor), in the order the library documents them.
# Cutting them up would scatter one model's config over several functions and make no step clearer.
EXEMPT = {
    "img/models/tiny.py::_build_sdxl": "the tiny SDXL pipeline's component configs",
    "img/models/tiny.py::_build_llava": "the tiny LLaVA's vision, text and LLaVA configs and its processor",
}


def _functions() -> dict[str, int]:
    """``path::Qualified.name`` -> lines, for every function and method (nested ones too) under ``ROOTS``."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{path}::{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
                walk(child, path, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, path, f"{prefix}{child.name}.")
            else:
                walk(child, path, prefix)

    for root in ROOTS:
        for file in sorted((REPO / root).rglob("*.py")):
            walk(ast.parse(file.read_text(), str(file)), file.relative_to(REPO).as_posix(), "")
    return out


def test_no_function_on_a_main_path_exceeds_the_limit():
    lengths = _functions()
    assert lengths["img/training/trainer.py::run_training"] <= 20  # the walk sees the jobs (and they are small)
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in EXEMPT}
    table = "\n".join(f"  {n:4d}  {name}" for name, n in sorted(too_long.items(), key=lambda kv: -kv[1]))
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps):\n{table}"


def test_every_exemption_is_still_needed():
    lengths = _functions()
    stale = {name: lengths.get(name) for name in EXEMPT if lengths.get(name, 0) <= MAX_LINES}
    assert not stale, f"exempt functions that are gone or now short enough; drop them from EXEMPT: {stale}"


def test_jobs_are_named_phases():
    want = {
        "img/training/trainer.py": ("Trainer", {"validate", "build", "restore", "train", "step", "checkpoint",
                                                "evaluate", "finish"}),
        "img/finetune/train.py": ("Finetuner", {"validate", "build", "restore", "train", "step", "checkpoint",
                                                "evaluate", "finish"}),
    }
    for path, (cls, phases) in want.items():
        tree = ast.parse((REPO / path).read_text())
        found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        assert found, f"{path} has no class {cls}"
        methods = {n.name for n in found[0].body if isinstance(n, ast.FunctionDef)}
        assert phases <= methods, f"{path}::{cls} lacks the phases {sorted(phases - methods)}"


def test_the_architecture_map_names_every_module():
    """docs/architecture.md (the tree) and the README's table name every module under img/ and pipelines/."""
    tree = (REPO / "docs" / "architecture.md").read_text()
    readme = (REPO / "README.md").read_text()
    missing_tree, missing_readme = [], []
    for root in ROOTS:
        for file in sorted((REPO / root).rglob("*.py")):
            if file.name == "__init__.py":
                continue
            if f"{file.name} " not in tree:
                missing_tree.append(file.relative_to(REPO).as_posix())
            rel = file.relative_to(REPO).as_posix()
            if f"`{file.stem}`" not in readme and f"`{rel}`" not in readme:  # the README's table
                missing_readme.append(file.relative_to(REPO).as_posix())
    assert not missing_tree, f"add to the tree in docs/architecture.md: {missing_tree}"
    assert not missing_readme, f"add to the README's architecture table: {missing_readme}"
