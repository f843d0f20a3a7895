"""Embed options for scale: fp8 guidance (end to end, against fp16), one fused model actor, grouped commits,
the start-up split, and `img bench embed --row-size real`."""
from __future__ import annotations

import json
import os

import lance
import pytest
import torch
from typer.testing import CliRunner

from img.data.sample import write_sample
from img.lake import tables as lake_mod
from img.models.profiles import get_profile
from img.training.loader import TrainLoader
from pipelines.embed import run_embed
from pipelines.embed_config import EmbedConfig, ModelPool
from schemas import features as features_schema
from schemas.meta import read_provenance


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    data = str(root / "data")
    write_sample(data, pairs=40, seed=7, corrupt=0.05, ties=0.1)
    out = {}
    fused = {"fuse_models": True, "writers": 2, "commit_seconds": 3600.0,  # 0.5 + 0.5 + 0.25 + 2 x 0.25 CPUs
             "ip": ModelPool(batch_size=16, num_cpus=0.5), "mllm": ModelPool(batch_size=8, num_cpus=0.5)}
    for dt, kw in (("fp16", {}), ("fp8", fused)):
        lake = str(root / dt)
        out[dt] = (lake, run_embed(data, lake, "tiny", EmbedConfig(rows_per_fragment=8, guidance_dtype=dt, **kw),
                                   progress=False))
    return data, out


def test_fp8_lake_holds_e4m3_bytes_and_per_token_scales(lakes):
    _, out = lakes
    (l16, s16), (l8, s8) = out["fp16"], out["fp8"]
    assert s8.written == s16.written > 20 and s8.quarantined == s16.quarantined
    assert s8.fingerprint != s16.fingerprint  # the dtype is part of the fingerprint
    ds = lance.dataset(lake_mod.table_uri(l8, "features"))
    assert ds.data_storage_version == features_schema.DATA_STORAGE_VERSION
    assert read_provenance(ds.schema)["extra"]["guidance_dtype"] == features_schema.FP8
    t = ds.to_table(columns=["guidance_len", "guidance_scale"])
    lens = t.column("guidance_len").to_numpy()
    assert [len(x) for x in t.column("guidance_scale").to_pylist()] == lens.tolist()
    blob = ds.take_blobs("guidance", indices=[0])[0].readall()
    assert len(blob) == lens[0] * get_profile("tiny").dims.mllm_hidden  # one byte per value
    # bytes on disk per pair: close to half (tokens stay fp16)
    assert s8.bytes_per_pair < 0.75 * s16.bytes_per_pair


def test_fp8_guidance_is_fp16_guidance_within_e4m3_precision(lakes):
    _, out = lakes
    a = TrainLoader(out["fp16"][0], batch_size=4, heldout_pairs=0, num_workers=0, pad_dtype=torch.float32)
    b = TrainLoader(out["fp8"][0], batch_size=4, heldout_pairs=0, num_workers=2, pad_dtype=torch.float32)
    assert a.blob_api == b.blob_api == "mmap" and b.fp8
    where = {p: i for i, p in enumerate(b.pair_ids)}
    assert set(where) == set(a.pair_ids)
    idx = list(range(len(a.pair_ids)))
    x = a.read(idx)
    y = b.read([where[a.pair_ids[i]] for i in idx])
    assert x.pair_ids == y.pair_ids and torch.equal(x.lengths, y.lengths)
    assert torch.equal(x.winner, y.winner)  # tokens stay 16-bit
    rel = [float((y.guidance[j] - x.guidance[j]).norm() / x.guidance[j].norm()) for j in range(len(idx))]
    assert 0 < max(rel) < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3 % error, never exact
    cos = torch.nn.functional.cosine_similarity(x.guidance[x.mask], y.guidance[y.mask], dim=-1)
    assert float(cos.min()) > 0.998


def test_startup_split_and_grouped_commits(lakes):
    _, out = lakes
    (l16, s16), (l8, s8) = out["fp16"], out["fp8"]
    for s in (s16, s8):
        st = s.startup
        assert st["plan_s"] >= 0 and st["first_commit_at"] > 0
        stages = {a["stage"] for a in st["actors"]}
        assert {"IPTokens", "Guidance", "WriteFragments"} <= stages
        assert all(a["imports_s"] >= 0 and a["load_s"] >= 0 for a in st["actors"])
        # the process exists, then Ray Data hands it the stage (our imports start), then it is ready
        assert all(a["spawn_at"] - 0.02 <= a["scheduled_at"] <= a["ready_at"] for a in st["actors"])
    pids = {a["stage"]: a["pid"] for a in s8.startup["actors"]}
    assert pids["IPTokens"] == pids["Guidance"]  # fuse_models: one process holds both models
    pids16 = {a["stage"]: a["pid"] for a in s16.startup["actors"]}
    assert pids16["IPTokens"] != pids16["Guidance"]
    # commit_seconds = 3600: every fragment of the run went in one transaction per table
    assert len(lance.dataset(lake_mod.table_uri(l8, "features")).versions()) == 2  # create + one append
    assert len(lance.dataset(lake_mod.table_uri(l16, "features")).versions()) > 3  # one append per fragment


