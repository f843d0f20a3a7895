"""Notebooks are executed against a real lake, so they never rot."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import lance
import nbformat
import pytest
from nbclient import NotebookClient

from img.data.sample import write_sample
from img.lake.tables import table_uri
from pipelines.embed import run_embed
from pipelines.embed_config import EmbedConfig

pytestmark = pytest.mark.slow  # an embed job, then a Jupyter kernel per notebook


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    write_sample(str(root / "data"), pairs=64, seed=2, corrupt=0.05)
    run_embed(str(root / "data"), str(root / "lake"), "tiny", EmbedConfig(), progress=False)
    return str(root / "lake")


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _result(cell) -> str:
    """The text of a code cell's value (its ``execute_result``)."""
    (out,) = [o for o in cell.outputs if o.output_type == "execute_result"]
    return out.data["text/plain"]


def _check_lake_tour(cells, lake: str) -> None:
    tables = {t["name"]: t["rows"] for t in ast.literal_eval(_result(cells[0]))}  # the table listing it printed
    for name in ("pairs", "features", "quarantine"):
        assert tables[name] == lance.dataset(table_uri(lake, name)).count_rows(), (name, tables)
    assert tables["pairs"] > 40 and tables["quarantine"] > 0
    by_kind = ast.literal_eval(_result(cells[1]))
    assert sum(r["n"] for r in by_kind) == tables["pairs"] and {r["broken"] for r in by_kind} > {"colour"}
    lens, quarantine = ast.literal_eval(_result(cells[2]))
    assert sum(r["n"] for r in quarantine) == tables["quarantine"] and all(r["reason"] for r in quarantine)
    assert all(r["L"] > 0 for r in lens)


CHECKS = {"lake_tour.ipynb": _check_lake_tour}  # a new notebook gets a check of what it shows


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, lake, repo_root, monkeypatch):
    monkeypatch.setenv("IMG_LAKE", lake)
    nb = nbformat.read(repo_root / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo_root)}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in cells for o in c.outputs if o.get("output_type") == "error"]
    assert name in CHECKS, f"{name} has no check of its outputs in tests/test_notebooks.py"
    CHECKS[name](cells, lake)
