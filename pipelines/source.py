"""Pick-a-Pic v2 parquet shards as input: listing, validation and work planning.

    shards = list_shards("data/sample")            # or "s3://bucket/pickapic/train"
    units, counts, damaged = plan_units(shards, done_ids, limit=None)

``list_shards`` reads every shard's footer and checks the Arrow types of the
columns the job reads (a wrong type is a ``UserError`` naming the column, both
types and the shard). Planning reads only ``label_0`` (a few bytes per row)
from every shard, drops ties (label_0 = 0.5) and rows already done, and emits
units of at most ``unit_rows`` todo rows of one parquet row group. A reader
streams the unit's row group up to its last row (Pick-a-Pic's shards, written
by HF datasets, have ~100-row groups, so the re-read factor is small).

Damaged input does not stop the job: a shard whose footer cannot be read, and a
row group whose ``label_0`` cannot be read, come back in ``damaged`` as
quarantine rows (pair ids ``<shard>#*`` and ``<shard>#<row>``); a rerun counts
those ids as done.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from img.data.shard_files import list_shard_files
from img.errors import UserError
from schemas.pickapic import KIND_TYPES, READ_KINDS, REQUIRED, type_fits

log = logging.getLogger(__name__)

# Row groups bigger than this (compressed bytes) are streamed page by page instead of read whole.
STREAM_ROW_GROUP_BYTES = 256 << 20
# Errors a damaged parquet file raises while being read (UnicodeDecodeError, a ValueError, for broken strings).
READ_ERRORS = (OSError, pa.ArrowException, ValueError, EOFError)


@dataclass(frozen=True)
class SourceShard:
    uri: str  # full path or URI of the parquet file
    name: str  # file name; with the row index it forms the pair_id
    storage_options: str = "{}"  # JSON of pyarrow filesystem options (unused for local paths)
    error: str = ""  # why the footer cannot be read (then the shard is quarantined whole, as ``<name>#*``)

    def open(self):
        """A readable file object for the shard (local or object store)."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.uri if "://" in self.uri else "file://" + self.uri)
        return fs.open_input_file(path)

    @property
    def whole_id(self) -> str:
        """The quarantine pair id that stands for every row of an unreadable shard."""
        return f"{self.name}#*"


