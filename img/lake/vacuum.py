"""``img lake vacuum``: delete the files no version of any table references (the debris of killed jobs).

    img lake vacuum --lake lake                    # unreferenced files older than 1 hour
    img lake vacuum --lake lake --older-than 0s --dry-run
    report = vacuum("lake", older_than=parse_age("1h"))

A killed embed leaves fragment files its driver never committed; a killed
commit can leave transaction files and temporary manifests. Lance decides what
is unreferenced: ``explain_cleanup_old_versions`` with every version retained
and ``delete_unverified`` lists the files that *no* manifest references. Of
those, only files last modified more than ``older_than`` ago are deleted.
Every table version stays, so time travel and the version a training run
pinned (``--resume``) keep working.

It runs under the lake's writer lock (``img.lake.lock``), so no job of ours is
writing fragments meanwhile; the age window additionally protects writers that
do not take the lock. Object-store lakes are listed and deleted through
``pyarrow.fs`` with credentials from the environment.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from img.errors import UserError
from img.lake import tables as lake_mod
from img.lake.lock import writer_lock

log = logging.getLogger(__name__)

RETAIN_ALL = 2**40  # "keep the latest N versions" with N larger than any table's history
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    """``'90s'``, ``'30m'``, ``'1h'``, ``'7d'`` or plain seconds (``'0'``) -> timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise UserError(f"`older_than` {text!r} is not an age. Use a number with a unit: 90s, 30m, 1h, 7d (or 0).")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2) or "s"])


@dataclass
class VacuumReport:
    lake: str
    older_than_s: float
    dry_run: bool
    removed_files: int = 0
    removed_bytes: int = 0
    kept_young: int = 0  # unreferenced, but younger than the window
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # *.lance entries that are not readable Lance datasets

    def render(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        per = ", ".join(f"{t} {c['removed']}" for t, c in self.tables.items() if c["removed"]) or "none"
        skipped = f"; skipped (not Lance datasets): {', '.join(self.skipped)}" if self.skipped else ""
        return (f"vacuum {self.lake}: {verb} {self.removed_files} unreferenced files "
                f"({self.removed_bytes / 1e6:.1f} MB; by table: {per}); kept {self.kept_young} younger than "
                f"{self.older_than_s:g}s; every table version kept{skipped}")

    def to_dict(self) -> dict:
        return asdict(self)


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    if lake_mod.is_local(uri):
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - unsupported scheme or missing credentials
        raise UserError(f"cannot open {uri!r} to vacuum it ({e}). Set the store's credentials in the environment.") \
            from None


def table_names(lake: str) -> list[str]:
    """The ``*.lance`` tables directly under ``lake`` (local or object store)."""
    import pyarrow.fs as pafs

    if lake_mod.is_local(lake):
        return lake_mod.list_tables(lake.removeprefix("file://"))
    fs, base = _filesystem(lake)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return sorted(i.base_name[: -len(".lance")] for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.endswith(".lance"))


def unreferenced_files(lake: str, name: str, storage_options: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """(path relative to the table folder, size) of every file no version of table ``name`` references."""
    import lance

    ds = lance.dataset(lake_mod.table_uri(lake, name), storage_options=storage_options)
    ex = ds.explain_cleanup_old_versions(retain_versions=RETAIN_ALL, delete_unverified=True, include_files=True,
                                         max_files=10**9, error_if_tagged_old_versions=False)
    out = []
    marker = f"{name}.lance/"
    for f in ex.candidate_files:
        if f.kind == "manifest" or marker not in f.path:  # never a version; never outside the table
            log.warning("vacuum: not touching %s (%s)", f.path, f.kind)
            continue
        out.append((f.path.rsplit(marker, 1)[1], int(f.size_bytes)))
    return out


def vacuum(lake: str, older_than: timedelta = timedelta(hours=1), *, dry_run: bool = False,
           break_lock: bool = False, storage_options: dict[str, str] | None = None) -> VacuumReport:
    """Delete unreferenced files older than ``older_than`` from every table of ``lake``, under its writer lock."""
    if older_than < timedelta(0):
        raise UserError(f"`older_than` must be >= 0, got {older_than}.")
    if lake_mod.is_local(lake):
        import os

        path = lake.removeprefix("file://")
        if not os.path.isdir(path):
            raise UserError(f"`lake` {lake!r} is not a lake folder. Pass the folder given to `img jobs embed --lake`.")
    report = VacuumReport(lake=str(lake), older_than_s=older_than.total_seconds(), dry_run=dry_run)
    with writer_lock(lake, job="vacuum", break_lock=break_lock, storage_options=storage_options):
        cutoff = datetime.now(timezone.utc) - older_than
        for name in table_names(lake):
            fs, base = _filesystem(lake_mod.table_uri(lake, name))
            counts = {"removed": 0, "bytes": 0, "kept_young": 0}
            try:
                candidates = unreferenced_files(lake, name, storage_options)
            except (OSError, ValueError) as e:
                log.warning("vacuum: skipping %s, not a readable Lance dataset (%s)", name, str(e).split(",")[0][:200])
                report.skipped.append(name)
                continue
            for rel, size in candidates:
                path = f"{base.rstrip('/')}/{rel}"
                info = fs.get_file_info(path)
                if info.mtime is None:  # already gone
                    continue
                mtime = info.mtime if info.mtime.tzinfo else info.mtime.replace(tzinfo=timezone.utc)
                if mtime > cutoff:
                    counts["kept_young"] += 1
                    continue
                if not dry_run:
                    fs.delete_file(path)
                counts["removed"] += 1
                counts["bytes"] += size
            report.tables[name] = counts
            report.removed_files += counts["removed"]
            report.removed_bytes += counts["bytes"]
            report.kept_young += counts["kept_young"]
    return report
