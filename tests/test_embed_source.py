"""Embed input robustness: Arrow type checks, accepted type variants, damaged shards and row groups.

Damage is real: bytes of a parquet page header (or the footer) written by
``img data sample --format pickapic`` are overwritten, and the job must
quarantine exactly the unreadable rows, finish everything else and exit 0.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img.data.sample import decodes, shard_paths, write_sample
from img.errors import UserError
from img.lake import tables as lake_mod
from pipelines import source as source_mod
from pipelines.embed import read_and_decode, run_embed
from pipelines.embed_config import EmbedConfig
from pipelines.source import list_shards, plan_units
from schemas.pickapic import SCHEMA

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _embed_cmd(data, lake):
    return [sys.executable, "-m", "img.cli", "jobs", "embed", "--dataset", "pickapic", "--source", str(data),
            "--profile", "tiny", "--lake", str(lake), "--json"]


def _rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _damage_page_header(path, row_group: int, column: str) -> None:
    """Overwrite the first page header of ``column`` in ``row_group`` with junk bytes, in place."""
    md = pq.read_metadata(path)
    col = md.row_group(row_group).column(md.schema.to_arrow_schema().names.index(column))
    offset = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 8)
    with pytest.raises(OSError, match="deserialize thrift"):  # the damage is real
        pq.ParquetFile(path).read_row_group(row_group, columns=[column])


def _table(lake, name) -> list[dict]:
    return lance.dataset(lake_mod.table_uri(lake, name)).to_table().to_pylist()


# ---------------------------------------------------------------- damaged input
@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Two pickapic shards of 4 row groups (25 rows) each, shard 0 damaged three ways, plus a cut-off shard."""
    root = tmp_path_factory.mktemp("damaged")
    orig, data, lake = root / "orig", root / "data", root / "lake"
    write_sample(orig, pairs=200, seed=21, corrupt=0.05, ties=0.1, shard_rows=100, fmt="pickapic",
                 row_group_rows=25)
    shutil.copytree(orig, data)
    a, b = shard_paths(data)
    _damage_page_header(a, 0, "are_different")  # the file's first page: published, not used, still checked
    _damage_page_header(a, 1, "jpg_1")  # found by the reader of row group 1's units
    _damage_page_header(a, 3, "label_0")  # found by planning
    cut = data / "train-00002-of-00002-ffffffffffffffff.parquet"
    cut.write_bytes(b.read_bytes()[: b.stat().st_size // 2])  # footer gone
    run = subprocess.run(_embed_cmd(data, lake), env=ENV, capture_output=True, text=True, timeout=900)
    return orig, data, lake, (a.name, b.name, cut.name), run


@pytest.mark.slow
def test_damaged_units_are_quarantined_and_the_rest_completes(damaged):
    orig, data, lake, (a, b, cut), run = damaged
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    warn = [ln for ln in run.stderr.splitlines() if "WARNING" in ln and cut in ln]
    assert len(warn) == 1 and "cannot be read" in warn[0], run.stderr[-3000:]
    src = {f"{p.name}#{i}": r for p in shard_paths(orig) for i, r in enumerate(_rows(p))}
    decisive = {k for k, r in src.items() if r["label_0"] in (0.0, 1.0)}
    rg0 = {f"{a}#{r}" for r in range(0, 25)} & decisive  # ties of an unreadable row group are still dropped
    rg1 = {f"{a}#{r}" for r in range(25, 50)} & decisive
    rg3 = {f"{a}#{r}" for r in range(75, 100)}  # label_0 unreadable: ties cannot be told, all 25 rows
    unreadable = rg0 | rg1 | rg3
    good = {k for k in decisive - unreadable if decodes(src[k]["jpg_0"]) and decodes(src[k]["jpg_1"])}
    bad_jpeg = decisive - unreadable - good
    assert rg0 and rg1 and bad_jpeg and any(k.startswith(b) for k in good)
    assert any(k.startswith(a) for k in good)  # shard a's row group 2 is intact

    pairs = _table(lake, "pairs")
    assert sorted(p["pair_id"] for p in pairs) == sorted(good)  # shard b and shard a's readable groups complete
    assert all(p["winner_uid"] == src[p["pair_id"]]["best_image_uid"] for p in pairs)
    quarantine = {q["pair_id"]: q for q in _table(lake, "quarantine")}
    assert set(quarantine) == unreadable | bad_jpeg | {f"{cut}#*"}
    for group, keys in ((0, rg0), (1, rg1)):
        for k in keys:
            reason = quarantine[k]["reason"]
            rows = f"rows {25 * group}-{25 * group + 24}"
            assert f"shard {a} row group {group} ({rows})" in reason and "Couldn't deserialize thrift" in reason, reason
    for k in rg3:
        reason = quarantine[k]["reason"]
        assert f"shard {a} row group 3 (rows 75-99)" in reason and "label_0 unreadable" in reason, reason
        assert "thrift" in reason and quarantine[k]["row"] == int(k.split("#")[1])
    whole = quarantine[f"{cut}#*"]
    assert whole["row"] is None and f"shard {cut}" in whole["reason"] and "footer unreadable" in whole["reason"]
    assert all("\n" not in q["reason"] for q in quarantine.values())
    n_feat = lance.dataset(lake_mod.table_uri(lake, "features")).count_rows()
    assert n_feat == len(good)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["written"] == len(good) and summary["quarantined"] == len(quarantine)
    assert summary["unreadable"] == len(unreadable) + 1


@pytest.mark.slow
def test_rerun_does_not_loop_on_damaged_units(damaged):
    _, data, lake, _, _ = damaged
    n_pairs, n_quar = len(_table(lake, "pairs")), len(_table(lake, "quarantine"))
    again = run_embed(str(data), str(lake), "tiny", EmbedConfig(), progress=False)
    assert again.written == 0 and again.quarantined == 0
    assert again.skipped_done == n_pairs + n_quar  # the cut shard's one entry counts once
    assert len(_table(lake, "pairs")) == n_pairs and len(_table(lake, "quarantine")) == n_quar


# ---------------------------------------------------------------- types
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "s"
    write_sample(out, pairs=40, seed=4, corrupt=0.1, ties=0.1, shard_rows=20, fmt="pickapic")
    return out


@pytest.mark.parametrize("column, values, found", [
    ("label_0", lambda n: pa.array(["1.0"] * n), "string"),
    ("jpg_1", lambda n: pa.array([7] * n, pa.int64()), "int64"),
    ("caption", lambda n: pa.array([b"x"] * n, pa.binary()), "binary"),
    ("best_image_uid", lambda n: pa.array([1.5] * n), "double"),
])
def test_wrong_type_is_a_user_error_before_anything_is_written(small, tmp_path, column, values, found):
    data, lake = tmp_path / "data", tmp_path / "lake"
    shutil.copytree(small, data)
    path = shard_paths(data)[1]
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, values(t.num_rows)), path)
    with pytest.raises(UserError) as e:
        run_embed(str(data), str(lake), "tiny", EmbedConfig(), progress=False)
    msg = str(e.value)
    assert f"column {column!r} has type {found}" in msg and "expected" in msg and path.name in msg, msg
    assert "\n" not in msg and not lake.exists()


