"""`img lake vacuum`: unreferenced files older than the window go, every version and every row stays."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import lance
import pyarrow as pa
import pytest
from lance.fragment import write_fragments
from lock_holder import ENV, Holder, img_cmd, lake_counts

from img.data.sample import expected_counts, write_sample
from img.errors import UserError
from img.lake import tables as lake_mod
from img.lake.vacuum import parse_age, unreferenced_files, vacuum


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_vacuum_removes_only_old_unreferenced_files_and_keeps_every_version(tmp_path):
    lake = str(tmp_path)
    uri = lake_mod.table_uri(lake, "metrics")
    t = pa.table({"step": list(range(10))})
    lance.write_dataset(t, uri)
    lance.write_dataset(t, uri, mode="append")
    lance.dataset(uri).delete("step = 3")  # a deletion file, referenced
    old = write_fragments(t, uri, schema=t.schema)[0].files[0].path  # two uncommitted fragments
    young = write_fragments(t, uri, schema=t.schema)[0].files[0].path
    old_path, young_path = f"{uri}/data/{old}", f"{uri}/data/{young}"
    _age(old_path, 7200)
    (tmp_path / "junk.lance").mkdir()  # a stray entry that is no dataset: skipped, not fatal
    assert sorted(p for p, _ in unreferenced_files(lake, "metrics")) == sorted([f"data/{old}", f"data/{young}"])

    dry = vacuum(lake, parse_age("1h"), dry_run=True)
    assert (dry.removed_files, dry.kept_young) == (1, 1) and os.path.exists(old_path)
    rep = vacuum(lake, parse_age("1h"))
    assert (rep.removed_files, rep.kept_young, rep.skipped) == (1, 1, ["junk"])
    assert not os.path.exists(old_path) and os.path.exists(young_path)
    rep = vacuum(lake, parse_age("0"))
    assert rep.removed_files == 1 and not os.path.exists(young_path) and unreferenced_files(lake, "metrics") == []
    ds = lance.dataset(uri)  # every version still readable, the latest intact
    assert [lance.dataset(uri, version=v).count_rows() for v in (1, 2, 3)] == [10, 20, 18]
    assert ds.to_table().column("step").to_pylist() == [s for s in range(10) if s != 3] * 2


def test_parse_age_and_bad_values():
    assert [parse_age(s).total_seconds() for s in ("90s", "30m", "1h", "7d", "0", "2.5")] == \
        [90, 1800, 3600, 604800, 0, 2.5]
    with pytest.raises(UserError, match="'soon'"):
        parse_age("soon")


@pytest.mark.slow
def test_cli_mistakes_are_one_line(tmp_path):
    r = subprocess.run(img_cmd("lake", "vacuum", "--lake", str(tmp_path), "--older-than", "soon"), env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--older-than 'soon'" in r.stderr
    r = subprocess.run(img_cmd("lake", "vacuum", "--lake", str(tmp_path / "nope")), env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a lake folder" in r.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_vacuum_waits_for_the_writer_lock(tmp_path):
    h = Holder(tmp_path)
    p = subprocess.Popen(img_cmd("lake", "vacuum", "--lake", str(tmp_path)), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert f"pid {h.pid}" in line and "waiting" in line
    time.sleep(1.0)
    assert p.poll() is None  # still waiting
    h.release()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "vacuum" in out and "Traceback" not in err


def _orphans(lake):
    return {t: unreferenced_files(lake, t) for t in ("features", "pairs", "quarantine")}


def _settled_orphans(lake, quiet=3.0, limit=60.0):
    """The orphan files once none has appeared for ``quiet`` s: Ray's workers outlive a killed driver briefly."""
    seen, since, deadline = _orphans(lake), time.time(), time.time() + limit
    while time.time() - since < quiet and time.time() < deadline:
        time.sleep(0.5)
        now = _orphans(lake)
        if now != seen:
            seen, since = now, time.time()
    return seen


@pytest.mark.slow
def test_vacuum_after_a_sigkilled_embed(tmp_path):
    """Kill an embed while a batch is written but not committed; vacuum removes those files; nothing else changes."""
    data, lake = str(tmp_path / "data"), str(tmp_path / "lake")
    write_sample(data, pairs=600, seed=11, corrupt=0.02, ties=0.1, shard_rows=200)
    exp = expected_counts(600, corrupt=0.02, ties=0.1)
    cmd = img_cmd("jobs", "embed", "--dataset", "pickapic", "--source", data, "--profile", "tiny", "--lake", lake)
    orphans = {}
    for _ in range(3):  # the kill must land while some fragment is written and not yet committed
        proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            ds = lake_mod.open_table(lake, "pairs")
            if ds is not None and ds.count_rows() >= 32 and unreferenced_files(lake, "features"):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job finished before it could be killed; make the sample bigger"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        orphans = _settled_orphans(lake)
        if any(orphans.values()):
            break
    files = [f"{lake}/{t}.lance/{rel}" for t, fs in orphans.items() for rel, _ in fs]
    assert files and all(os.path.exists(f) for f in files)
    before = lake_counts(lake)

    kept = subprocess.run(img_cmd("lake", "vacuum", "--lake", lake), env=ENV, capture_output=True, text=True, timeout=300)
    assert kept.returncode == 0 and f"kept {len(files)} younger than 3600s" in kept.stdout, kept.stdout + kept.stderr
    assert all(os.path.exists(f) for f in files)  # inside the default 1 h window
    r = subprocess.run(img_cmd("lake", "vacuum", "--lake", lake, "--older-than", "0s", "--json"), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["removed_files"] == len(files) and report["kept_young"] == 0
    assert not any(os.path.exists(f) for f in files) and not any(_orphans(lake).values())
    assert lake_counts(lake) == before  # every committed row still reads

    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)  # and the job still finishes
    assert r.returncode == 0, r.stderr[-2000:]
    good = exp["decisive"] - exp["corrupt"]
    assert lake_counts(lake) == {"p": good, "pd": good, "f": good, "fd": good, "q": exp["corrupt"], "qd": exp["corrupt"]}