def describe_error(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one printable line (parquet errors carry newlines and control bytes)."""
    text = re.sub(r"\s+", " ", "".join(c if c.isprintable() or c.isspace() else "?" for c in str(e))).strip()
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def check_columns(schema: pa.Schema, shard: str) -> None:
    """Raise ``UserError`` unless ``schema`` has every column the job reads, with a usable Arrow type."""
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise UserError(f"source shard {shard!r} lacks Pick-a-Pic v2 column(s) {missing}. "
                        "Pass Pick-a-Pic v2 shards (see `img data sample --format pickapic`).")
    for col, kind in READ_KINDS.items():
        t = schema.field(col).type
        if not type_fits(kind, t):
            raise UserError(f"source shard {shard!r}: column {col!r} has type {t}, expected {KIND_TYPES[kind]}. "
                            "Pass Pick-a-Pic v2 shards (see `img data sample --format pickapic`).")


def list_shards(source: str, storage_options: dict | None = None) -> list[SourceShard]:
    """All ``*.parquet`` files under ``source`` (a folder, a file, or a URI), sorted by name.

    A shard whose footer cannot be read is kept with ``error`` set (and a
    warning logged); a readable one with a missing or mistyped column is a
    ``UserError``.
    """
    import pyarrow.parquet as pq

    files = list_shard_files(source, "`source`", (".parquet",), "a folder of Pick-a-Pic v2 parquet shards (e.g. one "
                             "written by `img data sample --out DIR`)")
    shards = []
    for f in files:
        shard = SourceShard(uri=f.uri, name=f.name, storage_options=json.dumps(storage_options or {}))
        try:
            schema = pq.ParquetFile(shard.open()).schema_arrow
        except READ_ERRORS as e:
            if isinstance(e, NotImplementedError):  # a limit of ours, not damage: fail loudly
                raise
            why = describe_error(e)
            log.warning("source shard %s cannot be read (%s); it is quarantined whole as %s", f.uri, why,
                        shard.whole_id)
            shards.append(SourceShard(shard.uri, shard.name, shard.storage_options, error=why))
            continue
        check_columns(schema, f.uri)
        shards.append(shard)
    return shards


def _damaged(shard: SourceShard, row: int | None, pair_id: str, reason: str) -> dict[str, Any]:
    return {"pair_id": pair_id, "source": shard.uri, "row": row, "reason": reason, "caption": ""}


@dataclass
class _Plan:
    """What ``plan_units`` accumulates: work units, counts, and quarantine rows for unreadable input."""

    done: set[str]
    unit_rows: int
    counts: dict[str, int] = field(default_factory=lambda: {"rows": 0, "ties": 0, "done": 0, "todo": 0, "damaged": 0})
    units: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[dict[str, Any]] = field(default_factory=list)

    def unreadable_shard(self, shard: SourceShard) -> None:
        """A shard whose footer cannot be read: one quarantine row for all its rows (unless done before)."""
        if shard.whole_id in self.done:
            self.counts["done"] += 1
            return
        self.damaged.append(_damaged(shard, None, shard.whole_id,
                                     f"shard {shard.name}: footer unreadable, all rows skipped ({shard.error})"))
        self.counts["damaged"] += 1

    def unreadable_rows(self, shard: SourceShard, rg: int, start: int, n_rg: int, take: int, e: Exception) -> None:
        """A row group whose ``label_0`` cannot be read: each of its rows quarantined (unless done before)."""
        reason = (f"shard {shard.name} row group {rg} (rows {start}-{start + n_rg - 1}): "
                  f"label_0 unreadable ({describe_error(e)})")
        new = [r for r in range(start, start + take) if f"{shard.name}#{r}" not in self.done]
        log.warning("%s; %d rows quarantined now, %d earlier", reason, len(new), take - len(new))
        self.damaged += [_damaged(shard, r, f"{shard.name}#{r}", reason) for r in new]
        self.counts["damaged"] += len(new)
        self.counts["done"] += take - len(new)

    def row_group(self, shard: SourceShard, shard_json: str, rg: int, start: int, n_rg: int, labels: list,
                  stream: bool) -> None:
        """Units of at most ``unit_rows`` decisive, not yet done rows of one row group."""
        rows = []
        for i, lab in enumerate(labels):
            r = start + i
            if lab not in (0.0, 1.0):
                self.counts["ties"] += 1
            elif f"{shard.name}#{r}" in self.done:
                self.counts["done"] += 1
            else:
                rows.append(r)
        for i in range(0, len(rows), self.unit_rows):
            self.units.append({"shard": shard_json, "row_group": rg, "rg_start": start, "rg_rows": n_rg,
                               "stream": stream, "rows": json.dumps(rows[i: i + self.unit_rows])})
        self.counts["todo"] += len(rows)


def check_limit(limit: int | None) -> None:
    """``UserError`` unless ``limit`` (rows to embed at most) is None or >= 1."""
    if limit is not None and limit < 1:
        raise UserError(f"`limit` must be >= 1, got {limit}. Omit it to embed everything.")


def plan_units(shards: list[SourceShard], done: set[str], limit: int | None,
               unit_rows: int = 32) -> tuple[list[dict[str, Any]], dict[str, int], list[dict[str, Any]]]:
    """Work units, counts (rows, ties, done, todo, damaged) and quarantine rows for unreadable input.

    A unit is at most ``unit_rows`` todo rows of one row group. Small units keep
    Ray blocks small, so results (and commits) stream out as they finish
    instead of once per row group.
    """
    import pyarrow.parquet as pq

    check_limit(limit)
    plan = _Plan(done, unit_rows)
    remaining = limit if limit is not None else float("inf")
    for shard in shards:
        if remaining <= 0:
            break
        if shard.error:
            plan.unreadable_shard(shard)
            continue
        pf = pq.ParquetFile(shard.open())
        shard_json = json.dumps(asdict(shard))
        start = 0
        for rg in range(pf.num_row_groups):
            if remaining <= 0:
                break
            meta = pf.metadata.row_group(rg)
            n_rg = meta.num_rows
            take = int(min(n_rg, remaining))
            remaining -= take
            plan.counts["rows"] += take
            try:
                labels = pf.read_row_group(rg, columns=["label_0"]).column("label_0").to_pylist()[:take]
            except READ_ERRORS as e:
                if isinstance(e, NotImplementedError):
                    raise
                plan.unreadable_rows(shard, rg, start, n_rg, take, e)
            else:
                stream = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns)) \
                    > STREAM_ROW_GROUP_BYTES
                plan.row_group(shard, shard_json, rg, start, n_rg, labels, stream)
            start += n_rg
    return plan.units, plan.counts, plan.damaged
