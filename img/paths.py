"""Checks of the folders a command will write, done before anything starts, leaving nothing behind.

    check_writable_folder("runs/r1", "`run_dir`")   # UserError naming the parameter, the value and the fix
    check_lake_folder("lake")                       # a local lake: a folder (or creatable), writable
    check_lake_folder("lake", must_exist=True)      # ... that already exists (train reads it)

They really write (a probe file, and the missing folders, all removed again), so
they are right for root too: ``os.access`` says "writable" to root even for an
immutable folder or a read-only mount.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from img.errors import UserError


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_folder(path: str | Path, name: str) -> None:
    """``UserError`` (naming the value as ``name``, e.g. "`out`") unless ``path`` is, or can be made as, a writable
    folder."""
    path = Path(path).expanduser()
    value = str(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {value!r} is a file, not a folder. Pass a folder path.")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise UserError(f"{name} {value!r} is not writable: {str(anchor)!r} is a file, not a folder. "
                        "Pass a folder path.")
    created: list[Path] = []
    p = path.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".img-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{name} {value!r} is not writable ({e.strerror or e}). "
                        "Pass a folder you can write to.") from None
    finally:
        for c in created:  # innermost first; only folders this check made
            try:
                c.rmdir()
            except OSError:
                break


def check_lake_folder(lake: str, must_exist: bool = False) -> None:
    """A local ``lake`` must be a writable folder (or creatable); object-store URIs are not checked here."""
    if "://" in str(lake) and not str(lake).startswith("file://"):
        return
    path = Path(str(lake).removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"`lake` {str(lake)!r} is a file, not a lake folder. Pass a folder (it is created if "
                        "missing) or an object-store URI.")
    if must_exist and not path.is_dir():
        raise UserError(f"`lake` {str(lake)!r} does not exist. Pass the folder given to `img jobs embed --lake`.")
    check_writable_folder(path, "`lake`")
