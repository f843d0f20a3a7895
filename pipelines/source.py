"""Pick-a-Pic v2 parquet shards as input: listing, validation and work planning.

    shards = list_shards("data/sample")            # or "s3://bucket/pickapic/train"
    units, counts = plan_units(shards, done_ids, limit=None)

Planning reads only ``label_0`` (a few bytes per row) from every shard, drops
ties (label_0 = 0.5) and rows already done, and emits units of at most
``unit_rows`` todo rows of one parquet row group. A reader reads the unit's row
group and keeps its rows (Pick-a-Pic's shards, written by HF datasets, have
~100-row groups, so the re-read factor is small).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from img.errors import UserError
from schemas.pickapic import REQUIRED


@dataclass(frozen=True)
class SourceShard:
    uri: str  # full path or URI of the parquet file
    name: str  # file name; with the row index it forms the pair_id
    storage_options: str = "{}"  # JSON of pyarrow filesystem options (unused for local paths)

    def open(self):
        """A readable file object for the shard (local or object store)."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.uri if "://" in self.uri else "file://" + self.uri)
        return fs.open_input_file(path)


def list_shards(source: str, storage_options: dict | None = None) -> list[SourceShard]:
    """All ``*.parquet`` files under ``source`` (a folder, a file, or a URI), sorted by name."""
    import os

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    uri = source if "://" in source else "file://" + os.path.abspath(source)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"--source {source!r} cannot be opened ({e}). Pass a folder or URI of parquet shards.") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"--source {source!r} does not exist. Pass a folder of Pick-a-Pic parquet shards "
                        "(e.g. one written by `img data sample --out DIR`).")
    if info.type == pafs.FileType.File:
        files = [info]
    else:
        files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    if not files:
        raise UserError(f"--source {source!r} holds no *.parquet files. Pass the folder of Pick-a-Pic v2 shards.")
    prefix = uri.split("://", 1)[0]
    shards = []
    for f in sorted(files, key=lambda f: f.path):
        full = f.path if prefix == "file" else f"{prefix}://{f.path}"
        shard = SourceShard(uri=full, name=f.base_name, storage_options=json.dumps(storage_options or {}))
        try:
            names = pq.ParquetFile(shard.open()).schema_arrow.names
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"source shard {full!r} is not a readable parquet file ({e}). Remove or replace it.") from None
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise UserError(f"source shard {full!r} lacks Pick-a-Pic v2 column(s) {missing}. "
                            "Pass Pick-a-Pic v2 shards (see `img data sample`).")
        shards.append(shard)
    if len({s.name for s in shards}) != len(shards):
        raise UserError(f"--source {source!r} holds two shards with the same file name; pair ids would collide. "
                        "Give every shard a unique name.")
    return shards


def plan_units(shards: list[SourceShard], done: set[str], limit: int | None,
               unit_rows: int = 32) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Work units (at most ``unit_rows`` todo rows of one row group each) and counts: rows, ties, done, todo.

    Small units keep Ray blocks small, so results (and commits) stream out as
    they finish instead of once per row group.
    """
    import pyarrow.parquet as pq

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}. Omit it to embed everything.")
    counts = {"rows": 0, "ties": 0, "done": 0, "todo": 0}
    units: list[dict[str, Any]] = []
    remaining = limit if limit is not None else float("inf")
    for shard in shards:
        if remaining <= 0:
            break
        pf = pq.ParquetFile(shard.open())
        start = 0
        for rg in range(pf.num_row_groups):
            if remaining <= 0:
                break
            labels = pf.read_row_group(rg, columns=["label_0"]).column("label_0").to_pylist()
            labels = labels[: int(min(len(labels), remaining))]
            remaining -= len(labels)
            counts["rows"] += len(labels)
            rows = []
            for i, lab in enumerate(labels):
                r = start + i
                if lab not in (0.0, 1.0):
                    counts["ties"] += 1
                elif f"{shard.name}#{r}" in done:
                    counts["done"] += 1
                else:
                    rows.append(r)
            for i in range(0, len(rows), unit_rows):
                units.append({"shard": json.dumps(asdict(shard)), "row_group": rg, "rg_start": start,
                              "rows": json.dumps(rows[i: i + unit_rows])})
            counts["todo"] += len(rows)
            start += pf.metadata.row_group(rg).num_rows
    return units, counts
