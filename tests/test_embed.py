"""The embed job on Pick-a-Pic-format data with ties and corrupt images: exact counts, shapes, resume.

Every job test runs on both sample formats: ``sample`` (published columns +
``broken``) and ``pickapic`` (exactly the published columns, HF shard names,
100-row row groups).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from img.data.sample import expected_counts, write_sample
from img.errors import UserError
from img.lake import tables as lake_mod
from img.models.profiles import get_profile
from pipelines.embed import run_embed
from pipelines.embed_config import EmbedConfig
from schemas.meta import read_provenance
from schemas.pickapic import SCHEMA


def _source_rows(data_dir):
    rows = {}
    for f in sorted(os.listdir(data_dir)):
        t = pq.read_table(os.path.join(data_dir, f)).to_pylist()
        for i, r in enumerate(t):
            rows[f"{f}#{i}"] = r
    return rows


def _decodes(b):
    from img.data.sample import decodes

    return decodes(b)


FORMATS = ("sample", "pickapic")


@pytest.fixture(scope="module", params=FORMATS)
def embedded(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"embed-{request.param}")
    data, lake = str(root / "data"), str(root / "lake")
    write_sample(data, pairs=240, seed=5, corrupt=0.05, ties=0.1, shard_rows=100, fmt=request.param)
    if request.param == "pickapic":  # the published form: nothing but the published columns
        assert all(pq.read_schema(os.path.join(data, f)).equals(SCHEMA, check_metadata=True)
                   for f in os.listdir(data))
    summary = run_embed(data, lake, "tiny", EmbedConfig(rows_per_fragment=16), progress=False)
    return data, lake, summary


@pytest.mark.slow
def test_counts_are_exact(embedded):
    data, lake, summary = embedded
    src = _source_rows(data)
    decisive = {k: r for k, r in src.items() if r["label_0"] in (0.0, 1.0)}
    good = {k for k, r in decisive.items() if _decodes(r["jpg_0"]) and _decodes(r["jpg_1"])}
    exp = expected_counts(240, corrupt=0.05, ties=0.1)
    assert len(decisive) == exp["decisive"] and len(decisive) - len(good) == exp["corrupt"]
    pairs = lance.dataset(lake_mod.table_uri(lake, "pairs")).to_table().to_pylist()
    quarantine = lance.dataset(lake_mod.table_uri(lake, "quarantine")).to_table().to_pylist()
    assert sorted(p["pair_id"] for p in pairs) == sorted(good)
    assert sorted(q["pair_id"] for q in quarantine) == sorted(set(decisive) - good)
    assert all(q["reason"] for q in quarantine)
    assert summary.written == len(good) and summary.quarantined == exp["corrupt"]
    assert summary.skipped_ties == exp["ties"]
    for p in pairs:  # oriented by label_0; the winner is always best_image_uid
        r = src[p["pair_id"]]
        assert p["winner_uid"] == r["best_image_uid"]
        assert p["loser_uid"] == (r["image_1_uid"] if r["label_0"] == 1.0 else r["image_0_uid"])
        assert p["caption"] == r["caption"] and p["broken"] == r.get("broken") and p["question"]


@pytest.mark.slow
def test_features_decode_to_profile_shapes(embedded):
    _, lake, _ = embedded
    prof = get_profile("tiny")
    d = prof.dims
    ds = lance.dataset(lake_mod.table_uri(lake, "features"))
    pairs = lance.dataset(lake_mod.table_uri(lake, "pairs"))
    assert ds.count_rows() == pairs.count_rows()
    t = ds.to_table(columns=["pair_id", "winner_tokens", "loser_tokens", "guidance_len"])
    assert len(set(t.column("pair_id").to_pylist())) == t.num_rows
    win = np.asarray(t.column("winner_tokens").combine_chunks().flatten()).reshape(-1, d.ip_tokens, d.ip_dim)
    lose = np.asarray(t.column("loser_tokens").combine_chunks().flatten()).reshape(-1, d.ip_tokens, d.ip_dim)
    assert win.dtype == np.float16 and np.isfinite(win).all() and not np.allclose(win, lose)
    lens = t.column("guidance_len").to_numpy()
    blobs = ds.take_blobs("guidance", indices=list(range(3)))
    for blob, n in zip(blobs, lens[:3]):
        g = np.frombuffer(blob.readall(), np.float16).reshape(n, d.mllm_hidden)
        assert np.isfinite(g).all()
    prov = read_provenance(ds.schema)
    assert prov["extra"]["ip_tokens"] == d.ip_tokens and prov["extra"]["guidance_dim"] == d.mllm_hidden
    assert prov["model_ids"] == prof.model_ids() and len(prov["fingerprint"]) == 16


@pytest.mark.slow
def test_rerun_is_a_no_op_and_matches_recompute(embedded):
    data, lake, _ = embedded
    again = run_embed(data, lake, "tiny", EmbedConfig(rows_per_fragment=16), progress=False)
    assert again.written == 0 and again.quarantined == 0
    n = lance.dataset(lake_mod.table_uri(lake, "pairs")).count_rows()
    assert again.skipped_done == n + lance.dataset(lake_mod.table_uri(lake, "quarantine")).count_rows()


@pytest.mark.slow
def test_kill_between_features_and_pairs_commits_is_redone_once(embedded):
    """Features committed but pairs not (a kill between the two commits): the orphans are redone once."""
    data, lake, _ = embedded
    pairs = lance.dataset(lake_mod.table_uri(lake, "pairs"))
    victims = sorted(pairs.to_table(columns=["pair_id"]).column(0).to_pylist())[:5]
    pairs.delete("pair_id IN (" + ", ".join(f"'{v}'" for v in victims) + ")")
    before = lance.dataset(lake_mod.table_uri(lake, "features")).count_rows()
    s = run_embed(data, lake, "tiny", EmbedConfig(rows_per_fragment=16), progress=False)
    assert s.orphans_redone == 5 and s.written == 5
    feats = lance.dataset(lake_mod.table_uri(lake, "features")).to_table(columns=["pair_id"]).column(0).to_pylist()
    assert len(feats) == len(set(feats)) == before
    assert sorted(lance.dataset(lake_mod.table_uri(lake, "pairs")).to_table(columns=["pair_id"]).column(0).to_pylist()) \
        == sorted(feats)


@pytest.mark.slow
def test_other_fingerprint_is_refused(embedded):
    data, lake, _ = embedded
    with pytest.raises(UserError, match="fingerprint"):
        run_embed(data, lake, "tiny", EmbedConfig(question_seed=9), progress=False)


def test_bad_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_embed(str(tmp_path / "nope"), str(tmp_path / "lake"), "tiny", EmbedConfig(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.parquet"):
        run_embed(str(tmp_path / "empty"), str(tmp_path / "lake"), "tiny", EmbedConfig(), progress=False)


def _embed_cmd(data, lake):
    return [sys.executable, "-m", "img.cli", "jobs", "embed", "--dataset", "pickapic", "--source", data,
            "--profile", "tiny", "--lake", lake]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pickapic"])  # the sample form is killed and resumed in test_lake_vacuum.py
def test_sigkill_then_resume_is_exactly_once(tmp_path, fmt):
    """A 600-row run killed with SIGKILL mid-way, then started again, ends exactly once complete."""
    data, lake = str(tmp_path / "data"), str(tmp_path / "lake")
    write_sample(data, pairs=600, seed=11, corrupt=0.02, ties=0.1, shard_rows=200, fmt=fmt)
    exp = expected_counts(600, corrupt=0.02, ties=0.1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_embed_cmd(data, lake), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        ds = lake_mod.open_table(lake, "pairs")
        committed = ds.count_rows() if ds is not None else 0
        if committed >= 32:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed; make the sample bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < committed < exp["decisive"] - exp["corrupt"]
    r = subprocess.run(_embed_cmd(data, lake), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Progress bars disabled" not in r.stderr  # the job turns Ray Data's bars off on purpose
    pairs = lance.dataset(lake_mod.table_uri(lake, "pairs")).to_table(columns=["pair_id"]).column(0).to_pylist()
    feats = lance.dataset(lake_mod.table_uri(lake, "features")).to_table(columns=["pair_id"]).column(0).to_pylist()
    quar = lance.dataset(lake_mod.table_uri(lake, "quarantine")).to_table(columns=["pair_id"]).column(0).to_pylist()
    assert len(pairs) == len(set(pairs)) == exp["decisive"] - exp["corrupt"]
    assert sorted(feats) == sorted(pairs)
    assert len(quar) == len(set(quar)) == exp["corrupt"] and not set(quar) & set(pairs)
    src = _source_rows(data)
    winners = lance.dataset(lake_mod.table_uri(lake, "pairs")).to_table(columns=["pair_id", "winner_uid"]).to_pylist()
    assert all(w["winner_uid"] == src[w["pair_id"]]["best_image_uid"] for w in winners)
    assert "skipped as already done" in r.stdout  # the summary line
