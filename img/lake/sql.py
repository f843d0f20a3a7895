"""Read-only SQL over the lake with DuckDB (in-process).

Every Lance table in the lake becomes a view of the same name, minus its
tensor columns (DuckDB cannot read float16 and fails on *any* query over a
dataset that has one; blobs are MBs each). ``img_tables`` lists the tables with
their provenance and a ``status`` (``ok``, or ``broken: <why>`` for a
``*.lance`` entry that is not a readable Lance dataset; it is skipped with a
warning). Nothing can be changed, created, read from or written to a file::

    img sql --lake lake "select count(*) from pairs"
    img sql --lake lake --json "select name, avg(value) from metrics group by name"
    run_query("lake", "select * from img_tables", as_json=True)

How it is sealed (``check_statements`` and ``connect``):

* Statements are split and typed by DuckDB's own parser. Only ``SELECT``
  (which covers ``WITH``, ``VALUES``, ``TABLE``, ``FROM x``, ``DESCRIBE``,
  ``SHOW``, ``SUMMARIZE``, static ``PIVOT``/``UNPIVOT``) and ``EXPLAIN`` of a
  ``SELECT`` run. ``EXPLAIN ANALYZE`` executes its statement, so it is refused.
  Everything else (COPY, EXPORT/IMPORT, ATTACH/DETACH, INSTALL/LOAD, CREATE,
  INSERT/UPDATE/DELETE/MERGE, ALTER, DROP, SET/RESET/USE, PRAGMA, CALL,
  CHECKPOINT, VACUUM, PREPARE/EXECUTE, transactions, a dynamic PIVOT, which
  creates a type) is refused before any table is opened.
* The connection is in memory, its temp directory is unset (DuckDB's default,
  ``<cwd>/.tmp``, stays reachable even with external access off), extension
  auto-install/auto-load and persistent secrets are off, the memory limit is
  set, DuckDB's local file system is disabled, external access is disabled,
  and then the configuration is locked. Views are Arrow tables registered from
  Python, so table functions such as ``read_csv``, ``read_text``, ``glob`` or a
  ``FROM 'file.csv'`` replacement scan have no file system to reach.
"""
from __future__ import annotations

import datetime
import decimal
import json
import logging
import os
import re

import pyarrow as pa

from img.errors import UserError
from img.lake import tables as lake_mod
from schemas.meta import read_provenance

log = logging.getLogger(__name__)

ALLOWED = {"SELECT", "EXPLAIN"}
DEFAULT_MEMORY_LIMIT = "2GB"
_MEMORY = re.compile(r"^[0-9]+(\.[0-9]+)?\s*([KMGT]i?B|B)$", re.IGNORECASE)
_CATALOG_SCHEMA = pa.schema([
    ("name", pa.string()), ("rows", pa.int64()), ("version", pa.int64()), ("schema_version", pa.int64()),
    ("fingerprint", pa.string()), ("model_ids", pa.string()), ("columns", pa.string()), ("status", pa.string())])


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


# ----------------------------------------------------------------------------- statement check
def _refuse(kind: str, text: str, why: str = "") -> UserError:
    return UserError(f"img sql is read-only: {kind} statements are not allowed ({text.strip()[:60]!r}){why}. "
                     "Use SELECT queries only.")


def _parse(query: str) -> list:
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        return con.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(f"SQL does not parse: {str(e).splitlines()[0]}. Fix the query.") from None
    finally:
        con.close()


def _explained(text: str) -> str:
    """The statement an ``EXPLAIN`` wraps; ``UserError`` for ``EXPLAIN ANALYZE`` (it runs the statement)."""
    import duckdb

    toks = [(off, kind) for off, kind in duckdb.tokenize(text) if kind.name != "comment"]
    ends = [off for off, _ in toks[1:]] + [len(text)]
    words = [text[off:end].strip().upper() for (off, _), end in zip(toks, ends)]
    i = 1  # words[0] is EXPLAIN
    options: list[str] = []
    if i < len(words) and words[i] == "(":  # EXPLAIN (FORMAT json, ANALYZE) stmt, or EXPLAIN (SELECT ...)
        depth = 0
        while i < len(words):
            depth += words[i] == "("
            depth -= words[i] == ")"
            options.append(words[i])
            i += 1
            if depth == 0:
                break
        if i >= len(words):  # nothing after the parentheses: they were the statement
            i, options = 1, []
    elif i < len(words) and words[i] in ("ANALYZE", "ANALYSE"):
        options.append(words[i])
    if any(w.strip("(),") in ("ANALYZE", "ANALYSE") for w in options):
        raise UserError(f"img sql is read-only: EXPLAIN ANALYZE runs its statement ({text.strip()[:60]!r}). "
                        "Use EXPLAIN without ANALYZE, or run the SELECT itself.")
    if i >= len(toks):
        raise UserError(f"SQL does not parse: EXPLAIN of nothing ({text.strip()[:60]!r}). Fix the query.")
    return text[toks[i][0]:]


def _kind(statement) -> str:
    try:
        return statement.type.name
    except ValueError:  # a type this duckdb module has no name for (UPDATE EXTENSIONS is 29)
        return "UNKNOWN"


