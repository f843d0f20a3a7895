"""`img jobs eval` end to end: the exact command on a 7-line prompt file, killed with SIGKILL and run again (exactly
once), a rerun that adds nothing, and images that are the ones `img infer`'s pipeline makes."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from img.cli import app
from img.lake import tables as lake_mod
from img.lake.sql import run_query
from pipelines.eval import reconcile

pytestmark = pytest.mark.slow  # the eval job as a process (Ray), killed with SIGKILL and restarted

SEVEN = ["a red circle", "two blue squares", "a green star above a yellow triangle", "three purple circles",
         "a cyan square to the left of a red star", "a yellow triangle", "two green stars below a blue circle"]


def _cmd(prompts, lake, n):
    return [sys.executable, "-m", "img.cli", "jobs", "eval", "--profile", "tiny", "--scorer", "tiny",
            "--prompts", str(prompts), "--n", str(n), "--lake", str(lake)]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run_in_process(prompts, lake, n):
    """The same command through the same CLI code in this process (Ray started here is reused by later tests)."""
    r = CliRunner().invoke(app, _cmd(prompts, lake, n)[3:])
    return subprocess.CompletedProcess(["img"], r.exit_code, r.stdout, repr(r.exception))


def _sql(lake, query):
    """Rows of a read-only query through `img sql`'s code (img.lake.sql.run_query)."""
    return json.loads(run_query(str(lake), query, as_json=True))


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """The exact command on a 7-line file: first killed with SIGKILL after its first commit, then run again."""
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(SEVEN) + "\n")
    lake = root / "lake"
    small = root / "one_unit_fragments.toml"  # a run knob only: the run (and its id) is the same
    small.write_text("units_per_fragment = 1\n")
    proc = subprocess.Popen([*_cmd(prompts, lake, 6), "--config", str(small)], env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, committed = time.time() + 600, 0
    while time.time() < deadline and proc.poll() is None:
        ds = lake_mod.open_table(str(lake), "scores")
        committed = ds.count_rows() if ds is not None else 0
        if committed:
            break
        time.sleep(0.05)
    finished_early = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _run_in_process(prompts, lake, 6)
    return root, prompts, committed // 4, finished_early, r


def test_sigkill_then_restart_is_exactly_once(seven):
    root, _, units_done, finished_early, r = seven
    assert not finished_early, "the job finished before it could be killed"
    assert 0 < units_done < 6
    assert r.returncode == 0, r.stderr[-3000:]
    lake = root / "lake"
    scores = _sql(lake, "select prompt_id, system, seed, scorer, scorer_version from scores")
    assert len(scores) == 6 * 2 * 2 and len({tuple(s.values()) for s in scores}) == len(scores)
    images = _sql(lake, "select prompt_id, system, seed from eval_images")
    assert len(images) == 6 * 2 and len({tuple(s.values()) for s in images}) == len(images)
    assert len(_sql(lake, "select * from eval_runs")) == 6 and len(_sql(lake, "select * from prompts")) == 7
    skipped = int(r.stdout.split(" skipped as already done")[0].split()[-1])
    assert skipped >= units_done


def test_exact_command_writes_scores_and_win_rates(seven):
    root, _, _, _, r = seven
    assert r.returncode == 0, r.stderr[-3000:]
    assert "win rate [95% CI]" in r.stdout and "(all)" in r.stdout
    lake = root / "lake"
    out = subprocess.run([sys.executable, "-m", "img.cli", "sql", "--lake", str(lake), "--json",
                          "select * from scores"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)  # through `img sql --json`, as a user (and the external check) reads it
    assert len(scores) == 6 * 2 * 2  # 6 prompts x (base, img) x (pickscore, hpsv2), one seed
    keys = {(s["prompt_id"], s["system"], s["seed"], s["scorer"], s["scorer_version"]) for s in scores}
    assert len(keys) == len(scores)
    assert {s["system"] for s in scores} == {"base", "img"} and {s["scorer"] for s in scores} == {"pickscore", "hpsv2"}
    assert all(np.isfinite(s["score"]) for s in scores)
    sampled = _sql(lake, "select e.prompt_id, p.prompt from eval_runs e join prompts p using (prompt_id)")
    assert len(sampled) == 6 and {s["prompt"] for s in sampled} < set(SEVEN)
    assert {s["prompt_id"] for s in scores} == {s["prompt_id"] for s in sampled}
    stored = _sql(lake, "select prompt_id, sample_sql from eval_runs order by rank")
    assert [r["prompt_id"] for r in _sql(lake, stored[0]["sample_sql"])] == [r["prompt_id"] for r in stored]
    rates = _sql(lake, "select * from win_rates")
    assert sorted((w["scorer"], w["category"]) for w in rates) == [("hpsv2", "(all)"), ("pickscore", "(all)")]
    for w in rates:
        assert w["n"] == 6 and w["wins"] + w["ties"] + w["losses"] == 6 and w["system"] == "img"
        assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
        mine = [s for s in scores if s["scorer"] == w["scorer"]]
        base = {s["prompt_id"]: s["score"] for s in mine if s["system"] == "base"}
        wins = sum(s["score"] > base[s["prompt_id"]] for s in mine if s["system"] == "img")
        assert w["wins"] == wins
        assert w["mean_base"] == pytest.approx(np.mean(list(base.values())))


def test_rerun_adds_nothing(seven):
    root, prompts, *_ = seven
    lake = root / "lake"
    before = _sql(lake, "select name, rows, version from img_tables order by name")
    again = _run_in_process(prompts, lake, 6)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 unit(s) generated" in again.stdout and "6 skipped as already done" in again.stdout
    assert "win_rates unchanged" in again.stdout and "win rate [95% CI]" in again.stdout
    assert _sql(lake, "select name, rows, version from img_tables order by name") == before


def test_images_are_the_img_infer_pipeline_s(seven, one_torch_thread):
    """Base and IMG images of the job equal IMGPipeline's (the code `img infer` runs) for the same prompt and seed."""
    from img.inference.generation import IMGPipeline

    root, *_ = seven
    ds = lake_mod.open_table(str(root / "lake"), "eval_images")
    rows = ds.to_table().to_pylist()
    prompts = {p["prompt_id"]: p["prompt"] for p in _sql(root / "lake", "select prompt_id, prompt from prompts")}
    pid = rows[0]["prompt_id"]
    mine = {r["system"]: r for r in rows if r["prompt_id"] == pid}
    assert set(mine) == {"base", "img"} and mine["img"]["aligner_id"] == "fresh" and mine["img"]["rounds"] == 1
    result = IMGPipeline.from_profile("tiny")(prompts[pid], seed=0, rounds=1)
    for system, image in (("base", result.initial), ("img", result.images[-1])):
        got = np.asarray(Image.open(io.BytesIO(mine[system]["png"])).convert("RGB"))
        np.testing.assert_array_equal(got, np.asarray(image))
    assert mine["img"]["question"] == result.rounds[0].question


def test_interrupted_commit_is_reconciled(seven, tmp_path):
    """eval_images committed but scores not (a kill between the two commits): the images are removed to be redone."""
    root, *_ = seven
    lake = str(tmp_path / "lake")
    shutil.copytree(root / "lake", lake)
    run = _sql(lake, "select distinct run from scores")[0]["run"]
    victim = _sql(lake, "select prompt_id, seed from scores order by prompt_id limit 1")[0]
    lake_mod.open_table(lake, "scores").delete(f"prompt_id = '{victim['prompt_id']}'")
    done, orphans = reconcile(lake, run, None)
    assert orphans == 1 and len(done) == 5 and (victim["prompt_id"], victim["seed"]) not in done
    images = lake_mod.open_table(lake, "eval_images").to_table(columns=["prompt_id"]).column(0).to_pylist()
    assert len(images) == 10 and victim["prompt_id"] not in images

