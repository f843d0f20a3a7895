"""One writer per lake: the local flock, the object-store lease (run on a local path), and the jobs that take them."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import lance
import pyarrow as pa
import pytest
from lock_holder import ENV, Holder, img_cmd, lake_counts

from img.data.sample import expected_counts, write_sample
from img.errors import UserError
from img.lake.lock import LOCK_FILE, LakeLocked, LeaseLock, LockLost, writer_lock
from schemas import features as features_schema


# ----------------------------------------------------------------------------- local lake: flock
@pytest.mark.slow
def test_second_writer_is_told_who_holds_the_lock(tmp_path):
    h = Holder(tmp_path)
    try:
        with pytest.raises(LakeLocked) as e:
            with writer_lock(str(tmp_path), job="embed", timeout=0.5):
                pass
        msg = str(e.value)
        assert f"pid {h.pid}" in msg and "holder" in msg and "host " in msg and "started 20" in msg
        assert "\n" not in msg
    finally:
        h.release()


@pytest.mark.slow
def test_second_writer_waits_printing_one_line_then_runs(tmp_path):
    h = Holder(tmp_path)
    threading.Timer(1.5, h.release).start()
    lines: list[str] = []
    t0 = time.monotonic()
    with writer_lock(str(tmp_path), job="embed", on_wait=lines.append) as lock:
        waited = time.monotonic() - t0
        info = json.loads((tmp_path / LOCK_FILE).read_text())
    assert waited >= 1.0 and len(lines) == 1 and f"pid {h.pid}" in lines[0] and "waiting" in lines[0]
    assert lock.kind == "file" and info["pid"] == os.getpid() and info["job"] == "embed"
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder info left behind


@pytest.mark.slow
def test_sigkill_cannot_leave_a_local_lake_locked(tmp_path):
    h = Holder(tmp_path)
    h.kill()
    t0 = time.monotonic()
    with writer_lock(str(tmp_path), job="embed", timeout=5):
        assert time.monotonic() - t0 < 2


@pytest.mark.slow
def test_break_lock_on_a_local_lake_explains_instead(tmp_path):
    h = Holder(tmp_path)
    try:
        with pytest.raises(LakeLocked, match="does not apply to a local lake"):
            with writer_lock(str(tmp_path), job="embed", break_lock=True):
                pass
    finally:
        h.release()


@pytest.mark.slow
def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with writer_lock(str(tmp_path), job="eval") as outer:
        with writer_lock(str(tmp_path), job="infer", timeout=0.1) as inner:
            assert inner is outer
        other = subprocess.run([sys.executable, "-c", "from img.lake.lock import writer_lock\n"
                                f"with writer_lock({str(tmp_path)!r}, job='x', timeout=0.3): pass"],
                               env=ENV, capture_output=True, text=True)
        assert other.returncode != 0 and "LakeLocked" in other.stderr and f"pid {os.getpid()}" in other.stderr
    with writer_lock(str(tmp_path), job="x", timeout=0.1):  # fully released after the outer block
        pass


def test_unwritable_lake_is_a_user_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="writer lock"):
        with writer_lock(str(f), job="embed"):
            pass


# ----------------------------------------------------------------------------- object store: the lease
@pytest.mark.slow
def test_lease_heartbeats_keep_it_and_release_frees_it(tmp_path):
    lake = str(tmp_path)
    h = Holder(lake, kind="lease", ttl=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(LakeLocked) as e:  # 3 ttl without a release: only renewals keep it held
            with writer_lock(lake, job="train", kind="lease", ttl=1.0, timeout=3.0):
                pass
        assert time.monotonic() - t0 >= 3.0 and f"pid {h.pid}" in str(e.value)
        rec = LeaseLock(lake, "probe").read()[1]
        assert rec["job"] == "holder" and rec["pid"] == h.pid and not rec["released"]
        assert rec["expires"] > time.time() - 0.5  # renewed within the last ttl
    finally:
        assert "still mine" in h.release()
    assert LeaseLock(lake, "probe").read()[1]["released"]
    t0 = time.monotonic()
    with writer_lock(lake, job="train", kind="lease", ttl=1.0, timeout=5):
        assert time.monotonic() - t0 < 1.0


@pytest.mark.slow
def test_lease_of_a_killed_holder_expires(tmp_path):
    lake, ttl = str(tmp_path), 1.5
    h = Holder(lake, kind="lease", ttl=ttl)
    h.kill()
    t0 = time.monotonic()
    lines: list[str] = []
    with writer_lock(lake, job="embed", kind="lease", ttl=ttl, timeout=20, on_wait=lines.append):
        waited = time.monotonic() - t0
    assert len(lines) == 1 and f"pid {h.pid}" in lines[0]
    assert 0.9 * ttl <= waited <= 2 * ttl + 3


@pytest.mark.slow
def test_break_lock_takes_a_live_lease_and_the_holder_stops_committing(tmp_path):
    lake = str(tmp_path)
    h = Holder(lake, kind="lease", ttl=2.0)
    t0 = time.monotonic()
    with writer_lock(lake, job="vacuum", kind="lease", ttl=2.0, break_lock=True) as lock:
        assert time.monotonic() - t0 < 1.5
        assert lock.read()[1]["job"] == "vacuum"
        time.sleep(1.0)  # the holder's next heartbeat (every ttl/4) finds the lease taken
        out = h.release()
    assert out.startswith("lost:") and "taken over by vacuum" in out and "stopped before its next commit" in out


def test_lease_not_renewed_for_half_its_ttl_is_not_trusted(tmp_path):
    lock = LeaseLock(str(tmp_path), "embed", ttl=1.0)
    lock.acquire(break_lock=False, timeout=None, on_wait=print)
    lock._stop.set()  # stall the heartbeat (as a frozen process or a store outage would)
    lock._thread.join()
    lock.check()
    time.sleep(0.7)
    with pytest.raises(LockLost, match="not renewed"):
        lock.check()
    lock.release()


CONTENDER = r"""
import sys, time, json
from img.lake.lock import writer_lock
lake, log = sys.argv[1], sys.argv[2]
for _ in range(3):
    with writer_lock(lake, job="contender", kind="lease", ttl=5.0):
        t0 = time.time(); time.sleep(0.2); t1 = time.time()
    with open(log, "a") as f:
        f.write(json.dumps([t0, t1]) + "\n")
