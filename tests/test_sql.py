"""img sql: views over every Lance table, tensor columns left out, nothing can be modified."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from img.errors import UserError
from img.lake import tables as lake
from img.lake.sql import run_query
from schemas import features, metrics
from schemas.meta import with_provenance


@pytest.fixture()
def small_lake(tmp_path):
    root = str(tmp_path / "lake")
    m = pa.table({"run_id": ["r"] * 3, "step": [1, 2, 3], "name": ["loss"] * 3, "value": [3.0, 2.0, 1.0]})
    lake.append_rows(root, "metrics", m, metrics.SCHEMA)
    fs = with_provenance(features.schema(2, 4), table="features", version=1, fingerprint="fp1")
    rows = pa.table({
        "pair_id": ["a", "b"],
        "winner_tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(16, np.float16)), 8),
        "loser_tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(16, np.float16)), 8),
        "guidance": pa.array([b"\0" * 20, b"\0" * 12], pa.large_binary()),
        "guidance_len": pa.array([5, 3], pa.int32()),
    }, schema=fs)
    lake.ensure_table(root, "features", fs)
    lake.commit_fragments(root, "features", lake.write_fragments(root, "features", rows, fs))
    return root


def test_views_leave_out_float16_and_blobs(small_lake):
    out = json.loads(run_query(small_lake, "select * from features order by pair_id", as_json=True))
    assert out == [{"pair_id": "a", "guidance_len": 5}, {"pair_id": "b", "guidance_len": 3}]
    tables = json.loads(run_query(small_lake, "select name, rows, fingerprint from img_tables order by name", as_json=True))
    assert tables == [{"name": "features", "rows": 2, "fingerprint": "fp1"}, {"name": "metrics", "rows": 3, "fingerprint": ""}]
    agg = json.loads(run_query(small_lake, "select min(value) as lo, count(*) as n from metrics", as_json=True))
    assert agg == [{"lo": 1.0, "n": 3}]
    assert "loss" in run_query(small_lake, "select name from metrics limit 1")


@pytest.mark.parametrize("query", [
    "drop table metrics", "delete from metrics", "insert into metrics values ('x', 1, 'y', 2.0)",
    "update metrics set value = 0", "create table t as select 1", "copy metrics to 'out.csv'",
    "attach 'x.db' as x", "select 1; drop table metrics", "install httpfs", "set memory_limit='1GB'",
])
def test_writes_are_refused(small_lake, query, tmp_path):
    with pytest.raises(UserError, match="read-only"):
        run_query(small_lake, query)
    assert json.loads(run_query(small_lake, "select count(*) as n from metrics", as_json=True)) == [{"n": 3}]


def test_no_file_access_through_select(small_lake, tmp_path):
    secret = tmp_path / "s.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(UserError, match="disabled"):
        run_query(small_lake, f"select * from read_csv('{secret}')")


@pytest.mark.slow
def test_cli_errors_are_one_line(small_lake, tmp_path):
    img = [sys.executable, "-m", "img.cli"]
    r = subprocess.run(img + ["sql", "--lake", str(tmp_path / "nope"), "select 1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = subprocess.run(img + ["sql", "--lake", small_lake, "--json", "select count(*) as n from metrics"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == [{"n": 3}]
    r = subprocess.run(img + ["sql", "--lake", small_lake, "drop table metrics"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ---------------------------------------------------------------- escapes (issue 9): run from a folder with .tmp/
SECRET = "TOPSECRET-42"

WRITES_AND_OBJECTS = [
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '.tmp/x.csv'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "EXPLAIN (ANALYZE) COPY (SELECT 1) TO '.tmp/x.csv'",
    "EXPLAIN (FORMAT json, ANALYZE) SELECT 1",
    "explain /* hidden */ analyse select * from metrics",
    "EXPLAIN ANALYZE SELECT * FROM metrics",
    "EXPLAIN COPY (SELECT 1) TO '.tmp/x.csv'",
    "EXPLAIN CREATE TABLE t AS SELECT 1",
    "COPY (SELECT 1) TO '.tmp/x.csv'",
    "COPY metrics TO 'out.csv'",
    "EXPORT DATABASE '.tmp/exported'",
    "IMPORT DATABASE '.tmp'",
    "ATTACH '.tmp/x.db' AS x",
    "ATTACH ':memory:' AS m",
    "DETACH memory",
    "USE memory",
    "INSTALL httpfs",
    "LOAD httpfs",
    "UPDATE EXTENSIONS",
    "CREATE TABLE t AS SELECT 1",
    "CREATE TEMP TABLE t (a INT)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO m() AS 1",
    "CREATE SEQUENCE s",
    "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')",
    "WITH x AS (SELECT 1) INSERT INTO metrics SELECT * FROM x",
    "INSERT INTO metrics VALUES ('x', 1, 'y', 2.0)",
    "UPDATE metrics SET value = 0",
    "DELETE FROM metrics",
    "ALTER VIEW metrics RENAME TO m",
    "DROP VIEW metrics",
    "SET temp_directory = '.tmp'",
    "SET enable_external_access = true",
    "RESET temp_directory",
    "SET VARIABLE x = 1",
    "PRAGMA enable_profiling",
    "PRAGMA show_tables",
    "CALL checkpoint()",
    "CHECKPOINT",
    "FORCE CHECKPOINT",
    "VACUUM",
    "ANALYZE",
    "BEGIN TRANSACTION",
    "PREPARE p AS SELECT 1",
    "PIVOT metrics ON name USING sum(value)",  # dynamic PIVOT creates an ENUM type first
    "SELECT 1; COPY (SELECT 1) TO '.tmp/x.csv'",
    "SELECT 1 /* ; */ ; CREATE TABLE t AS SELECT 1",
    "-- a comment\nCOPY (SELECT 1) TO '.tmp/x.csv'",
]

READS = [
    "SELECT * FROM read_text('.tmp/secret.txt')",
    "SELECT * FROM read_blob('.tmp/secret.txt')",
    "SELECT * FROM glob('.tmp/**')",
    "SELECT * FROM glob('*')",
    "FROM '.tmp/secret.csv'",
    "SELECT * FROM '.tmp/secret.csv'",
    "SELECT * FROM read_csv('.tmp/secret.csv')",
    "SELECT * FROM read_csv_auto('.tmp/secret.csv')",
    "SELECT * FROM sniff_csv('.tmp/secret.csv')",
    "SELECT * FROM read_parquet('.tmp/secret.parquet')",
    "SELECT * FROM parquet_scan('.tmp/secret.parquet')",
    "SELECT * FROM parquet_metadata('.tmp/secret.parquet')",
    "SELECT * FROM read_json('.tmp/secret.json')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SUMMARIZE SELECT * FROM read_text('.tmp/secret.txt')",
    "DESCRIBE SELECT * FROM '.tmp/secret.csv'",
    "EXPLAIN SELECT * FROM read_text('.tmp/secret.txt')",
    "WITH s AS (SELECT * FROM read_text('.tmp/secret.txt')) SELECT * FROM s",
    "SELECT * FROM query('SELECT * FROM read_text(''.tmp/secret.txt'')')",
    "SELECT * FROM metrics, read_text('.tmp/secret.txt')",
    "SELECT * FROM read_text('file:///etc/hostname')",
    "FROM 'https://example.com/x.csv'",
    "FROM 's3://bucket/x.parquet'",
]

NEED_AN_EXTENSION = [  # auto-loading is off, so these functions do not exist
    "SELECT * FROM sqlite_scan('.tmp/x.db', 't')", "SELECT * FROM delta_scan('.tmp')", "SELECT * FROM iceberg_scan('.tmp')",
    "SELECT * FROM read_xlsx('.tmp/x.xlsx')",
]


@pytest.fixture()
def hostile_cwd(tmp_path, monkeypatch):
    """A working directory whose .tmp/ (DuckDB's default temp directory) holds readable files."""
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.txt").write_text(SECRET + "\n")
    (cwd / ".tmp" / "secret.csv").write_text(f"a\n{SECRET}\n")
    (cwd / ".tmp" / "secret.json").write_text(json.dumps({"a": SECRET}))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [SECRET]}), cwd / ".tmp" / "secret.parquet")
    monkeypatch.chdir(cwd)
    return cwd


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("query", WRITES_AND_OBJECTS)
def test_no_statement_writes_or_creates(small_lake, hostile_cwd, query):
    before = _tree(hostile_cwd)
    with pytest.raises(UserError, match="read-only"):
        run_query(small_lake, query)
    assert _tree(hostile_cwd) == before
    assert json.loads(run_query(small_lake, "select count(*) as n from metrics", as_json=True)) == [{"n": 3}]


