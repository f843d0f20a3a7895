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


def test_cli_errors_are_one_line(small_lake, tmp_path):
    img = [sys.executable, "-m", "img.cli"]
    r = subprocess.run(img + ["sql", "--lake", str(tmp_path / "nope"), "select 1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = subprocess.run(img + ["sql", "--lake", small_lake, "--json", "select count(*) as n from metrics"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == [{"n": 3}]
    r = subprocess.run(img + ["sql", "--lake", small_lake, "drop table metrics"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
