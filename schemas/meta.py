"""Table metadata: what made a table (schema version, model ids, config fingerprint).

Stored as Arrow schema metadata under ``img.*`` keys, so any Lance or parquet
reader sees it::

    schema = with_provenance(pairs.SCHEMA, table="pairs", version=1,
                             model_ids={"mllm": "llava-hf/llava-1.5-13b-hf"},
                             fingerprint="3f2a...")
    read_provenance(schema)["fingerprint"]
"""
from __future__ import annotations

import json

import pyarrow as pa

PREFIX = "img."


def with_provenance(
    schema: pa.Schema,
    *,
    table: str,
    version: int,
    model_ids: dict[str, str] | None = None,
    fingerprint: str = "",
    extra: dict[str, object] | None = None,
) -> pa.Schema:
    """Return ``schema`` with ``img.*`` metadata describing what produced the table."""
    md = dict(schema.metadata or {})
    md.update(
        {
            f"{PREFIX}table".encode(): table.encode(),
            f"{PREFIX}schema_version".encode(): str(version).encode(),
            f"{PREFIX}model_ids".encode(): json.dumps(model_ids or {}, sort_keys=True).encode(),
            f"{PREFIX}fingerprint".encode(): fingerprint.encode(),
            f"{PREFIX}extra".encode(): json.dumps(extra or {}, sort_keys=True).encode(),
        }
    )
    return schema.with_metadata(md)


def read_provenance(schema: pa.Schema) -> dict[str, object]:
    """Inverse of ``with_provenance``; missing keys come back empty."""
    md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    return {
        "table": md.get(f"{PREFIX}table", ""),
        "schema_version": int(md.get(f"{PREFIX}schema_version", "0") or 0),
        "model_ids": json.loads(md.get(f"{PREFIX}model_ids", "{}")),
        "fingerprint": md.get(f"{PREFIX}fingerprint", ""),
        "extra": json.loads(md.get(f"{PREFIX}extra", "{}")),
    }
