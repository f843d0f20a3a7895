"""Training loader and `img jobs train` on synthetic lakes written with the real features schema.

The lake target is learnable (winner = loser with some channels replaced by a
function of the guidance), so training must beat doing nothing on held-out pairs.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lance
import numpy as np
import pytest
import torch
from synthetic_lake import tiny_dims, write_synthetic_lake
from torch_load_guard import only_weights_only_torch_load
from typer.testing import CliRunner

from img.errors import UserError
from img.net import free_port
from img.training.loader import TrainLoader, heldout_key, split_heldout

REPO = Path(__file__).resolve().parents[1]
DIMS = tiny_dims()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> tuple[str, dict]:
    root = tmp_path_factory.mktemp("lake")
    arrays = write_synthetic_lake(str(root), n_pairs=400, uncommitted=5, text_guidance_dim=12, **DIMS)
    return str(root), arrays


def _row(arrays, pid):
    return int(pid.split("#")[1])


# ----------------------------------------------------------------------------- loader
def test_loader_reads_exact_values_padding_and_mask(lake):
    root, arrays = lake
    loader = TrainLoader(root, batch_size=8, seed=0, num_workers=2, prefetch=3)
    batch = next(iter(loader))
    n, d, e = DIMS["ip_tokens"], DIMS["ip_dim"], DIMS["guidance_dim"]
    assert batch.winner.shape == (8, n, d) and batch.winner.dtype == torch.float16
    lens = [int(arrays["lens"][_row(arrays, p)]) for p in batch.pair_ids]
    assert batch.guidance.shape == (8, max(lens), e)
    assert batch.mask.sum(1).tolist() == lens
    for j, pid in enumerate(batch.pair_ids):
        i = _row(arrays, pid)
        assert torch.equal(batch.winner[j], torch.from_numpy(arrays["winner"][i]))
        assert torch.equal(batch.loser[j], torch.from_numpy(arrays["loser"][i]))
        assert torch.equal(batch.guidance[j, : lens[j]], torch.from_numpy(arrays["guidance"][i]))
        assert torch.count_nonzero(batch.guidance[j, lens[j]:]) == 0


def test_loader_split_shards_and_uncommitted(lake, tmp_path):
    root, arrays = lake
    a = TrainLoader(root, rank=0, world_size=2, batch_size=8, heldout_pairs=40, num_workers=0)
    b = TrainLoader(root, rank=1, world_size=2, batch_size=8, heldout_pairs=40, num_workers=0)
    ids = arrays["pair_id"]
    held = {ids[i] for i in a.heldout_indices}
    assert held == set(sorted(ids[:400], key=heldout_key)[:40])  # a fixed count: the 40 smallest hashes
    assert not ({ids[i] for i in a.train_indices} & held)
    assert len(a.train_indices) + len(held) == 400  # the 5 uncommitted features rows are left out
    for epoch in (0, 1):
        ea, eb = set(a.epoch_order(epoch)), set(b.epoch_order(epoch))
        assert not ea & eb and len(ea) == len(eb) == a.steps_per_epoch * 8
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    # the split depends on the ids only; a named split holds out its shards whole
    ids_ = [f"train-0.parquet#{i}" for i in range(6)] + [f"validation-0.parquet#{i}" for i in range(3)]
    tr, he = split_heldout(ids_[::-1], 2)
    assert sorted(ids_[::-1][i] for i in he) == sorted(sorted(ids_, key=heldout_key)[:2]) and len(tr) == 7
    tr, he = split_heldout(ids_, 2, split="validation")
    assert [ids_[i] for i in he] == ids_[6:] and [ids_[i] for i in tr] == sorted(ids_[:6])
    with pytest.raises(UserError, match="heldout_split='valid'"):
        TrainLoader(root, batch_size=8, heldout_split="valid", num_workers=0)


def test_order_and_split_follow_pair_ids_not_row_order(lake, tmp_path):
    """The same pairs committed in another fragment order give the same held-out set and training order."""
    root, _ = lake
    other = tmp_path / "shuffled"
    write_synthetic_lake(str(other), n_pairs=400, uncommitted=5, text_guidance_dim=12, shuffle_rows=1, **DIMS)
    a = TrainLoader(root, batch_size=8, seed=5, heldout_pairs=30, num_workers=0)
    b = TrainLoader(str(other), batch_size=8, seed=5, heldout_pairs=30, num_workers=0)
    assert not np.array_equal(a.pair_ids, b.pair_ids)  # the tables really differ in row order
    for epoch in (0, 1):
        assert [a.pair_ids[i] for i in a.epoch_order(epoch)] == [b.pair_ids[i] for i in b.epoch_order(epoch)]
    assert [a.pair_ids[i] for i in a.heldout_indices] == [b.pair_ids[i] for i in b.heldout_indices]
    assert next(iter(a)).pair_ids == next(iter(b)).pair_ids


def test_loader_state_resumes_the_exact_order(lake):
    root, _ = lake
    full = TrainLoader(root, batch_size=8, seed=3, num_workers=2, prefetch=2)
    total = full.steps_per_epoch + 5  # crosses an epoch boundary
    it = iter(full)
    order = [next(it).pair_ids for _ in range(total)]
    part = TrainLoader(root, batch_size=8, seed=3, num_workers=2, prefetch=4)
    it = iter(part)
    first = [next(it).pair_ids for _ in range(10)]
    state = part.state_dict()
    assert state["epoch"] == 0 and state["position"] == 10
    again = TrainLoader(root, batch_size=8, seed=3, num_workers=0)
    again.load_state_dict(state)
    it = iter(again)
    rest = [next(it).pair_ids for _ in range(total - 10)]
    assert first + rest == order
    bad = TrainLoader(root, batch_size=4, seed=3, num_workers=0)
    with pytest.raises(UserError, match="batch_size"):
        bad.load_state_dict(state)


def test_buffer_pool_hands_a_buffer_out_once_until_it_is_given_back():
    from img.training.loader import BufferPool

    pool = BufferPool(max_free=2)
    a = pool.get(1000)
    b = pool.get(1000)
    assert a is not b and pool.allocated == 2 and pool.out == 2 and len(pool) == 0
    pool.give_back([a])
    c = pool.get(900)  # a is idle and large enough
    assert c is a and pool.allocated == 2 and pool.out == 2
    assert pool.get(1000) is not b  # b was never given back: a new buffer
    assert pool.allocated == 3
    pool.give_back([b])
    assert pool.get(10**6) is not b and pool.allocated == 4  # b is far too small: not used for a big read
    pool.give_back([c, b, bytearray(5)])
    assert len(pool) == 2  # at most max_free idle buffers are kept (the newest)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_batches_own_their_buffers_until_released(lake):
    import gc

    root, arrays = lake

    def check(batch):
        for j, pid in enumerate(batch.pair_ids):
            i = _row(arrays, pid)
            ln = arrays["lens"][i]
            assert torch.equal(batch.guidance[j, :ln], torch.from_numpy(arrays["guidance"][i]))
            assert not batch.guidance[j, ln:].any()  # zero padding, also in a recycled buffer

    # batches kept by the caller keep their values while later batches are read (take_blobs: per-row reads too)
    for blob_api in ("auto", "take_blobs"):
        loader = TrainLoader(root, batch_size=8, num_workers=2, prefetch=2, blob_api=blob_api)
        it = iter(loader)
        kept = [next(it) for _ in range(6)]
        assert len({_ptr(b.guidance) for b in kept}) == 6  # each kept batch owns its own padded buffer
        for batch in kept:
            check(batch)
        it.close()
    # released batches give their buffer back and the next read reuses it, with the right values
    loader = TrainLoader(root, batch_size=8, num_workers=0, blob_api="take_blobs")
    order = loader.epoch_order(0)
    with loader.read(order[:8]) as first:
        assert loader._buffers.out == 1  # the padded buffer; the per-row read buffers went back already
        check(first)
        base = _ptr(first.guidance)
    assert loader._buffers.out == 0
    with pytest.raises(RuntimeError, match="released"):
        first.guidance  # its padded buffer went back to the loader
    with loader.read(order[:8]) as again:  # the same rows again: the same buffer, the right values
        assert _ptr(again.guidance) == base
        check(again)
        moved = again.to("cpu", again.guidance.dtype)  # same dtype and device: no copy, and moved owns the buffer
        assert _ptr(moved.guidance) == base
    assert loader._buffers.out == 1  # releasing `again` did not give back the buffer `moved` uses
    for s in range(8, 64, 8):  # other rows in recycled buffers read right
        with loader.read(order[s : s + 8]) as batch:
            assert _ptr(batch.guidance) != base
            check(batch)
    check(moved)  # untouched by the reads meanwhile
    moved.release()
    assert loader._buffers.out == 0 and loader._buffers.allocated < 8 + 8 * 8
    first.release()  # idempotent
    moved = loader.read(order[:8]).to("cpu", torch.float16)
    # a dropped batch gives its buffer back once nothing uses its guidance any more
    moved32 = loader.read(order[:8]).to("cpu", torch.float32)
    gc.collect()
    assert loader._buffers.out == 1 and torch.equal(moved32.guidance, moved.guidance.float())  # moved's buffer only
    moved.release()
    assert loader._buffers.out == 0
    held = loader.read(order[:8]).guidance  # the batch is gone, its padded tensor is not: the buffer stays out
    gc.collect()
    assert loader._buffers.out == 1
    del held
    gc.collect()
    assert loader._buffers.out == 0


def test_loader_pins_table_versions(tmp_path):
    root = str(tmp_path / "grow")
    arrays = write_synthetic_lake(root, n_pairs=40, uncommitted=8, **DIMS)
    first = TrainLoader(root, batch_size=4, heldout_pairs=0, num_workers=0)
    assert len(first.train_indices) == 40
    import pyarrow as pa

    from schemas import pairs as pairs_schema

    late = [str(p) for p in arrays["pair_id"][40:]]  # the embed job commits the remaining pairs
    lance.write_dataset(pa.table({"pair_id": late, "caption": late, "question": late, "winner_uid": late,
                                  "loser_uid": late, "source": late, "row": list(range(8)), "broken": [None] * 8},
                                 schema=pairs_schema.SCHEMA), f"{root}/pairs.lance", mode="append")
    assert len(TrainLoader(root, batch_size=4, heldout_pairs=0, num_workers=0).train_indices) == 48
    state = first.state_dict()
    pinned = TrainLoader(root, batch_size=4, heldout_pairs=0, num_workers=0, version=state["version"],
                         pairs_version=state["pairs_version"])
    assert np.array_equal(pinned.train_indices, first.train_indices)
    pinned.load_state_dict(state)


def test_loader_guidance_sources_and_bf16(tmp_path, lake):
    root, arrays = lake
    b = next(iter(TrainLoader(root, batch_size=4, guidance="text", num_workers=0)))
    assert b.guidance.shape == (4, 5, 12)
    assert torch.equal(b.guidance[0], torch.from_numpy(arrays["text_guidance"][_row(arrays, b.pair_ids[0])]))
    b = next(iter(TrainLoader(root, batch_size=4, guidance="none", num_workers=0)))
    assert b.guidance.shape == (4, 0, DIMS["guidance_dim"]) and b.mask.shape == (4, 0)
    bf = write_synthetic_lake(str(tmp_path / "bf"), n_pairs=16, dtype="bfloat16", **DIMS)
    b = next(iter(TrainLoader(str(tmp_path / "bf"), batch_size=4, heldout_pairs=0, num_workers=0,
                              blob_api="take_blobs")))
    i = _row(bf, b.pair_ids[0])
    assert b.winner.dtype == torch.bfloat16
    assert torch.equal(b.winner[0], torch.from_numpy(bf["winner"][i].astype(np.float32)).bfloat16())
    want = torch.from_numpy(bf["guidance"][i].astype(np.float32)).bfloat16()
    assert torch.equal(b.guidance[0, : bf["lens"][i]], want)
    with pytest.raises(UserError, match="no features table"):
        TrainLoader(str(tmp_path / "nothing"))
    nolake = tmp_path / "notext"
    write_synthetic_lake(str(nolake), n_pairs=16, **DIMS)
    with pytest.raises(UserError, match="text_guidance"):
        TrainLoader(str(nolake), guidance="text")


# ----------------------------------------------------------------------------- training
TOML = """
lr = 2e-3
batch_size = {batch}
k = 3
heldout_pairs = {held}
global_batch = 0
log_every = 10
checkpoint_every = 1000
num_workers = 1
prefetch = 2
seed = 1
"""


def _toml(tmp_path: Path, batch: int = 8, extra: str = "", held: int = 96) -> Path:
    p = tmp_path / f"train_{batch}.toml"
    p.write_text(TOML.format(batch=batch, held=held) + extra)
    return p


def _train(args: list[str]):
    from img.cli import app

    result = CliRunner().invoke(app, ["jobs", "train", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _metrics(lake: str, run_id: str) -> dict[str, dict[int, float]]:
    import pyarrow.compute as pc

    t = lance.dataset(f"{lake}/metrics.lance").to_table(filter=pc.field("run_id") == run_id)
    out: dict[str, dict[int, float]] = {}
    for s, n, v in zip(t["step"].to_pylist(), t["name"].to_pylist(), t["value"].to_pylist()):
        out.setdefault(n, {})[s] = v
    return out


def _run_id(run_dir: Path) -> str:
    import json

    return json.loads((run_dir / "run.json").read_text())["run_id"]


KINDS = ("colour", "count", "shape", "relation")


@pytest.fixture(scope="module")
def train_lake(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train_lake")
    write_synthetic_lake(str(root), n_pairs=640, seed=7, kinds=KINDS, **DIMS)
    return str(root)


@pytest.mark.slow
def test_training_learns_and_records_metrics(tmp_path, train_lake):
    from img.aligner import ImplicitAligner

    run = tmp_path / "run"
    out = _train(["--lake", train_lake, "--profile", "tiny", "--steps", "300", "--run-dir", str(run),
                  "--config", str(_toml(tmp_path, extra="passes = 2\n"))])
    assert "trained" in out.output
    m = _metrics(train_lake, _run_id(run))
    assert sorted(m["loss"]) == list(range(1, 301))
    for name in ("loss_base", "loss_pref", "d_win", "d_win_ref", "d_lose", "d_ref"):
        assert len(m[name]) == 300
    assert sorted(m["samples_per_s"]) == list(range(10, 301, 10))
    assert m["ref_copy"] and max(m["ref_copy"].values()) == len(m["ref_copy"])
    for step, v in m["loss"].items():
        assert math.isclose(v, m["loss_base"][step] + m["loss_pref"][step], rel_tol=1e-5)
    first = np.mean([m["loss_base"][s] for s in range(1, 21)])
    last = np.mean([m["loss_base"][s] for s in range(281, 301)])
    assert last < 0.6 * first
    h = {k: v[300] for k, v in m.items() if k.startswith("heldout")}
    assert h["heldout_pairs"] == 96
    assert h["heldout_d_aligned"] < 0.8 * h["heldout_d_identity"], h  # d(w, f(c)), one pass
    assert h["heldout_d_aligned_3pass"] < 0.8 * h["heldout_d_identity"], h  # the inference setting
    assert h["heldout_win_rate"] > 0.7 and h["heldout_win_rate_3pass"] > 0.7, h
    assert "heldout_d_aligned_2pass" in h and "heldout_win_rate_2pass" in h and "heldout_d_aligned_4pass" not in h
    # d is the paper's squared L2 norm (the default); the per-element form is logged beside it
    n_el = DIMS["ip_tokens"] * DIMS["ip_dim"]
    assert math.isclose(h["heldout_mse_identity"] * n_el, h["heldout_d_identity"], rel_tol=1e-5)
    assert math.isclose(h["heldout_mse_aligned"] * n_el, h["heldout_d_aligned"], rel_tol=1e-5)
    assert 0 < h["heldout_step_ratio"] and -1 <= h["heldout_step_cos"] <= 1
    # per broken kind: every figure, and the kinds add up to the whole
    assert sum(h[f"heldout_pairs_{k}"] for k in KINDS) == h["heldout_pairs"]
    for name in ("heldout_d_identity", "heldout_d_aligned", "heldout_win_rate", "heldout_d_aligned_3pass",
                 "heldout_win_rate_2pass"):
        total = sum(h[f"{name}_{k}"] * h[f"heldout_pairs_{k}"] for k in KINDS) / h["heldout_pairs"]
        assert math.isclose(total, h[name], rel_tol=1e-6), name
    assert all(h[f"heldout_d_aligned_{k}"] < h[f"heldout_d_identity_{k}"] for k in KINDS), h
    model = ImplicitAligner.from_pretrained(run / "aligner")
    assert model.config.dim == DIMS["ip_dim"] and torch.count_nonzero(model.zero_linear.weight) > 0
    assert model.config.passes == 2  # recorded for `img infer`
    assert (run / "latest_checkpoint").read_text().strip() == "step_00000300"
    # a second start in the same folder must be explicit
    with pytest.raises(UserError, match="--resume"):
        _train(["--lake", train_lake, "--steps", "10", "--run-dir", str(run), "--config", str(_toml(tmp_path))])


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(tmp_path, train_lake):
    cfg = str(_toml(tmp_path))
    base = ["--lake", train_lake, "--profile", "tiny", "--config", cfg, "--checkpoint-every", "12"]
    a, b = tmp_path / "a", tmp_path / "b"
    _train([*base, "--steps", "24", "--run-dir", str(a)])
    _train([*base, "--steps", "12", "--run-dir", str(b)])
    ck = b / "checkpoints" / "step_00000012"
    assert (ck / "aligner" / "model.safetensors").is_file() and (ck / "reference" / "model.safetensors").is_file()
    assert (ck / "state.json").is_file() and (ck / "rng_rank0.safetensors").is_file()
    _train([*base, "--steps", "24", "--run-dir", str(b), "--resume"])
    ma, mb = _metrics(train_lake, _run_id(a)), _metrics(train_lake, _run_id(b))
    for name in ("loss", "loss_base", "loss_pref", "d_win_ref", "d_ref"):
        assert sorted(mb[name]) == list(range(1, 25))
        for s in range(1, 25):
            assert abs(ma[name][s] - mb[name][s]) <= 1e-6, (name, s, ma[name][s], mb[name][s])
    assert ma["ref_copy"] == mb["ref_copy"] and any(s > 12 for s in ma["ref_copy"])
    t = lance.dataset(f"{train_lake}/metrics.lance").to_table(filter=f"run_id = '{_run_id(b)}'")
    dup = Counter(zip(t["step"].to_pylist(), t["name"].to_pylist()))
    assert max(dup.values()) == 1  # no row recorded twice across the resume
    # a resume with a different config is refused, naming both fingerprints
    with pytest.raises(UserError, match="fingerprint"):
        _train(["--lake", train_lake, "--config", str(_toml(tmp_path, batch=4)), "--steps", "30",
                "--run-dir", str(b), "--resume"])


@pytest.mark.slow
def test_kill_leftovers_are_removed_and_pruning_keeps_the_pointer_target(tmp_path, train_lake):
    """keep_checkpoints = 1 with a partial checkpoint a kill left past the pointer, in a run folder named with a quote."""
    import shutil

    from img.training.run_folder import COMPLETE

    cfg = str(_toml(tmp_path, extra="keep_checkpoints = 1\n"))
    run = tmp_path / "it's a run"  # the run id holds the quote; --resume filters metrics by it
    base = ["--lake", train_lake, "--profile", "tiny", "--config", cfg, "--checkpoint-every", "2"]
    _train([*base, "--steps", "4", "--run-dir", str(run)])
    cks = run / "checkpoints"
    assert sorted(p.name for p in cks.glob("step_*")) == ["step_00000004"]
    assert (cks / "step_00000004" / COMPLETE).is_file()
    # What a SIGKILL while saving step 8 leaves: DeepSpeed's files, no state.json, no COMPLETE ...
    partial = cks / "step_00000008"
    partial.mkdir()
    for f in (cks / "step_00000004").glob("*.pt"):
        shutil.copy(f, partial / f.name)
    (run / ".aligner.tmp-0badc0de").mkdir()  # ... and one while installing the final aligner
    _train([*base, "--steps", "6", "--run-dir", str(run), "--resume"])
    tag = (run / "latest_checkpoint").read_text().strip()
    assert tag == "step_00000006" and sorted(p.name for p in cks.glob("step_*")) == [tag]
    assert (cks / tag / COMPLETE).is_file() and (cks / tag / "state.json").is_file()
    assert not list(run.glob(".*.tmp-*")) and (run / "aligner" / "model.safetensors").is_file()
    import pyarrow.compute as pc

    t = lance.dataset(f"{train_lake}/metrics.lance").to_table(filter=pc.field("run_id") == _run_id(run))
    seen = Counter(zip(t["step"].to_pylist(), t["name"].to_pylist()))
    assert sorted(s for s, n in seen if n == "loss") == list(range(1, 7)) and max(seen.values()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_never_unpickles_with_weights_only_false(tmp_path, train_lake, monkeypatch, stage):
    """Resume (in-process) reads every DeepSpeed file with weights_only=True and still matches an uninterrupted run."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from img.training.checkpoint_io import weights_only_load

    cfg = str(_toml(tmp_path, extra=f"zero_stage = {stage}\n"))
    base = ["--lake", train_lake, "--profile", "tiny", "--config", cfg, "--checkpoint-every", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    _train([*base, "--steps", "6", "--run-dir", str(a)])
    _train([*base, "--steps", "3", "--run-dir", str(b)])
    ck = b / "checkpoints" / "step_00000003"
    files = sorted(p.name for p in ck.glob("*.pt"))
    assert files == (["mp_rank_00_model_states.pt"] if stage == 0 else
                     ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])

    loaded = only_weights_only_torch_load(monkeypatch)
    with pytest.raises(AssertionError, match="weights_only=False"):  # DeepSpeed's own loader is caught
        TorchCheckpointEngine().load(str(ck / files[0]))
    _train([*base, "--steps", "6", "--run-dir", str(b), "--resume"])
    assert sorted(set(loaded)) == files  # every DeepSpeed file went through the guarded, weights-only load
    monkeypatch.undo()

    ma, mb = _metrics(train_lake, _run_id(a)), _metrics(train_lake, _run_id(b))
    for name in ("loss", "loss_base", "loss_pref", "d_win_ref"):
        assert sorted(mb[name]) == list(range(1, 7))
        for s in range(4, 7):
            assert abs(ma[name][s] - mb[name][s]) <= 1e-6, (stage, name, s, ma[name][s], mb[name][s])
    # a file naming a global outside the allowlist is refused, naming it
    bad = tmp_path / "bad.pt"
    torch.save({"ok": torch.ones(2), "cfg": argparse.Namespace(x=1)}, bad)
    with pytest.raises(UserError, match=r"argparse\.Namespace.*new `run_dir`"):
        weights_only_load(bad)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["none", "text"])