@pytest.mark.parametrize("query", READS)
def test_no_statement_reads_files(small_lake, hostile_cwd, query):
    before = _tree(hostile_cwd)
    with pytest.raises(UserError, match="disabled by configuration") as e:
        run_query(small_lake, query, as_json=True)
    assert SECRET not in str(e.value)
    assert _tree(hostile_cwd) == before


@pytest.mark.parametrize("query", NEED_AN_EXTENSION)
def test_extensions_are_not_auto_loaded(small_lake, hostile_cwd, query):
    with pytest.raises(UserError, match="Catalog Error"):
        run_query(small_lake, query)


def test_connection_is_sealed(small_lake, hostile_cwd):
    rows = json.loads(run_query(small_lake, "select name, value from duckdb_settings()", as_json=True))
    settings = {r["name"]: r["value"] for r in rows}
    assert settings["temp_directory"] == ""
    assert settings["enable_external_access"] == "false" and settings["lock_configuration"] == "true"
    assert settings["autoinstall_known_extensions"] == "false" and settings["autoload_known_extensions"] == "false"
    assert settings["allow_persistent_secrets"] == "false"
    assert settings["memory_limit"].endswith("GiB") and float(settings["memory_limit"].split()[0]) < 2.01
    assert json.loads(run_query(small_lake, "from duckdb_secrets()", as_json=True)) == []


