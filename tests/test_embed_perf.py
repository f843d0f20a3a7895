"""Embed options for scale: fp8 guidance (end to end, against fp16), one fused model actor, grouped commits,
the start-up split, and `img bench embed --row-size real`."""
from __future__ import annotations

import json

import lance
import pytest
import torch
from typer.testing import CliRunner

from img.data.sample import write_sample
from img.lake import tables as lake_mod
from img.models.profiles import get_profile
from img.training.loader import TrainLoader
from pipelines.embed import run_embed
from pipelines.embed_config import ActorPool, EmbedConfig
from schemas import features as features_schema
from schemas.meta import read_provenance


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    data = str(root / "data")
    write_sample(data, pairs=40, seed=7, corrupt=0.05, ties=0.1)
    out = {}
    fused = {"fuse_models": True, "writers": 2, "commit_seconds": 3600.0,  # 0.5 + 0.5 + 0.25 + 2 x 0.25 CPUs
             "ip": ActorPool(batch_size=16, num_cpus=0.5), "mllm": ActorPool(batch_size=8, num_cpus=0.5)}
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
    assert not (tmp_path / "x").exists()  # refused before anything was written


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
    if dtype == "fp16":
        assert 0.99 < out["bytes_ratio"] < 1.02 and out["raw_tensor_bytes_per_pair"] == 6_787_072
    else:
        assert out["bytes_ratio"] <= 0.52
    assert list(tmp_path.iterdir()) == []  # GBs of temporary lakes removed
