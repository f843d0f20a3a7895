"""Read-only SQL over the lake with DuckDB (in-process).

Every Lance table in the lake becomes a view of the same name, minus its
tensor columns (DuckDB cannot read float16 and fails on *any* query over a
dataset that has one; blobs are MBs each). ``img_tables`` lists the tables with
their provenance. Only SELECT-like statements run, file access is disabled and
the configuration is locked, so nothing can be changed or written::

    img sql --lake lake "select count(*) from pairs"
    img sql --lake lake --json "select name, avg(value) from metrics group by name"
    run_query("lake", "select * from img_tables", as_json=True)
"""
from __future__ import annotations

import datetime
import decimal
import json
import logging
import re

import pyarrow as pa

from img.errors import UserError
from img.lake import tables as lake_mod
from schemas.meta import read_provenance

log = logging.getLogger(__name__)

ALLOWED = {"SELECT", "EXPLAIN"}


def _is_tensor(t: pa.DataType) -> bool:
    if pa.types.is_float16(t) or isinstance(t, pa.ExtensionType):
        return True
    if pa.types.is_large_binary(t) or pa.types.is_struct(t):
        return True  # blob columns (descriptor structs) and raw byte tensors
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return _is_tensor(t.value_type) or pa.types.is_floating(t.value_type)
    return False


def sql_columns(schema: pa.Schema) -> list[str]:
    """Columns of ``schema`` that SQL views expose (everything but tensors)."""
    return [f.name for f in schema if not _is_tensor(f.type)]


def _referenced(query: str, names: list[str]) -> list[str]:
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query.lower()))
    return [n for n in names if n.lower() in words]


def connect(lake: str, query: str, source: str | None = None):
    """A locked, read-only DuckDB connection with views for the tables ``query`` names."""
    import duckdb

    con = duckdb.connect(":memory:")
    names = lake_mod.list_tables(lake)
    catalog = []
    for name in names:
        ds = lake_mod.open_table(lake, name)
        prov = read_provenance(ds.schema)
        catalog.append({
            "name": name, "rows": ds.count_rows(), "version": ds.version,
            "schema_version": prov["schema_version"], "fingerprint": prov["fingerprint"],
            "model_ids": json.dumps(prov["model_ids"], sort_keys=True),
            "columns": ", ".join(sql_columns(ds.schema)),
        })
    con.register("img_tables", pa.Table.from_pylist(catalog, schema=pa.schema([
        ("name", pa.string()), ("rows", pa.int64()), ("version", pa.int64()), ("schema_version", pa.int64()),
        ("fingerprint", pa.string()), ("model_ids", pa.string()), ("columns", pa.string())])))
    for name in _referenced(query, names):
        ds = lake_mod.open_table(lake, name)
        con.register(name, ds.to_table(columns=sql_columns(ds.schema)))
    if source is not None:
        import pyarrow.dataset as pads

        try:
            src = pads.dataset(source, format="parquet")
        except (FileNotFoundError, pa.ArrowInvalid) as e:
            raise UserError(f"--source {source!r} is not a folder of parquet files ({e}). Pass the folder "
                            "that `img data sample --out` wrote.") from None
        con.register("source", src)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _jsonable(v):
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    return str(v)


def run_query(lake: str, query: str, as_json: bool = False, source: str | None = None) -> str:
    """Run read-only ``query`` over ``lake``; returns a rendered table or a JSON array of row objects."""
    import duckdb

    if not query.strip():
        raise UserError("the SQL query is empty. Pass a query, e.g. img sql \"select * from img_tables\".")
    if not lake_mod.is_local(lake):
        raise UserError(f"--lake {lake!r}: img sql reads local lakes only. Copy the tables or use a local path.")
    if not __import__("os").path.isdir(lake):
        raise UserError(f"--lake {lake!r} does not exist. Pass the folder given to `img jobs embed --lake`.")
    probe = duckdb.connect(":memory:")
    try:
        statements = probe.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(f"SQL does not parse: {str(e).splitlines()[0]}. Fix the query.") from None
    for st in statements:
        kind = st.type.name
        if kind not in ALLOWED:
            raise UserError(f"img sql is read-only: {kind} statements are not allowed ({st.query.strip()[:60]!r}). "
                            "Use SELECT queries only.")
    con = connect(lake, query, source)
    try:
        result = None
        for st in statements:
            result = con.sql(st.query)
        if result is None:
            return "[]" if as_json else ""
        if as_json:
            rows = result.to_arrow_table().to_pylist()
            return json.dumps(rows, default=_jsonable)
        return str(result)
    except duckdb.Error as e:
        raise UserError(f"query failed: {str(e).splitlines()[0]}. Tables: {', '.join(lake_mod.list_tables(lake)) or 'none'} "
                        "(see `select * from img_tables`).") from None