def test_bad_guidance_dtype_and_writers_are_user_errors(lakes, tmp_path):
    from img.errors import UserError

    data, _ = lakes
    with pytest.raises(UserError, match="guidance_dtype"):
        run_embed(data, str(tmp_path / "x"), "tiny", EmbedConfig(guidance_dtype="int4"), progress=False)
    with pytest.raises(UserError, match="writers"):
        run_embed(data, str(tmp_path / "x"), "tiny", EmbedConfig(writers=0), progress=False)
    with pytest.raises(UserError, match=r"`\[mllm\] calls` must be >= 1, got 0"):
        run_embed(data, str(tmp_path / "x"), "tiny", EmbedConfig(mllm=ModelPool(calls=0)), progress=False)
    with pytest.raises(UserError, match=r"`\[ip\] calls` = 2 does nothing with fuse_models"):
        run_embed(data, str(tmp_path / "x"), "tiny", EmbedConfig(fuse_models=True, ip=ModelPool(calls=2)),
                  progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def _features(lake: str) -> dict[str, tuple]:
    """pair_id -> (tokens, guidance bytes, guidance length) of a lake's features table."""
    ds = lance.dataset(lake_mod.table_uri(lake, "features"))
    rows = ds.to_table(columns=["pair_id", "winner_tokens", "loser_tokens", "guidance_len"],
                       with_row_id=True).to_pylist()
    blobs = ds.take_blobs("guidance", ids=[r["_rowid"] for r in rows])
    return {r["pair_id"]: (r["winner_tokens"], r["loser_tokens"], b.readall(), r["guidance_len"])
            for r, b in zip(rows, blobs)}


def test_two_calls_per_actor_write_the_same_tensors(lakes, tmp_path):
    """One fused actor running 2 batches at once (``calls = 2``, 1 torch thread each) writes the tensors the two
    1-thread actors of the default plan wrote, and reports its start-up once.

    Byte for byte where a pair meets the same MLLM batch in both runs. Ray Data bundles blocks into batches as
    they arrive, so now and then a pair lands in a batch padded to another length, and the padding changes the
    float rounding: then its guidance may differ by one fp16 step (``make demo``: 11 of 1,760 tensors, 3.7e-6
    relative). Comparing bytes only, this failed in 1 of 9 runs. With deliberately different batches (IP 4,
    MLLM 3) 3 of 34 guidance tensors differed, by at most one step, and no token did."""
    import numpy as np

    data, out = lakes
    cfg = EmbedConfig(rows_per_fragment=8, fuse_models=True,  # the fp16 lake's batches: padding shapes match
                      ip=ModelPool(batch_size=16, num_cpus=0.5), mllm=ModelPool(batch_size=8, num_cpus=0.5, calls=2))
    summary = run_embed(data, str(tmp_path / "calls"), "tiny", cfg, progress=False)
    assert summary.fingerprint == out["fp16"][1].fingerprint  # calls is a run knob, not content
    assert summary.written == out["fp16"][1].written
    got, want = _features(str(tmp_path / "calls")), _features(out["fp16"][0])
    assert got.keys() == want.keys()
    exact = 0
    for pid, (win, lose, blob, n) in got.items():
        win0, lose0, blob0, n0 = want[pid]
        assert n == n0 and len(blob) == len(blob0), pid
        a, b = np.frombuffer(blob, np.float16), np.frombuffer(blob0, np.float16)
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= ulp), pid  # at most one fp16 step
        np.testing.assert_allclose(np.array(win + lose, np.float32), np.array(win0 + lose0, np.float32),
                                   rtol=1e-3, atol=1e-4, err_msg=pid)
        exact += blob == blob0 and win == win0 and lose == lose0
    assert exact >= len(got) // 2, f"only {exact} of {len(got)} pairs byte-identical"
    stages = [a["stage"] for a in summary.startup["actors"]]
    assert sorted(stages) == ["Guidance", "IPTokens", "WriteFragments"]  # one actor, each stage reported once


def test_fused_stage_called_from_two_threads_at_once_matches_one_at_a_time(lakes):
    """What ``calls = 2`` does inside one actor: two threads call the same fused stage (one torch thread each);
    every result equals the sequential one, byte for byte."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipelines.embed import FusedModels
    from pipelines.embed_io import Decode, read_units
    from pipelines.source import list_shards, plan_units

    data, _ = lakes
    units, _, _ = plan_units(list_shards(data), set(), None, unit_rows=8)
    batches = [Decode(16, 60_000_000, 0)(read_units({k: np.array([u[k]], dtype=object) for k in u})) for u in units]
    stage = FusedModels("tiny", "cpu", 1, mllm_batch_size=4)
    cols = ("winner_tokens", "loser_tokens", "guidance", "guidance_len")
    alone = [stage(dict(b)) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda b: stage(dict(b)), batches + batches))
    for got, want in zip(together, alone + alone):
        for c in cols:
            assert [bytes(np.asarray(x).tobytes()) for x in got[c]] == [bytes(np.asarray(x).tobytes()) for x in want[c]]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "fp8"])
def test_bench_embed_real_row_size(tmp_path, dtype):
    from img.cli import app

    result = CliRunner().invoke(app, ["bench", "embed", "--row-size", "real", "--pairs", "24", "--json",
                                      "--guidance-dtype", dtype, "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # one JSON document, nothing else on stdout
    assert out["row_size"] == "real" and "stand-in" in out["stand_in"] and out["pairs"] == 24
    assert out["ratio"] > 0 and out["MB_per_s_written"] > 0 and out["writer_MB_per_cpu_s"] > 0
    assert out["fragments"]["count"] >= 1 and out["memory"]["worker_peak_rss_gb"] > 0
    assert out["object_store"]["spilled_gb"] >= 0
    assert out["startup"]["ray_init_s"] >= 0  # 0 when Ray is already up in this process
    assert out["ray"] == ("RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "started")
    if dtype == "fp16":
        assert 0.99 < out["bytes_ratio"] < 1.02 and out["raw_tensor_bytes_per_pair"] == 6_787_072
    else:
        assert out["bytes_ratio"] <= 0.52
    assert list(tmp_path.iterdir()) == []  # GBs of temporary lakes removed