"""


@pytest.mark.slow
def test_lease_is_exclusive_under_contention(tmp_path):
    """Four processes race for the lease three times each; no two hold it at once."""
    lake, log = str(tmp_path / "lake"), str(tmp_path / "log")
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, lake, log], env=ENV, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()
    spans = sorted(json.loads(line) for line in open(log))
    assert len(spans) == 12
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans


@pytest.mark.slow
def test_cli_break_lock_takes_the_lease_from_a_stuck_holder(tmp_path):
    lake = str(tmp_path)
    h = Holder(lake, kind="lease", ttl=60.0)  # renewing: it would never expire
    env = dict(ENV, IMG_LAKE_LOCK="lease")
    r = subprocess.run(img_cmd("lake", "vacuum", "--lake", lake, "--break-lock"), env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "vacuum" in r.stdout, r.stderr
    assert f"breaking the writer lease on {lake} held by holder (host " in r.stderr and f"pid {h.pid}" in r.stderr
    assert "Traceback" not in r.stderr
    assert h.release().startswith("lost: the writer lease")
    bad = subprocess.run(img_cmd("lake", "vacuum", "--lake", lake), env=dict(env, IMG_LAKE_LEASE_TTL="soon"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'soon'" in bad.stderr


# ----------------------------------------------------------------------------- the writers
@pytest.mark.slow
def test_metrics_flush_waits_for_the_lock(tmp_path):
    from img.training.trainer import MetricsWriter

    lake = str(tmp_path)
    h = Holder(lake)
    w = MetricsWriter(lake, "run1")
    w.add(1, "loss", 0.5)
    done = threading.Event()
    t = threading.Thread(target=lambda: (w.flush(), done.set()))
    t.start()
    assert not done.wait(1.5)  # blocked while the holder lives
    assert lance.dataset(f"{lake}/metrics.lance").count_rows() == 0 if os.path.isdir(f"{lake}/metrics.lance") else True
    h.release()
    assert done.wait(30)
    t.join()
    assert lance.dataset(f"{lake}/metrics.lance").to_table().to_pylist() == \
        [{"run_id": "run1", "step": 1, "name": "loss", "value": 0.5}]


@pytest.mark.slow
def test_infer_waits_for_the_lock_before_appending_generations(tmp_path):
    lake, out = tmp_path / "lake", tmp_path / "out"
    h = Holder(lake)
    p = subprocess.Popen(img_cmd("infer", "--profile", "tiny", "--prompt", "a red circle", "--steps", "2", "--rounds", "1",
                              "--lake", str(lake), "--out", str(out)), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out.is_dir() and len(list(out.glob("*.png"))) == 2) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)  # the images are written before the rows; then infer needs the lock
    time.sleep(1.0)
    assert p.poll() is None and not (lake / "generations.lance").exists()
    h.release()
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    waits = [ln for ln in stderr.splitlines() if "is locked by holder" in ln]
    assert len(waits) == 1 and f"pid {h.pid}" in waits[0] and "Traceback" not in stderr
    assert lance.dataset(str(lake / "generations.lance")).count_rows() == 2


def test_loader_drops_duplicate_pair_ids_and_logs_them(tmp_path, caplog):
    from synthetic_lake import write_synthetic_lake

    from img.training.loader import TrainLoader

    lake = str(tmp_path)
    write_synthetic_lake(lake, n_pairs=40, ip_tokens=2, ip_dim=8, guidance_dim=6)
    ds = lance.dataset(f"{lake}/features.lance")
    cols = [n for n in ds.schema.names if n != "guidance"]  # the first three rows, appended again
    dup = ds.take([0, 1, 2], columns=cols).to_pydict()
    dup["guidance"] = [b.readall() for b in ds.take_blobs("guidance", indices=[0, 1, 2])]
    schema = features_schema.schema(2, 8)
    lance.write_dataset(pa.Table.from_pydict({n: dup[n] for n in schema.names}, schema=schema),
                        f"{lake}/features.lance", mode="append")
    with caplog.at_level(logging.INFO, logger="img.training.loader"):
        loader = TrainLoader(lake, batch_size=4, heldout_pairs=4, num_workers=0)
    assert loader.duplicates == 3
    kept = [loader.pair_ids[i] for i in list(loader.train_indices) + list(loader.heldout_indices)]
    assert len(kept) == len(set(kept)) == 40 and max(loader.train_indices.max(), loader.heldout_indices.max()) < 40
    assert "3 duplicate pair_id rows dropped" in caplog.text


# ----------------------------------------------------------------------------- two embeds at once, end to end
@pytest.mark.slow
def test_two_embeds_at_once_then_a_third_end_exactly_once(tmp_path):
    data, lake = str(tmp_path / "data"), str(tmp_path / "lake")
    write_sample(data, pairs=160, seed=4, corrupt=0.05, ties=0.1, shard_rows=80)
    exp = expected_counts(160, corrupt=0.05, ties=0.1)
    good, bad = exp["decisive"] - exp["corrupt"], exp["corrupt"]
    cmd = img_cmd("jobs", "embed", "--dataset", "pickapic", "--source", data, "--profile", "tiny", "--lake", lake)
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    waits = [[ln for ln in err.splitlines() if "is locked by embed" in ln] for _, err in outs]
    assert sorted(len(w) for w in waits) == [0, 1], waits  # exactly one job waited, with one line
    waiter, owner = (1, 0) if waits[1] else (0, 1)
    line = waits[waiter][0]
    assert f"pid {procs[owner].pid}" in line and "host " in line and "started " in line
    assert all("Traceback" not in err for _, err in outs)
    assert f"{good} pairs written" in outs[owner][0] and "0 pairs written" in outs[waiter][0]
    third = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "0 pairs written" in third.stdout, third.stderr[-2000:]
    assert lake_counts(lake) == {"p": good, "pd": good, "f": good, "fd": good, "q": bad, "qd": bad}
