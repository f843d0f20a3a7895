"""Notebooks are executed against a real lake, so they never rot."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from img.data.sample import write_sample
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


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, lake, repo_root, monkeypatch):
    monkeypatch.setenv("IMG_LAKE", lake)
    nb = nbformat.read(repo_root / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo_root)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("pairs" in str(o.get("data", {})) for o in outputs)  # the table listing was produced
