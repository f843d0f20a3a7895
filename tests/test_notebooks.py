"""Notebooks are executed against a real lake (sample -> embed -> train -> eval), so they never rot."""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from img.data.sample import expected_counts, write_sample
from img.eval import report
from img.eval.prompts import write_shapes_prompts
from img.lake import tables as lake_mod
from img.lake.sql import run_query
from img.training.trainer import TrainConfig, run_training
from pipelines.embed import run_embed
from pipelines.embed_config import EmbedConfig
from pipelines.eval import plan_eval, run_eval
from pipelines.eval_config import EvalConfig

PAIRS, CORRUPT = 64, 0.05

pytestmark = pytest.mark.slow  # embed, train and eval jobs, then a Jupyter kernel per notebook


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    data, lake = str(root / "data"), str(root / "lake")
    write_sample(data, pairs=PAIRS, seed=2, corrupt=CORRUPT)
    run_embed(data, lake, "tiny", EmbedConfig(), progress=False)
    cfg = TrainConfig(log_every=5, heldout_pairs=20, global_batch=0, checkpoint_every=1000, num_workers=0)
    run_training(lake, "tiny", 16, root / "run", cfg)
    prompts = write_shapes_prompts(root / "prompts", n=12, seed=0)
    reference = next((root / "run" / "checkpoints").glob("step_*/reference"))  # a second, different aligner
    plan = plan_eval(prompts, lake, "tiny", ["tiny"], n=4,
                     aligners=[str(root / "run" / "aligner"), f"ref={reference}"])
    summary = run_eval(plan, EvalConfig(), progress=False)
    return {"root": root, "data": data, "lake": lake, "eval": summary}


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIGURES = {
    "dataset_analysis.ipynb": ["caption_lengths", "model_mix", "quarantine_reasons", "guidance_lengths"],
    "training_eval.ipynb": ["loss_parts", "heldout", "win_rates", "image_grid"],
}


def _result(cell) -> str:
    """The text of a code cell's value (its ``execute_result``)."""
    (out,) = [o for o in cell.outputs if o.output_type == "execute_result"]
    return out.data["text/plain"]


def _check_lake_tour(cells, lake: str) -> None:
    tables = {t["name"]: t["rows"] for t in ast.literal_eval(_result(cells[0]))}  # the table listing it printed
    for name in ("pairs", "features", "quarantine"):
        assert tables[name] == lake_mod.open_table(lake, name).count_rows(), (name, tables)
    assert tables["pairs"] > 40 and tables["quarantine"] > 0
    by_kind = ast.literal_eval(_result(cells[1]))
    assert sum(r["n"] for r in by_kind) == tables["pairs"] and {r["broken"] for r in by_kind} > {"colour"}
    lens, quarantine = ast.literal_eval(_result(cells[2]))
    assert sum(r["n"] for r in quarantine) == tables["quarantine"] and all(r["reason"] for r in quarantine)
    assert all(r["L"] > 0 for r in lens)


# What each notebook shows is checked: its printed values against the lake, or the figures it saves (whose
# numbers come from img.eval.report, checked against the lake in test_report_numbers_match_the_lake).
CHECKS = {"lake_tour.ipynb": _check_lake_tour}


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, built, repo_root, monkeypatch, tmp_path):
    monkeypatch.setenv("IMG_LAKE", built["lake"])
    monkeypatch.setenv("IMG_SOURCE", built["data"])
    monkeypatch.setenv("IMG_FIGURES", str(tmp_path / "figures"))
    nb = nbformat.read(repo_root / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo_root)}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in cells for o in c.outputs if o.get("output_type") == "error"]
    assert name in CHECKS or name in FIGURES, f"{name} has no check of what it shows in tests/test_notebooks.py"
    if name in CHECKS:
        CHECKS[name](cells, built["lake"])
    for fig in FIGURES.get(name, []):
        png = tmp_path / "figures" / f"{fig}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig


def test_report_numbers_match_the_lake(built):
    """The notebooks' tables are right: each checked against the lake or the sample's exact counts."""
    lake, data = built["lake"], built["data"]
    pairs = lake_mod.open_table(lake, "pairs").count_rows()
    quarantined = lake_mod.open_table(lake, "quarantine").count_rows()
    exp = expected_counts(PAIRS, corrupt=CORRUPT)
    assert sum(r["pairs"] for r in report.caption_lengths(lake)) == pairs
    assert sum(r["pairs"] for r in report.guidance_lengths(lake)) == pairs
    assert sum(r["rows"] for r in report.quarantine_reasons(lake)) == quarantined == exp["corrupt"]
    assert report.tie_share(data, lake) == [{"rows": PAIRS, "ties": exp["ties"],
                                             "tie_share": round(exp["ties"] / PAIRS, 4)}]
    mix = report.model_mix(data, lake)
    assert sum(m["images"] for m in mix) == 2 * PAIRS and sum(m["wins"] for m in mix) == exp["decisive"]
    parts = {r["name"] for r in report.loss_parts(lake)}
    assert {"loss", "loss_base", "loss_pref"} <= parts
    held = {r["metric"] for r in report.heldout(lake) if r["kind"] == ""}
    assert {"heldout_win_rate", "heldout_d_aligned", "heldout_d_identity"} <= held
    summary = built["eval"]
    rates = report.win_rates(lake, summary.run)
    assert rates and all(r["n"] == 4 for r in rates if r["category"] == "(all)")
    assert {r["system"] for r in rates} == {"img", "ref"}  # two systems, each against the same base images
    means = report.mean_scores(lake, summary.run)
    assert {(m["scorer"], m["system"]) for m in means} == {(s, x) for s in ("pickscore", "hpsv2")
                                                           for x in ("base", "img", "ref")}
    grid = report.image_rows(lake, summary.run, prompts=3)
    assert len(grid) == 3 and all(set(r["images"]) == {"base", "img", "ref"} for r in grid)
    assert all(r["images"]["base"][:4] == b"\x89PNG" for r in grid)
    assert any(r["images"]["img"] != r["images"]["ref"] for r in grid)  # the aligner was swapped between systems
    ids = report.query(lake, "select system, any_value(aligner_id) as aid from eval_images group by system")
    assert len({r["aid"] for r in ids}) == 3


def test_readme_queries_run_on_the_lake(built, repo_root):
    """The five researcher queries of the README return rows on a lake with pairs, metrics and eval tables."""
    readme = (repo_root / "README.md").read_text()
    block = readme.split("Five queries a researcher runs")[1].split("```sql")[1].split("```")[0]
    queries = [q.strip() for q in re.split(r";\s*\n", block) if q.strip()]
    assert len(queries) == 5
    for q in queries:
        rows = json.loads(run_query(built["lake"], q, as_json=True))
        assert rows, q.splitlines()[0]