@pytest.mark.slow
def test_wrong_type_cli_is_one_line_exit_2(small, tmp_path):
    data, lake = tmp_path / "data", tmp_path / "lake"
    shutil.copytree(small, data)
    path = shard_paths(data)[0]
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index("label_0"), "label_0", pa.array(["0"] * t.num_rows)), path)
    r = subprocess.run(_embed_cmd(data, lake), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "'label_0' has type string, expected a float" in lines[0] and path.name in lines[0]
    assert "Traceback" not in r.stderr and not lake.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_type_variants_odd_row_groups_and_extra_columns_read_the_same(small, tmp_path, monkeypatch, stream):
    """float32 labels, large_binary JPEGs, large_string/string_view text, 7-row groups, a damaged extra column."""
    data = tmp_path / "variant"
    data.mkdir()
    for p in shard_paths(small):
        t = pq.read_table(p)
        assert t.schema.equals(SCHEMA)
        cast = pa.schema([pa.field(f.name, {"label_0": pa.float32(), "jpg_0": pa.large_binary(),
                                            "jpg_1": pa.large_binary(), "caption": pa.large_string(),
                                            "image_0_uid": pa.string_view()}.get(f.name, f.type)) for f in SCHEMA])
        t = t.cast(cast).append_column("extra", pa.array([[1, 2]] * t.num_rows, pa.list_(pa.int8())))
        pq.write_table(t, data / p.name, row_group_size=7)
    assert pq.read_schema(data / p.name).field("image_0_uid").type == pa.string_view()
    _damage_page_header(data / p.name, 1, "extra")  # not a published column: never read, so harmless
    if stream:
        monkeypatch.setattr(source_mod, "STREAM_ROW_GROUP_BYTES", 0)

    def embed_rows(folder):
        units, counts, damaged = plan_units(list_shards(str(folder)), set(), None, unit_rows=5)
        assert not damaged and all(u["stream"] == stream for u in units)
        out = [read_and_decode({k: np.array([u[k]], dtype=object) for k in u}, 16, 60_000_000, 0) for u in units]
        keep = ("pair_id", "caption", "winner_uid", "loser_uid", "error", "question")
        return counts, {pid: tuple(str(o[k][i]) for k in keep) + (o["winner_image"][i].tobytes(),)
                        for o in out for i, pid in enumerate(o["pair_id"])}

    counts, got = embed_rows(data)
    want_counts, want = embed_rows(small)
    assert counts == want_counts and counts["todo"] == 36 and counts["ties"] == 4
    assert got == want
    assert sum(1 for v in got.values() if v[4]) == 4  # the corrupt rows, and nothing else, carry an error


def test_listing_keeps_unreadable_shards_with_their_error(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small, data)
    (data / "empty.parquet").write_bytes(b"")
    (data / "text.parquet").write_text("not parquet at all\n" * 20)
    shards = list_shards(str(data))
    errs = {s.name: s.error for s in shards if s.error}
    assert set(errs) == {"empty.parquet", "text.parquet"} and all(errs.values())
    units, counts, damaged = plan_units(shards, {"text.parquet#*"}, None)
    assert [d["pair_id"] for d in damaged] == ["empty.parquet#*"] and counts["damaged"] == 1
    assert counts["done"] == 1 and json.loads(units[0]["shard"])["error"] == ""


def test_a_plan_larger_than_the_cluster_is_refused(monkeypatch, repo_root):
    """The embed config's actor pools against the cluster's resources (Ray's report of them stubbed)."""
    import ray

    from img.config import load_config
    from pipelines.embed import check_reservations

    gpu_plan = load_config(EmbedConfig, repo_root / "jobs" / "embed_gpu.toml")  # decode + 8 writers x 1 + pools
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    check_reservations(EmbedConfig())  # the CPU defaults fit: 2 x 0.25 + 2 x 0.75
    with pytest.raises(UserError, match=r"embed config reserves 265 CPUs \(decode \+ 8 writer\(s\) x 1 \+ actor pools\) "
                                        r"but the Ray cluster has 8\. .*\[ip\]/\[mllm\]/\[text\] sections"):
        check_reservations(gpu_plan)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 512.0, "GPU": 8.0})
    with pytest.raises(UserError, match="reserves 64 GPUs but the Ray cluster has 8"):
        check_reservations(gpu_plan)