def check_statements(query: str) -> list:
    """DuckDB's statements of ``query`` if every one is read-only; else ``UserError`` naming the first that is not."""
    statements = _parse(query)
    for st in statements:
        kind = _kind(st)
        if kind == "MULTI":  # PIVOT without an IN list first creates an ENUM type
            raise _refuse(kind, st.query, " (a PIVOT without IN creates a type: list the values, "
                          "PIVOT t ON col IN ('a', 'b'))")
        if kind not in ALLOWED:
            raise _refuse(kind, st.query)
        if kind == "EXPLAIN":
            inner = _parse(_explained(st.query))
            if len(inner) != 1 or _kind(inner[0]) != "SELECT":
                raise _refuse(f"EXPLAIN {_kind(inner[0]) if inner else ''}".strip(), st.query)
    return statements


# ----------------------------------------------------------------------------- connection
def _open_tables(lake: str) -> tuple[dict, list[dict]]:
    """{name: dataset} of readable tables and the ``img_tables`` rows (broken entries included, with a warning)."""
    tables, catalog = {}, []
    for name in lake_mod.list_tables(lake):
        try:
            ds = lake_mod.open_table(lake, name)
            if ds is None:
                raise ValueError("not a Lance dataset")
            prov = read_provenance(ds.schema)
            row = {"name": name, "rows": ds.count_rows(), "version": ds.version,
                   "schema_version": prov["schema_version"], "fingerprint": prov["fingerprint"],
                   "model_ids": json.dumps(prov["model_ids"], sort_keys=True),
                   "columns": ", ".join(sql_columns(ds.schema)), "status": "ok"}
        except Exception as e:  # noqa: BLE001 - any failure to read a stray entry makes it "broken", not fatal
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.warning("skipping %s: %s (listed as broken in img_tables)", lake_mod.table_uri(lake, name), why)
            catalog.append({"name": name, "status": f"broken: {why}"})
            continue
        tables[name] = ds
        catalog.append(row)
    return tables, catalog


def _source_dataset(source: str):
    import pyarrow.dataset as pads

    fix = "Pass the folder that `img data sample --out` wrote."
    if not os.path.exists(source):
        raise UserError(f"`source` {source!r} does not exist. {fix}")
    try:
        src = pads.dataset(source, format="parquet")
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"`source` {source!r} is not a folder of parquet files ({str(e).splitlines()[0]}). "
                        f"{fix}") from None
    if not src.files:
        raise UserError(f"`source` {source!r} holds no parquet files. {fix}")
    return src


def connect(lake: str, query: str, source: str | None = None, memory_limit: str = DEFAULT_MEMORY_LIMIT):
    """A sealed DuckDB connection (see the module docstring) with views for the tables ``query`` names."""
    import duckdb

    if not _MEMORY.match(memory_limit):
        raise UserError(f"memory_limit {memory_limit!r} is not a memory size such as '2GB'.")
    src = _source_dataset(source) if source is not None else None
    # Set together at start-up, before anything else: no temp directory, no extension downloads or
    # auto-loading, no persistent secrets (DuckDB would read ~/.duckdb/stored_secrets).
    con = duckdb.connect(":memory:", config={
        "temp_directory": "", "autoinstall_known_extensions": False, "autoload_known_extensions": False,
        "allow_community_extensions": False, "allow_unsigned_extensions": False,
        "allow_persistent_secrets": False})
    con.execute(f"SET memory_limit = '{memory_limit}'")
    tables, catalog = _open_tables(lake)
    broken = {r["name"]: r["status"] for r in catalog if r["status"] != "ok"}
    for name in _referenced(query, list(broken)):
        con.close()
        raise UserError(f"table {name!r} in {lake!r} cannot be read ({broken[name]}). Query another table, or "
                        f"move {lake_mod.table_uri(lake, name)} out of the lake.")
    con.register("img_tables", pa.Table.from_pylist(catalog, schema=_CATALOG_SCHEMA))
    for name in _referenced(query, list(tables)):
        ds = tables[name]
        con.register(name, ds.to_table(columns=sql_columns(ds.schema)))
    if src is not None:
        con.register("source", src)
    # Registered Arrow objects are read by Arrow, not by DuckDB's file system, so it can go entirely.
    con.execute("SET disabled_filesystems = 'LocalFileSystem'")
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


def run_query(lake: str, query: str, as_json: bool = False, source: str | None = None,
              memory_limit: str = DEFAULT_MEMORY_LIMIT) -> str:
    """Run read-only ``query`` over ``lake``; returns a rendered table or a JSON array of row objects."""
    import duckdb

    if not query.strip():
        raise UserError("the SQL query is empty. Pass a query, e.g. img sql \"select * from img_tables\".")
    statements = check_statements(query)  # refused whatever the lake, before anything is opened
    if not lake_mod.is_local(lake):
        raise UserError(f"`lake` {lake!r}: img sql reads local lakes only. Copy the tables or use a local path.")
    if os.path.exists(lake) and not os.path.isdir(lake):
        raise UserError(f"`lake` {lake!r} is a file, not a lake folder. Pass the folder given to `img jobs embed --lake`.")
    if not os.path.isdir(lake):
        raise UserError(f"`lake` {lake!r} does not exist. Pass the folder given to `img jobs embed --lake`.")
    if not _MEMORY.match(memory_limit):
        raise UserError(f"`memory_limit` {memory_limit!r} is not a memory size. Pass e.g. 2GB.")
    con = connect(lake, query, source, memory_limit)
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
    finally:
        con.close()