def test_guidance_ablations_train(tmp_path, guidance):
    root = tmp_path / "lake"
    write_synthetic_lake(str(root), n_pairs=96, text_guidance_dim=12, **DIMS)
    run = tmp_path / "run"
    _train(["--lake", str(root), "--steps", "6", "--run-dir", str(run),
            "--config", str(_toml(tmp_path, extra=f'guidance = "{guidance}"\n', held=16))])
    from img.aligner import ImplicitAligner

    model = ImplicitAligner.from_pretrained(run / "aligner")
    assert model.config.guidance_dim == (12 if guidance == "text" else DIMS["guidance_dim"])
    assert _metrics(str(root), _run_id(run))["heldout_d_aligned"]


def test_profile_dims_must_match_the_lake(tmp_path):
    other = tmp_path / "other"
    write_synthetic_lake(str(other), n_pairs=240, ip_tokens=2, ip_dim=8, guidance_dim=6, profile="elsewhere")
    with pytest.raises(UserError, match=r"profile 'tiny' has ip_tokens x ip_dim .* 2 x 8 .*--profile elsewhere"):
        _train(["--lake", str(other), "--profile", "tiny", "--steps", "2", "--run-dir", str(tmp_path / "r")])


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()),
           "-m", "img.cli", "jobs", "train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, err = proc.communicate()
        pytest.fail(f"2-rank run timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ranks_stderr(err: str) -> str:
    """Each rank's last lines, then the launcher's: a failing rank's own traceback, not only its peers' report."""
    lines = err.splitlines()
    parts = [f"--- rank {r}:\n" + "\n".join([ln for ln in lines if ln.startswith(f"[rank{r}]")][-30:])
             for r in range(2)]
    return "\n".join(parts + ["--- launcher:\n" + "\n".join(ln for ln in lines[-15:] if not ln.startswith("[rank"))])


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_global_batch(tmp_path, train_lake):
    """2 ranks x batch 8 see the same pairs per step as 1 rank x batch 16; DeepSpeed averages the gradients."""
    two, one = tmp_path / "two", tmp_path / "one"
    proc = _torchrun(["--lake", train_lake, "--profile", "tiny", "--steps", "12", "--run-dir", str(two),
                      "--config", str(_toml(tmp_path, batch=8))])
    assert proc.returncode == 0, _ranks_stderr(proc.stderr)
    assert proc.stdout.count("trained") == 1  # only rank 0 prints the summary
    _train(["--lake", train_lake, "--profile", "tiny", "--steps", "12", "--run-dir", str(one),
            "--config", str(_toml(tmp_path, batch=16))])
    m2, m1 = _metrics(train_lake, _run_id(two)), _metrics(train_lake, _run_id(one))
    assert sorted(m2["loss"]) == list(range(1, 13))
    for s in range(1, 13):
        a, b = m2["loss"][s], m1["loss"][s]
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (s, a, b)
    assert m2["heldout_pairs"][12] == m1["heldout_pairs"][12]
    assert abs(m2["heldout_d_aligned"][12] - m1["heldout_d_aligned"][12]) < 1e-4
    assert (two / "checkpoints" / "step_00000012" / "rng_rank1.safetensors").is_file()


def test_profile_defaults_then_config_then_overrides(tmp_path):
    from img.training.trainer import TrainConfig, load_train_config

    paper, sources = load_train_config("sdxl")  # no jobs/train_sdxl.toml: the paper's recipe
    assert paper == TrainConfig() and sources == []
    tiny, sources = load_train_config("tiny")
    assert sources == [str(REPO / "jobs" / "train_tiny.toml")]
    assert tiny.global_batch == 0 and tiny.heldout_pairs < 1000 and tiny.distance == "sum" and tiny.lam == 1.0
    mine = tmp_path / "mine.toml"
    mine.write_text('lam = 0.5\n[aligner]\ndepth = 1\n')
    cfg, sources = load_train_config("tiny", mine, overrides={"checkpoint_every": 7, "seed": None})
    assert (cfg.lam, cfg.lr, cfg.aligner.depth, cfg.checkpoint_every) == (0.5, tiny.lr, 1, 7) and len(sources) == 2
    cfg, _ = load_train_config("tiny", REPO / "jobs" / "train.toml")  # the paper's file wins over the profile's
    assert cfg == TrainConfig()
    mine.write_text("lrr = 1\n")
    with pytest.raises(UserError, match="unknown config key 'lrr'"):
        load_train_config("tiny", mine)
    with pytest.raises(UserError, match="does not exist"):
        load_train_config("tiny", tmp_path / "nope.toml")


def test_global_batch_is_checked_before_anything_is_written(tmp_path, train_lake):
    run, cfg = tmp_path / "run", tmp_path / "g.toml"
    cfg.write_text("global_batch = 64\nbatch_size = 8\n")
    with pytest.raises(UserError, match=r"global_batch = 64 .* 8 x 1 = 8\. Set batch_size = 64"):
        _train(["--lake", train_lake, "--steps", "2", "--run-dir", str(run), "--config", str(cfg)])
    assert not run.exists()


def test_every_train_toml_loads():
    from img.config import load_config
    from img.training.trainer import TrainConfig

    files = sorted((REPO / "jobs").glob("train*.toml"))
    assert len(files) >= 2
    for f in files:
        load_config(TrainConfig, f)
    assert load_config(TrainConfig, REPO / "jobs" / "train.toml") == TrainConfig()  # the file states the defaults
    with pytest.raises(UserError, match="unknown config key 'lrr'"):
        load_config(TrainConfig, None, overrides={"lrr": 1.0})