def test_shard_listing_sorts_filters_and_refuses_clashing_names(tmp_path, monkeypatch):
    """The one listing the embed job and fine-tuning share: recursive, sorted by path, only the given suffixes,
    ``~`` expanded, and two shards with one file name refused (their record ids would collide)."""
    from img.data.shard_files import list_shard_files

    for rel in ("b/train-1.parquet", "a/train-0.parquet", "a/notes.txt", "c/part.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 3)
    files = list_shard_files(tmp_path, "`source`", (".parquet",), "a folder of shards")
    assert [(os.path.relpath(f.uri, tmp_path), f.name, f.size) for f in files] == [
        ("a/train-0.parquet", "train-0.parquet", 3), ("b/train-1.parquet", "train-1.parquet", 3)]
    assert [f.name for f in list_shard_files(tmp_path, "`data`", (".parquet", ".jsonl"), "x")] == [
        "train-0.parquet", "train-1.parquet", "part.jsonl"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert [f.name for f in list_shard_files("~/a/train-0.parquet", "`source`", (".parquet",), "x")] == [
        "train-0.parquet"]
    (tmp_path / "b" / "train-0.parquet").write_bytes(b"y")
    with pytest.raises(UserError, match="'.*' holds two shards with the same file name"):
        list_shard_files(tmp_path, "`source`", (".parquet",), "x")
    with pytest.raises(UserError, match=r"`source` '.*empty' does not exist\. Pass a folder of shards\."):
        list_shard_files(tmp_path / "empty", "`source`", (".parquet",), "a folder of shards")
