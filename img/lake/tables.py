"""The lake: a folder (or object-store URI) of Lance tables, one per name.

Big writers (the embed job) write *fragments* in parallel workers and hand the
small fragment metadata to one committer; nothing is visible until committed,
so a killed job leaves only unreferenced files, never partial rows::

    frags = write_fragments(lake, "features", table, schema)   # in a worker
    commit_fragments(lake, "features", frags)                  # in the driver

Small writers (metrics, generations) append whole Arrow tables::

    append_rows(lake, "metrics", table, schema)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

import pyarrow as pa

from img.errors import UserError
from schemas.meta import read_provenance

log = logging.getLogger(__name__)


def table_uri(lake: str, name: str) -> str:
    """``<lake>/<name>.lance``; ``lake`` may be a local path or a URI such as ``s3://bucket/lake``."""
    return f"{str(lake).rstrip('/')}/{name}.lance"


def is_local(lake: str) -> bool:
    return "://" not in str(lake) or str(lake).startswith("file://")


def open_table(lake: str, name: str, storage_options: dict[str, str] | None = None):
    """The table as a ``lance.LanceDataset``, or None when it does not exist yet."""
    import lance

    uri = table_uri(lake, name)
    if is_local(lake) and not os.path.isdir(uri.removeprefix("file://")):
        return None
    try:
        return lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError) as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise


def list_tables(lake: str) -> list[str]:
    """Names of the Lance tables in a local lake folder."""
    if not is_local(lake) or not os.path.isdir(lake):
        return []
    return sorted(n[: -len(".lance")] for n in os.listdir(lake) if n.endswith(".lance"))


def ensure_table(lake: str, name: str, schema: pa.Schema, *, new_table: bool = False,
                 storage_options: dict[str, str] | None = None, data_storage_version: str | None = None):
    """Open table ``name``, creating it empty with ``schema`` if missing.

    ``data_storage_version`` (e.g. "2.1") is the Lance file format of a new table; later fragments
    (``write_fragments``) use the table's own. None: Lance's default.

    An existing table made with a different config fingerprint is refused with
    a message naming both fingerprints; ``new_table=True`` replaces it with an
    empty new version (older versions stay readable through Lance's history).
    """
    import lance

    ds = open_table(lake, name, storage_options)
    want = read_provenance(schema)
    if ds is not None:
        have = read_provenance(ds.schema)
        if have["fingerprint"] == want["fingerprint"] and have["schema_version"] == want["schema_version"]:
            return ds
        if not new_table:
            ids = {k for k in set(have["model_ids"]) | set(want["model_ids"])
                   if have["model_ids"].get(k) != want["model_ids"].get(k)}
            models = "; models differ: " + ", ".join(
                f"{k} {have['model_ids'].get(k)!r} -> {want['model_ids'].get(k)!r}" for k in sorted(ids)) if ids else ""
            raise UserError(
                f"table {table_uri(lake, name)} was made with config fingerprint {have['fingerprint']!r} "
                f"(schema v{have['schema_version']}), but this job's fingerprint is {want['fingerprint']!r} "
                f"(schema v{want['schema_version']}){models}. Use the same config, another `lake`, or pass `new_table` "
                f"to start a new version of the table."
            )
        log.warning("replacing %s (fingerprint %s -> %s)", name, have["fingerprint"], want["fingerprint"])
        return lance.write_dataset(schema.empty_table(), table_uri(lake, name), mode="overwrite",
                                   storage_options=storage_options, data_storage_version=data_storage_version)
    return lance.write_dataset(schema.empty_table(), table_uri(lake, name), mode="create",
                               storage_options=storage_options, data_storage_version=data_storage_version)


def write_fragments(lake: str, name: str, table: pa.Table, schema: pa.Schema,
                    storage_options: dict[str, str] | None = None) -> list[str]:
    """Write ``table`` as uncommitted fragment files of ``name``; returns their metadata as JSON strings."""
    from lance.fragment import write_fragments as _write

    if table.num_rows == 0:
        return []
    frags = _write(table.cast(schema), table_uri(lake, name), schema=schema,
                   max_rows_per_file=max(table.num_rows, 1), storage_options=storage_options)
    return [json.dumps(f.to_json()) for f in frags]


def commit_fragments(lake: str, name: str, fragments: Iterable[str],
                     storage_options: dict[str, str] | None = None) -> int:
    """Atomically append fragments (JSON from ``write_fragments``) to ``name``; returns the new version."""
    import lance
    from lance.fragment import FragmentMetadata

    frags = [FragmentMetadata.from_json(f) for f in fragments]
    ds = open_table(lake, name, storage_options)
    if ds is None:
        raise FileNotFoundError(f"{table_uri(lake, name)} does not exist; create it with ensure_table first")
    if not frags:
        return ds.version
    # Appends never conflict in Lance, so the current version is a valid read version.
    ds = lance.LanceDataset.commit(table_uri(lake, name), lance.LanceOperation.Append(frags),
                                   read_version=ds.version, storage_options=storage_options)
    return ds.version


def append_rows(lake: str, name: str, table: pa.Table, schema: pa.Schema,
                storage_options: dict[str, str] | None = None) -> None:
    """Append a small Arrow table to ``name`` (created on first use) in one commit."""
    import lance

    if table.num_rows == 0:
        return
    uri = table_uri(lake, name)
    mode = "append" if open_table(lake, name, storage_options) is not None else "create"
    lance.write_dataset(table.cast(schema), uri, schema=schema, mode=mode, storage_options=storage_options)


def sql_str(value: str) -> str:
    """``value`` as a quoted SQL string literal (DuckDB and Lance filters): ``sql_str("o'b")`` -> ``'o''b'``."""
    return "'" + value.replace("'", "''") + "'"


def column_values(ds: Any, column: str, filter: str | None = None) -> list[Any]:
    """All values of one (small) column, e.g. every committed ``pair_id``."""
    if ds is None:
        return []
    return ds.to_table(columns=[column], filter=filter).column(column).to_pylist()
