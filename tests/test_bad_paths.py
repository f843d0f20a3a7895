"""Bad paths and values (issue 9, item 4): one line naming the value and the fix, exit 2, nothing written.

Tests run as root, for whom permission bits do not stop a write, so "not writable" is made honestly:
an immutable folder (``chattr +i``; even root cannot create a file in it) or, for other users, mode 0500,
and a path whose parent is a file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from synthetic_lake import tiny_dims, write_synthetic_lake

from img.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Runs `img` commands in one fresh interpreter; for each: exit code, stderr, and whether DeepSpeed was imported.
_RUNNER = r"""
import contextlib, io, json, sys
from img.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["img", *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code, _ = "traceback", err.write(f"Traceback {type(e).__name__}: {e}\n")
    out.append({"code": code, "stderr": err.getvalue(), "deepspeed": "deepspeed" in sys.modules})
print("RESULT" + json.dumps(out))
"""


def run_img(cases: list[list[str]], cwd: Path | None = None, env: dict[str, str] | None = None) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(cases)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=600)
    assert r.returncode == 0 and "RESULT" in r.stdout, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def assert_one_line(res: dict, *needles: str) -> None:
    assert res["code"] == 2, res
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res["stderr"], res
    for n in needles:
        assert n in lines[0], (n, lines[0])


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


@pytest.fixture(scope="module", autouse=True)
def tiny_models_built():
    """Build the tiny models first: on a fresh cache the first command logs the build, and these tests count lines."""
    from img.models.tiny import tiny_root

    tiny_root("tiny")


@pytest.fixture()
def unwritable(tmp_path):
    """A folder no one can create files in, root included."""
    d = tmp_path / "locked"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(d)], check=True, capture_output=True)
    else:
        d.chmod(0o500)
    try:
        (d / "probe").write_text("x")
        pytest.fail(f"could not make {d} unwritable for this test")
    except OSError:
        pass
    yield d
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        d.chmod(0o700)


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("lake")
    write_synthetic_lake(str(root), n_pairs=32, **tiny_dims())
    return str(root)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> str:
    from img.data.sample import write_sample

    out = tmp_path_factory.mktemp("sample") / "data"
    write_sample(out, pairs=8, seed=0, ties=0.0)
    return str(out)


@pytest.mark.slow
def test_train_bad_run_dir_and_lake_are_refused_before_deepspeed(tmp_path, small_lake, unwritable):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    train = ["jobs", "train", "--profile", "tiny", "--steps", "2"]
    before = tree(tmp_path)
    res = run_img([
        [*train, "--lake", small_lake, "--run-dir", str(afile)],
        [*train, "--lake", small_lake, "--run-dir", str(afile / "run")],
        [*train, "--lake", small_lake, "--run-dir", str(unwritable / "run")],
        [*train, "--lake", small_lake, "--run-dir", str(unwritable)],
        [*train, "--lake", str(afile), "--run-dir", str(tmp_path / "r")],
        [*train, "--lake", str(tmp_path / "no-lake"), "--run-dir", str(tmp_path / "r")],
    ])
    assert_one_line(res[0], "--run-dir", str(afile), "is a file")
    assert_one_line(res[1], "--run-dir", str(afile / "run"), "is a file")
    assert_one_line(res[2], "--run-dir", str(unwritable / "run"), "not writable")
    assert_one_line(res[3], "--run-dir", str(unwritable), "not writable")
    assert_one_line(res[4], "--lake", str(afile), "is a file")
    assert_one_line(res[5], "--lake", "does not exist")
    assert not any(r["deepspeed"] for r in res), res  # all refused before DeepSpeed was even imported
    assert tree(tmp_path) == before and sorted(p.name for p in unwritable.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_train_refuses_a_lake_it_cannot_write_metrics_to(tmp_path, unwritable):
    import shutil

    lake = unwritable.parent / "ro-lake"
    write_synthetic_lake(str(lake), n_pairs=16, **tiny_dims())
    subprocess.run(["chattr", "+i", str(lake)], check=True) if os.geteuid() == 0 else lake.chmod(0o500)
    try:
        res = run_img([["jobs", "train", "--profile", "tiny", "--steps", "2", "--lake", str(lake),
                        "--run-dir", str(tmp_path / "r")]])
    finally:
        subprocess.run(["chattr", "-i", str(lake)], check=True) if os.geteuid() == 0 else lake.chmod(0o700)
    assert_one_line(res[0], "--lake", str(lake), "not writable")
    assert not res[0]["deepspeed"] and not (tmp_path / "r").exists()
    shutil.rmtree(lake)


@pytest.mark.slow
def test_embed_bad_values_write_nothing(tmp_path, sample_dir, unwritable):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    embed = ["jobs", "embed", "--source", sample_dir, "--profile", "tiny"]
    before = tree(tmp_path)
    res = run_img([
        [*embed, "--lake", str(tmp_path / "lake"), "--limit", "0"],
        [*embed, "--lake", str(tmp_path / "lake"), "--limit", "-3"],
        [*embed, "--lake", str(afile)],
        [*embed, "--lake", str(afile / "lake")],
        [*embed, "--lake", str(unwritable / "lake")],
        [*embed, "--lake", str(unwritable)],
    ])
    assert_one_line(res[0], "--limit", "0", ">= 1")
    assert_one_line(res[1], "--limit", "-3")
    assert_one_line(res[2], "--lake", str(afile), "is a file")
    assert_one_line(res[3], "--lake", str(afile / "lake"), "is a file")
    assert_one_line(res[4], "--lake", str(unwritable / "lake"), "not writable")
    assert_one_line(res[5], "--lake", str(unwritable), "not writable")
    assert tree(tmp_path) == before and not (tmp_path / "lake").exists()
    assert sorted(p.name for p in unwritable.iterdir()) == ["keep.txt"]


def test_a_dead_or_malformed_ray_address_is_refused_before_the_lake(tmp_path, sample_dir):
    """Ray retries a dead RAY_ADDRESS for minutes; the jobs and the bench say so at once and write nothing."""
    from img.net import free_port

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    before = tree(tmp_path)
    jobs = [["jobs", "embed", "--source", sample_dir, "--profile", "tiny", "--lake", str(tmp_path / "lake")],
            ["jobs", "eval", "--profile", "tiny", "--scorer", "tiny", "--prompts", str(prompts), "--n", "1",
             "--lake", str(tmp_path / "lake")],
            ["bench", "embed", "--pairs", "8", "--json"]]
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    for res in run_img(jobs, env={"RAY_ADDRESS": dead}):
        assert_one_line(res, f"RAY_ADDRESS='{dead}'", "nothing answers", "unset it")
    for res in run_img(jobs[:1], env={"RAY_ADDRESS": "head-node"}):
        assert_one_line(res, "RAY_ADDRESS='head-node'", "is not host:port")
    assert tree(tmp_path) == before and not (tmp_path / "lake").exists()


def test_ray_address_forms_that_ray_resolves_itself_pass(monkeypatch):
    from pipelines.common import check_ray_address

    for value in ("", "auto", "local"):
        monkeypatch.setenv("RAY_ADDRESS", value)
        check_ray_address()
    import socket

    with socket.socket() as s:  # something listening: the address passes, with or without ray://
        s.bind(("127.0.0.1", 0))
        s.listen()
        for value in (f"127.0.0.1:{s.getsockname()[1]}", f"ray://127.0.0.1:{s.getsockname()[1]}"):
            monkeypatch.setenv("RAY_ADDRESS", value)
            check_ray_address()


@pytest.mark.slow
def test_sample_too_many_pairs_and_unwritable_out(tmp_path, unwritable):
    import resource
    import time

    t0 = time.perf_counter()
    res = run_img([
        ["data", "sample", "--out", str(tmp_path / "s"), "--pairs", "10000000000"],
        ["data", "sample", "--out", str(unwritable / "s"), "--pairs", "4"],
        ["data", "sample", "--out", str(unwritable / "deeper" / "s"), "--pairs", "4"],
    ])
    assert time.perf_counter() - t0 < 120
    assert_one_line(res[0], "--pairs 10000000000", "smaller --pairs")
    assert_one_line(res[1], str(unwritable / "s"), "not writable")
    assert_one_line(res[2], str(unwritable / "deeper" / "s"), "not writable")
    assert not (tmp_path / "s").exists() and sorted(p.name for p in unwritable.iterdir()) == ["keep.txt"]
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 2**20  # KiB: no plan was built


class _Evil:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_garbage_or_malicious_aligner_is_a_clear_error_and_runs_nothing(tmp_path, unwritable):
    import torch

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"zero_linear.weight": _Evil(marker)}, evil)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(2048))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    folder = tmp_path / "aligner"  # a save_pretrained folder whose files are garbage
    folder.mkdir()
    (folder / "config.json").write_text("{broken")
    (folder / "model.safetensors").write_bytes(b"junk")
    out = tmp_path / "out"
    infer = ["infer", "--profile", "tiny", "--prompt", "a red circle", "--out", str(out)]
    res = run_img([[*infer, "--aligner", str(p)] for p in (evil, garbage, empty, bad_st, folder)]
                  + [[*infer, "--lake", str(unwritable / "lake")]], cwd=tmp_path)
    assert_one_line(res[0], str(evil), "never unpickled")
    assert "system" in res[0]["stderr"]  # names the global it refused
    assert_one_line(res[1], str(garbage), "not a PyTorch state dict")
    assert_one_line(res[2], str(empty), "not a PyTorch state dict")
    assert_one_line(res[3], str(bad_st), "not a readable safetensors file")
    assert_one_line(res[4], "config.json", "not readable JSON")
    assert_one_line(res[5], "--lake", "not writable")
    assert not marker.exists() and not out.exists()


def test_metrics_writer_takes_run_ids_with_quotes(tmp_path):
    from img.lake import tables as lake_mod
    from img.training.trainer import MetricsWriter
    from schemas import metrics as metrics_schema

    root = str(tmp_path / "lake")
    run_id = "o'brien's run-1234abcd"
    rows = pa.table({"run_id": [run_id, run_id, "other"], "step": [1, 2, 2], "name": ["loss"] * 3,
                     "value": [1.0, 2.0, 3.0]}, schema=metrics_schema.SCHEMA)
    lake_mod.append_rows(root, "metrics", rows, metrics_schema.SCHEMA)
    w = MetricsWriter(root, run_id, after_step=1)
    assert w.seen == {(2, "loss")}
    w.add(2, "loss", 9.0)
    w.add(3, "loss", 4.0)
    w.flush()
    assert MetricsWriter(root, run_id, after_step=0).seen == {(1, "loss"), (2, "loss"), (3, "loss")}
    # the notebooks' report reads one run's loss back by that id (a quoted SQL literal, not a broken query)
    from img.eval.report import loss_parts

    assert [(r["step"], r["value"]) for r in loss_parts(root, run_id)] == [(1, 1.0), (2, 2.0), (3, 4.0)]  # step 2 was already there
    assert lake_mod.sql_str(run_id) == "'o''brien''s run-1234abcd'"


def test_library_checks_name_the_value():
    from img.cli import cli_message
    from img.paths import check_lake_folder

    with pytest.raises(ValueError, match="`lake` '/proc/self/status' is a file") as e:  # UserError is a ValueError
        check_lake_folder("/proc/self/status")
    assert cli_message(e.value).startswith("--lake '/proc/self/status' is a file")  # what `img` prints
    check_lake_folder("s3://bucket/lake")  # object stores are checked by Lance, not here


def test_the_cli_shows_parameters_as_its_flags():
    from img.cli import cli_message, flags
    from img.inference.generation import GenerationSettings
    from img.models.profiles import get_profile

    with pytest.raises(UserError) as e:
        GenerationSettings(guidance_scale=-1).resolve(get_profile("tiny"))
    assert str(e.value) == "`guidance_scale` must be >= 0, got -1."
    assert cli_message(e.value) == "--guidance-scale must be >= 0, got -1."
    names = flags()
    assert names["fmt"] == "--format" and names["run_dir"] == "--run-dir" and names["prompts_file"] == "--prompts"
    # backticked words that are not parameters (commands, config keys) stay as written
    msg = UserError("`guidance` must be 'mllm'; see `img jobs embed --lake`, or pass `break_lock`.")
    assert cli_message(msg) == "`guidance` must be 'mllm'; see `img jobs embed --lake`, or pass --break-lock."
