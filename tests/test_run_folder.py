"""Run-folder housekeeping (issue 9): durable checkpoint commits, safe pruning, partial clean-up, atomic installs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from img.training import run_folder as rf


def _ck(run: Path, step: int, complete: bool = True, state: bool = True) -> Path:
    """A checkpoint folder as the trainer leaves it: DeepSpeed file, state.json, and COMPLETE when finished."""
    ck = run / "checkpoints" / f"step_{step:08d}"
    (ck / "aligner").mkdir(parents=True)
    (ck / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (ck / "aligner" / "model.safetensors").write_bytes(b"y" * 10)
    if state:
        (ck / "state.json").write_text("{}")
    if complete:
        (ck / rf.COMPLETE).write_text(ck.name)
    return ck


def _point(run: Path, step: int) -> None:
    (run / rf.POINTER).write_text(f"step_{step:08d}\n")


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())


def test_prune_never_deletes_the_pointer_target_when_a_partial_is_newer(tmp_path):
    """The issue's case: keep=1, a partial step_300 a kill left, the pointer at step_250."""
    run = tmp_path / "run"
    for s in (100, 200, 250):
        _ck(run, s)
    _ck(run, 300, complete=False, state=False)
    _point(run, 250)
    removed = rf.prune_checkpoints(run, keep=1)
    assert [p.name for p in removed] == ["step_00000100", "step_00000200"]
    assert _steps(run) == [250, 300]  # the pointer's target stays; the partial is not prune's business


def test_prune_keeps_n_complete_including_the_current_and_skips_partials(tmp_path):
    run = tmp_path / "run"
    _ck(run, 10)
    _ck(run, 20, complete=False, state=False)  # partial, older than the pointer (left alone)
    _ck(run, 30, complete=False)  # written by an older img: state.json, no marker, not past the pointer
    _ck(run, 40)
    _point(run, 40)
    assert rf.prune_checkpoints(run, keep=2) == [run / "checkpoints" / "step_00000010"]
    assert _steps(run) == [20, 30, 40]
    rf.prune_checkpoints(run, keep=1)
    assert _steps(run) == [20, 40]
    assert rf.prune_checkpoints(tmp_path / "no-run", keep=1) == []


def test_partial_checkpoints_past_the_pointer_are_removed_on_start(tmp_path):
    run = tmp_path / "run"
    _ck(run, 250)
    _ck(run, 300, complete=False, state=False)
    _ck(run, 350)  # even a complete one: the pointer never reached it, the resume redoes those steps
    (run / ".aligner.tmp-1234abcd").mkdir()  # an interrupted install of the final aligner
    _point(run, 250)
    removed = rf.remove_partial_checkpoints(run)
    assert [p.name for p in removed] == ["step_00000300", "step_00000350"]
    assert _steps(run) == [250] and not list(run.glob(".*.tmp-*"))
    fresh = tmp_path / "fresh"  # no pointer yet: every checkpoint folder is from a killed first attempt
    _ck(fresh, 5, complete=False)
    rf.remove_partial_checkpoints(fresh)
    assert _steps(fresh) == []


def test_commit_fsyncs_every_file_and_folder_before_the_pointer_moves(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ck = _ck(run, 12, complete=False)
    must = {str(p) for p in ck.rglob("*")} | {str(ck), str(ck.parent)}  # what the ranks wrote
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rf.commit_checkpoint(run, ck.name)
    monkeypatch.undo()
    pointer_at = events.index(("replace", str(run / rf.POINTER)))
    synced = {p for kind, p in events[:pointer_at] if kind == "fsync"}
    assert must <= synced, must - synced
    complete_at = events.index(("replace", str(ck / rf.COMPLETE)))
    assert complete_at < pointer_at and ("fsync", str(ck)) in events[complete_at:pointer_at]
    assert ("fsync", str(run)) in events[pointer_at:]  # the pointer's rename itself is made durable
    assert (run / rf.POINTER).read_text().strip() == ck.name and rf.is_complete(ck)


def test_install_folder_renames_into_place_and_keeps_the_old_one_on_failure(tmp_path):
    final = tmp_path / "aligner"

    def write(text):
        def go(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "model.safetensors").write_text(text)
            if text == "boom":
                raise RuntimeError("killed mid-write")
        return go

    rf.install_folder(final, write("v1"))
    assert (final / "model.safetensors").read_text() == "v1"
    with pytest.raises(RuntimeError, match="mid-write"):
        rf.install_folder(final, write("boom"))
    assert (final / "model.safetensors").read_text() == "v1"  # the reader still sees a whole folder
    rf.install_folder(final, write("v2"))
    assert (final / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligner"]  # no temporary or old folder left
