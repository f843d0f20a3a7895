"""The package graph has no cycles, and every module imports on its own in a fresh interpreter.

A cycle that "works" only because some import sits inside a function, or only in one import
order, fails here: the static test checks module-level imports, the subprocess test imports each
module first thing in a new interpreter, in a seeded random order.
"""
from __future__ import annotations

import ast
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("img", "pipelines", "schemas")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _project_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported by ``name`` at module level (what runs at import time)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def test_no_import_cycles():
    mods = _modules()
    graph = {n: _project_imports(n, p, set(mods)) for n, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert len(state) == len(mods) > 30


def test_library_imports_no_app_code():
    mods = _modules()
    app = {n for n in mods if n == "img.cli" or n.startswith("img.app")}
    for n, p in mods.items():
        if n.startswith("img.") and n not in app:
            bad = {m for m in _project_imports(n, p, set(mods)) if m in app}
            assert not bad, f"library module {n} imports app code {sorted(bad)}"


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(_modules())
    random.Random(0).shuffle(names)

    def run(name: str) -> tuple[str, int, str]:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
        return name, r.returncode, r.stderr.strip().splitlines()[-1:] and r.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(2) as pool:
        failures = [(n, err) for n, rc, err in pool.map(run, names) if rc != 0]
    assert not failures, failures
