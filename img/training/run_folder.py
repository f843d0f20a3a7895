"""A training run's folder: checking it, committing checkpoints durably, pruning, and installing results.

    check_run_dir("runs/r1")                         # UserError before anything starts if it cannot be written
    fsync_tree(ck)                                   # every rank, for the files it wrote
    commit_checkpoint("runs/r1", "step_00000300")    # rank 0: COMPLETE marker, then the pointer, both fsynced
    prune_checkpoints("runs/r1", keep=2)             # complete checkpoints older than the pointer's target only
    remove_partial_checkpoints("runs/r1")            # on start: folders a kill left past the pointer
    install_folder("runs/r1/aligner", lambda tmp: model.save_pretrained(tmp))   # temp name, then rename

A checkpoint folder is *complete* when it holds the ``COMPLETE`` marker. The
marker is written (and fsynced, with the folder) only after every rank's files
are fsynced, and ``latest_checkpoint`` moves only after that, so the pointer
always names a complete checkpoint that survives a power cut. Pruning never
touches the pointer's target, nor anything that is not complete; a partial
folder newer than the pointer (a kill mid-save) is removed when the run starts
again. Checkpoints written before the marker existed count as complete when
they hold ``state.json`` and are not newer than the pointer.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from img.paths import check_writable_folder

log = logging.getLogger(__name__)

POINTER = "latest_checkpoint"
COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- durability
def fsync_path(path: str | Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first, ``root`` last."""
    folders = []
    for here, dirs, files in os.walk(root):
        folders.append(here)
        for f in files:
            fsync_path(os.path.join(here, f))
    for here in reversed(folders):
        fsync_path(here)


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and an atomic rename, then fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# ----------------------------------------------------------------------------- checkpoints
def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(tag: str) -> int | None:
    m = _STEP.match(tag)
    return int(m.group(1)) if m else None


def pointer_tag(run_dir: str | Path) -> str | None:
    """The tag ``latest_checkpoint`` names, or None."""
    p = Path(run_dir) / POINTER
    return p.read_text().strip() if p.is_file() else None


def is_complete(ck: Path, pointer_step: int | None = None) -> bool:
    """True for a checkpoint with the COMPLETE marker (or an older img's checkpoint not past the pointer)."""
    if (ck / COMPLETE).is_file():
        return True
    step = step_of(ck.name)
    legacy_ok = pointer_step is not None and step is not None and step <= pointer_step
    return legacy_ok and (ck / "state.json").is_file()


def _listed(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    out = [(step_of(p.name), p) for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(out)  # type: ignore[arg-type]


def commit_checkpoint(run_dir: str | Path, tag: str) -> None:
    """Mark ``checkpoints/<tag>`` complete and point ``latest_checkpoint`` at it (rank 0, after every rank fsynced)."""
    run_dir = Path(run_dir)
    ck = checkpoints_dir(run_dir) / tag
    fsync_tree(ck)  # rank 0's own files; other ranks fsynced theirs before the barrier
    write_durably(ck / COMPLETE, tag + "\n")
    fsync_path(ck.parent)
    write_durably(run_dir / POINTER, tag + "\n")


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than the pointer's target, keeping the newest ``keep`` in all.

    The pointer's target is always kept; partial folders are never touched here. Returns what was deleted.
    """
    tag = pointer_tag(run_dir)
    current = step_of(tag) if tag else None
    if current is None:
        return []
    older = [p for s, p in _listed(run_dir) if s < current and is_complete(p, current)]
    doomed = older[: max(0, len(older) - (max(1, keep) - 1))]
    for p in doomed:
        shutil.rmtree(p)
        log.debug("pruned checkpoint %s", p.name)
    if doomed:
        fsync_path(checkpoints_dir(run_dir))
    return doomed


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint folders newer than the pointer (all of them when there is none): a kill left them."""
    tag = pointer_tag(run_dir)
    current = step_of(tag) if tag else -1
    doomed = [p for s, p in _listed(run_dir) if s > current]
    for p in doomed:
        log.warning("removing %s: a checkpoint newer than %s (%s), left by an interrupted run", p,
                    POINTER, tag or "none")
        shutil.rmtree(p)
    leftovers = [p for p in Path(run_dir).glob(".*.tmp-*")] if Path(run_dir).is_dir() else []
    for p in leftovers:  # temporary folders of an interrupted install_folder
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------- results
def install_folder(final: str | Path, write: Callable[[Path], object]) -> Path:
    """Have ``write(tmp)`` fill a temporary folder beside ``final``, fsync it, then rename it to ``final``.

    A reader of ``final`` never sees a half-written folder: a failure (or a kill) while writing leaves the
    previous ``final`` as it was. An existing ``final`` is moved aside, the new one renamed in, the old one
    deleted.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}.tmp-old")
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- checks
def check_run_dir(run_dir: str | Path) -> None:
    """``--run-dir`` must be a folder we can write (checked before DeepSpeed starts); nothing is left behind."""
    check_writable_folder(run_dir, "`run_dir`")
