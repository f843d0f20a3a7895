"""Eval prompt sets in their published formats, DuckDB sampling, and win rates (no models, no Ray)."""
from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from img.cli import app
from img.config import load_config
from img.data import shapes_world as sw
from img.errors import UserError
from img.eval.prompts import detect_format, load_prompt_set, write_shapes_prompts
from img.eval.sampling import DEFAULT_SAMPLE_SQL, sample_prompts
from img.eval.winrates import compute_win_rates, render, wilson
from pipelines.eval import parse_aligners
from pipelines.eval_config import EvalConfig
from schemas import pickapic
from schemas import prompts as prompts_schema
from schemas import scores as scores_schema


# ----------------------------------------------------------------------------- fixtures in the published forms
@pytest.fixture()
def hpd(tmp_path):
    """HPDv2 ``benchmark/``: one JSON list of prompts per style."""
    d = tmp_path / "benchmark"
    d.mkdir()
    styles = {
        "anime": ["A girl with \"pink\" hair, anime style", "a cat café"],
        "concept-art": ["a castle on a cliff, concept art"],
        "paintings": ["an oil painting of a harbour", "  ", "a still life"],
        "photo": ["a photo of a dog"],
    }
    for style, prompts in styles.items():
        (d / f"{style}.json").write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    return d


PARTI_TSV = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
    "peace\tAbstract\tBasic\t\n"
    "A robot painted as graffiti on a brick wall. The words \"Fly an airplane\" are written on the wall.\t"
    "Outdoor Scenes\tComplex\t\n"
    "a red cube\tIllustrations\tBasic\t\n"
    "a portrait of a statue of the Egyptian god Anubis, flying over the city of Mars. \tWorld Knowledge\tComplex\t\n"
)

T2I = {
    "color_val.txt": "a green bench and a blue bowl\na blue bench and a green bowl\n",
    "shape_val.txt": "a round bagel and a rectangular belt\n",
    "texture_val.txt": "a rubber tire and a glass mirror\n",
    "spatial_val.txt": "a girl on the left of a horse\n",
    "non_spatial_val.txt": "a man is watching a cat\n",
    "complex_val.txt": "The red hat was on top of the brown coat rack.\n",
    "color_train.txt": "a train prompt that the evaluation split does not hold\n",
}


def _pickapic_shard(path, captions):
    n = len(captions)
    cols = {f.name: [None] * n for f in pickapic.SCHEMA}
    cols.update(caption=captions, jpg_0=[b"\xff\xd8"] * n, jpg_1=[b"\xff\xd8"] * n, label_0=[1.0] * n,
                label_1=[0.0] * n, are_different=[True] * n, has_label=[True] * n)
    pq.write_table(pa.table(cols, schema=pickapic.SCHEMA), path)


# ----------------------------------------------------------------------------- formats
def test_hpdv2_folder(hpd):
    assert detect_format(hpd) == "hpdv2"
    ps = load_prompt_set(hpd)
    rows = ps.table.to_pylist()
    assert ps.name == "hpdv2" and ps.table.schema.equals(prompts_schema.SCHEMA)
    assert [r["prompt_id"] for r in rows] == ["anime/00000", "anime/00001", "concept-art/00000", "paintings/00000",
                                              "paintings/00002", "photo/00000"]  # blank prompt dropped, ids kept
    assert rows[0]["prompt"] == 'A girl with "pink" hair, anime style' and rows[1]["prompt"] == "a cat café"
    assert ps.categories() == ["anime", "concept-art", "paintings", "photo"]
    one = load_prompt_set(hpd / "photo.json")
    assert one.name == "hpdv2-photo" and one.table.column("category").to_pylist() == ["photo"]