@pytest.mark.parametrize("query", [
    "EXPLAIN SELECT * FROM metrics", "EXPLAIN (FORMAT json) SELECT 1", "SUMMARIZE metrics", "DESCRIBE metrics",
    "PIVOT metrics ON name IN ('loss') USING sum(value)", "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
    "SELECT 1 /* COPY x TO 'y' */", "FROM metrics", "TABLE metrics", "VALUES (1)", "SHOW TABLES", "EXPLAIN (SELECT 1)",
])
def test_read_only_statements_still_work(small_lake, hostile_cwd, query):
    assert run_query(small_lake, query, as_json=True).startswith("[")


@pytest.mark.slow
def test_cli_escapes_from_a_folder_with_tmp(small_lake, hostile_cwd):
    img = [sys.executable, "-m", "img.cli"]
    for query in ["EXPLAIN ANALYZE COPY (SELECT 1) TO '.tmp/x.csv'", "SELECT * FROM read_text('.tmp/secret.txt')",
                  "SELECT * FROM glob('.tmp/**')"]:
        before = _tree(hostile_cwd)
        r = subprocess.run(img + ["sql", "--lake", small_lake, "--json", query], capture_output=True, text=True,
                           cwd=hostile_cwd)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert SECRET not in r.stdout + r.stderr and _tree(hostile_cwd) == before


def test_bad_memory_limit_is_one_line(small_lake):
    with pytest.raises(UserError, match="`memory_limit` '2 bananas'"):
        run_query(small_lake, "select 1", memory_limit="2 bananas")
    assert run_query(small_lake, "select 1 as a", as_json=True, memory_limit="512MB") == '[{"a": 1}]'


# ---------------------------------------------------------------- bad paths (issue 9, item 4)
def test_stray_lance_entry_is_listed_as_broken_not_fatal(small_lake, caplog):
    from pathlib import Path

    Path(small_lake, "junk.lance").write_text("not a dataset")
    Path(small_lake, "empty.lance").mkdir()
    out = json.loads(run_query(small_lake, "select count(*) as n from metrics", as_json=True))
    assert out == [{"n": 3}]
    assert "junk.lance" in caplog.text and "broken" in caplog.text
    tables = {r["name"]: r for r in json.loads(run_query(small_lake, "select name, rows, status from img_tables",
                                                         as_json=True))}
    assert tables["metrics"]["status"] == "ok" and tables["metrics"]["rows"] == 3
    assert tables["junk"]["status"].startswith("broken") and tables["junk"]["rows"] is None
    assert tables["empty"]["status"].startswith("broken")
    with pytest.raises(UserError, match="table 'junk' .* cannot be read"):
        run_query(small_lake, "select * from junk")


@pytest.mark.slow
def test_empty_source_folder_and_file_lake_are_one_line(small_lake, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    img = [sys.executable, "-m", "img.cli"]
    r = subprocess.run(img + ["sql", "--lake", small_lake, "--source", str(empty), "select count(*) from source"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds no parquet files" in r.stderr, r.stderr
    assert str(empty) in r.stderr and list(empty.iterdir()) == []
    afile = tmp_path / "lake-file"
    afile.write_text("x")
    r = subprocess.run(img + ["sql", "--lake", str(afile), "select 1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file" in r.stderr, r.stderr


def test_source_view_still_reads_its_parquet_files(small_lake, hostile_cwd, tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"caption": ["a", "b", "c"]}), src / "train-00000-of-00001.parquet")
    out = run_query(small_lake, "select count(*) as n from source", as_json=True, source=str(src))
    assert json.loads(out) == [{"n": 3}]


def test_refusal_needs_no_lake(hostile_cwd):
    with pytest.raises(UserError, match="EXPLAIN ANALYZE runs its statement"):
        run_query(str(hostile_cwd / "no-lake"), "EXPLAIN ANALYZE COPY (SELECT 1) TO '.tmp/x.csv'")
    assert not (hostile_cwd / ".tmp" / "x.csv").exists()