def test_parti_tsv_keeps_quotes_and_categories(tmp_path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text(PARTI_TSV, encoding="utf-8")
    assert detect_format(f) == detect_format(tmp_path) == "parti"
    ps = load_prompt_set(f)
    rows = ps.table.to_pylist()
    assert ps.name == "parti" and len(rows) == 5
    assert rows[2]["prompt"].startswith('A robot painted as graffiti') and '"Fly an airplane"' in rows[2]["prompt"]
    assert rows[4]["prompt"].endswith("city of Mars.")  # stripped
    assert [r["category"] for r in rows] == ["Abstract", "Abstract", "Outdoor Scenes", "Illustrations",
                                             "World Knowledge"]
    assert [r["prompt_id"] for r in rows] == [f"{i:05d}" for i in range(5)]


def test_t2i_compbench_folder_reads_the_val_split(tmp_path):
    d = tmp_path / "dataset"
    d.mkdir()
    for name, text in T2I.items():
        (d / name).write_text(text, encoding="utf-8")
    assert detect_format(d) == "t2i-compbench"
    ps = load_prompt_set(d)
    cats = Counter(ps.table.column("category").to_pylist())
    assert cats == {"color": 2, "shape": 1, "texture": 1, "spatial": 1, "non_spatial": 1, "complex": 1}
    assert "a train prompt that the evaluation split does not hold" not in ps.table.column("prompt").to_pylist()
    assert "color/00001" in ps.table.column("prompt_id").to_pylist() and ps.name == "t2i-compbench"
    single = load_prompt_set(d / "spatial_val.txt")
    assert single.name == "t2i-compbench-spatial" and single.table.column("category").to_pylist() == ["spatial"]


def test_pickapic_test_unique_parquet(tmp_path):
    d = tmp_path / "test_unique"
    d.mkdir()
    _pickapic_shard(d / "test_unique-00000-of-00002.parquet", ["a dog on a skateboard", "", "a cube"])
    _pickapic_shard(d / "test_unique-00001-of-00002.parquet", ["a neon city at night"])
    assert detect_format(d) == "pickapic"
    ps = load_prompt_set(d)
    assert ps.name == "pickapic-test"
    assert list(zip(ps.table.column("prompt_id").to_pylist(), ps.table.column("prompt").to_pylist())) == [
        ("00000", "a dog on a skateboard"), ("00002", "a cube"), ("00003", "a neon city at night")]
    assert ps.categories() == [""]


def test_plain_text_and_override(tmp_path):
    f = tmp_path / "my prompts.txt"
    f.write_text("a red circle\n\n  two blue squares  \n", encoding="utf-8")
    assert detect_format(f) == "text"
    ps = load_prompt_set(f)
    assert ps.name == "my-prompts" and ps.table.column("prompt").to_pylist() == ["a red circle", "two blue squares"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text(PARTI_TSV, encoding="utf-8")
    as_text = load_prompt_set(tsv, fmt="text", name="raw")  # --prompt-format wins over detection
    assert len(as_text) == 6 and as_text.table.column("prompt").to_pylist()[0] == "Prompt\tCategory\tChallenge\tNote"
    with pytest.raises(UserError, match="`prompt_format` 'csv'"):
        load_prompt_set(f, fmt="csv")
    with pytest.raises(UserError, match="`set_name`"):
        load_prompt_set(f, name="bad name!")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompt"):
        load_prompt_set(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_set(tmp_path / "nope.txt")


def test_shapes_prompt_file_is_parti_shaped_deterministic_and_parseable(tmp_path):
    a = write_shapes_prompts(tmp_path / "a", n=40, seed=3)
    b = write_shapes_prompts(tmp_path / "b", n=40, seed=3)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_text().splitlines()[0] == "Prompt\tCategory\tChallenge\tNote"
    ps = load_prompt_set(a)
    assert ps.format == "parti" and len(ps) == 40 and len(set(ps.table.column("prompt").to_pylist())) == 40
    for r in ps.table.to_pylist():
        scene = sw.parse_caption(r["prompt"])  # every prompt is a shapes-world caption
        want = "spatial" if scene.relation else ("single" if scene.groups[0].count == 1 else "counting")
        assert r["category"] == want
    assert set(ps.categories()) == {"single", "counting", "spatial"}
    r = CliRunner().invoke(app, ["data", "sample", "--kind", "prompts", "--out", str(tmp_path / "c"), "--n", "40",
                                 "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "prompts.tsv").read_bytes() == a.read_bytes()
    r = CliRunner().invoke(app, ["data", "sample", "--kind", "nope", "--out", str(tmp_path / "d")])
    assert r.exit_code != 0


# ----------------------------------------------------------------------------- sampling
def _set(counts: dict[str, int]) -> pa.Table:
    rows = [(f"{c}/{i:05d}", f"prompt {c} {i}", c) for c, k in counts.items() for i in range(k)]
    return pa.table({"set": ["s"] * len(rows), "prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                     "category": [r[2] for r in rows]}, schema=prompts_schema.SCHEMA)


def test_default_sample_is_proportionally_stratified_and_seeded():
    table = _set({"a": 20, "b": 60, "c": 20})
    s = sample_prompts(table, n=10, seed=0)
    assert Counter(s.categories) == {"a": 2, "b": 6, "c": 2}
    assert sample_prompts(table, n=10, seed=0) == s  # reproducible
    others = [sample_prompts(table, n=10, seed=k).prompt_ids for k in (1, 2, 3)]
    assert all(set(o) != set(s.prompt_ids) for o in others)
    assert "'0'" in s.sql and "LIMIT 10" in s.sql and "$" not in s.sql  # the query as it ran
    small = sample_prompts(_set({"a": 3, "b": 3, "c": 3}), n=3, seed=5)
    assert sorted(small.categories) == ["a", "b", "c"]  # one per category when n = number of categories
    # the stored query reproduces the sample by itself
    import duckdb

    con = duckdb.connect()
    con.register("prompts", table)
    assert [r[0] for r in con.sql(s.sql).fetchall()] == s.prompt_ids


def test_where_and_sample_sql(tmp_path):
    table = _set({"a": 5, "b": 5})
    s = sample_prompts(table, n=3, seed=1, where="category = 'b'")
    assert s.categories == ["b"] * 3
    custom = "SELECT prompt_id FROM prompts WHERE category = 'a' ORDER BY md5(prompt_id || $seed) LIMIT $n"
    c = sample_prompts(table, n=2, seed=4, sample_sql=custom)
    assert len(c.prompt_ids) == 2 and set(c.categories) == {"a"} and "LIMIT 2" in c.sql
    assert sample_prompts(table, seed=0, sample_sql="select prompt_id from prompts").prompt_ids == \
        table.column("prompt_id").to_pylist()
    bad = [
        (dict(n=3, where="x", sample_sql="select 1"), "not both"),
        (dict(n=11), "only 10"),
        (dict(n=2, where="nope = 1"), "failed"),
        (dict(sample_sql="select prompt from prompts"), "prompt_id column"),
        (dict(sample_sql="select 'zz' as prompt_id"), "not in the prompt set"),
        (dict(sample_sql="select prompt_id from prompts; select prompt_id from prompts"), "exactly one SELECT"),
        (dict(sample_sql="select * from read_csv('/etc/passwd')"), "failed"),  # no file access
        (dict(n=2, sample_sql="select prompt_id from prompts"), "does not use \\$n"),
        (dict(), "`n`"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(UserError, match=msg):
            sample_prompts(table, seed=0, **kwargs)


def test_readme_shows_the_default_query(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert DEFAULT_SAMPLE_SQL.splitlines()[3].strip() in readme  # the md5 ordering line


# ----------------------------------------------------------------------------- win rates
def _scores(rows):
    return pa.Table.from_pylist([dict(zip(("run", "prompt_id", "system", "seed", "scorer", "scorer_version", "score"),
                                          r)) for r in rows], schema=scores_schema.SCHEMA)


def test_win_rates_wilson_ties_seeds_and_versions():
    runs = pa.Table.from_pylist([{"run": "r", "prompt_id": f"p{i}", "category": "x" if i < 6 else "y"}
                                 for i in range(10)])
    rows = []
    for i in range(10):
        # prompts 0-6: IMG better on average over two seeds (seed 1 alone loses for p0); 7: tie; 8-9: IMG worse
        base = [(1.0, 1.0)] * 10
        img = {**{k: (3.0, 0.5) for k in range(7)}, 7: (1.0, 1.0), 8: (0.0, 0.0), 9: (0.5, 0.5)}[i]
        for seed in (0, 1):
            rows.append(("r", f"p{i}", "base", seed, "hpsv2", "v2.1", base[i][seed]))
            rows.append(("r", f"p{i}", "img", seed, "hpsv2", "v2.1", img[seed]))
    rows += [("r", "p0", "base", 0, "hpsv2", "v2.0", 0.2), ("r", "p0", "img", 0, "hpsv2", "v2.0", 0.1)]
    out = compute_win_rates(_scores(rows), runs).to_pylist()
    overall = next(r for r in out if r["scorer_version"] == "v2.1" and r["category"] == "(all)")
    assert (overall["n"], overall["wins"], overall["ties"], overall["losses"]) == (10, 7, 1, 2)
    assert math.isclose(overall["win_rate"], 0.75)
    lo, hi = wilson(7.5, 10)
    assert math.isclose(overall["ci_low"], lo) and math.isclose(overall["ci_high"], hi)
    assert math.isclose(overall["mean_system"], (7 * 1.75 + 1.0 + 0.0 + 0.5) / 10)
    assert math.isclose(overall["mean_base"], 1.0)
    by_cat = {r["category"]: r for r in out if r["scorer_version"] == "v2.1"}
    assert by_cat["x"]["n"] == 6 and by_cat["y"]["n"] == 4 and by_cat["y"]["wins"] == 1 and by_cat["y"]["ties"] == 1
    v20 = [r for r in out if r["scorer_version"] == "v2.0"]  # never pooled with v2.1
    assert {r["category"] for r in v20} == {"(all)", "x"} and all(r["n"] == 1 and r["losses"] == 1 for r in v20)
    assert v20[0]["ci_low"] == 0.0
    # Wilson at 8/10: the textbook interval
    assert [round(x, 4) for x in wilson(8, 10)] == [0.4902, 0.9433]
    text = render(out)
    assert "75.0% [" in text and "7/1/2" in text



# ----------------------------------------------------------------------------- config and systems
def test_shipped_eval_tomls_load(repo_root, tmp_path):
    cpu = load_config(EvalConfig, repo_root / "jobs/eval.toml")
    assert cpu == EvalConfig()  # the TOML spells out the defaults
    gpu = load_config(EvalConfig, repo_root / "jobs/eval_gpu.toml")
    assert gpu.generate.num_gpus == 1 and gpu.scorer.num_gpus > 0 and gpu.seeds == cpu.seeds
    (tmp_path / "c.toml").write_text("units_per_fragmnet = 3\n")
    with pytest.raises(UserError, match="units_per_fragmnet"):
        load_config(EvalConfig, tmp_path / "c.toml")


def test_aligner_specs_name_the_systems():
    assert parse_aligners(["runs/a/aligner"]) == [("img", "runs/a/aligner")]
    assert parse_aligners(["a/x", "dpo=b/y", "c/z"]) == [("img", "a/x"), ("dpo", "b/y"), ("img3", "c/z")]
    for bad, msg in ((["base=a"], "not allowed"), (["x=a", "x=b"], "must differ"), (["x="], "no path")):
        with pytest.raises(UserError, match=msg):
            parse_aligners(bad)
