"""Which prompts an eval run uses: a DuckDB query over the prompt set, reproducible from a seed.

    s = sample_prompts(prompt_set.table, n=6, seed=0)                       # stratified by category
    s = sample_prompts(prompt_set.table, n=6, seed=0, where="category = 'spatial'")
    s = sample_prompts(prompt_set.table, seed=0, sample_sql=Path("my_sample.sql").read_text())
    s.prompt_ids, s.categories, s.sql                                       # s.sql: the query as it ran

The query sees one view, ``prompts`` (set, prompt_id, prompt, category), holding
the chosen set. ``$seed``, ``$n`` and ``$set`` in the query are replaced by the
values before it runs, so ``s.sql`` (stored in ``eval_runs.sample_sql``) is
exactly what ran, and it draws the same sample from the lake's ``prompts``
table through ``img sql``. The default query (``DEFAULT_SAMPLE_SQL``) is a proportional
stratified sample: inside each category the prompts are put in a random order
by ``md5(prompt_id || ':' || seed)``; a prompt at position k of a category of
size m gets the key (k - 0.5) / m, and the n smallest keys win. Every category
so gets round(n * m / total) prompts, give or take one, and the order is fixed by
the seed alone (md5 is the same on every machine and DuckDB version, unlike
``hash()``). The connection cannot read files or change its settings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from img.errors import UserError
from img.lake.tables import sql_str

DEFAULT_SAMPLE_SQL = """\
SELECT prompt_id, category
FROM (
    SELECT prompt_id, category,
           row_number() OVER (PARTITION BY category ORDER BY md5(prompt_id || ':' || $seed)) AS k,
           count(*) OVER (PARTITION BY category) AS m
    FROM prompts
    WHERE set = $set AND {where}
)
ORDER BY (k - 0.5) / m, md5(category || ':' || $seed), prompt_id
LIMIT $n"""

_PARAM = re.compile(r"\$(seed|n|set)\b")


@dataclass(frozen=True)
class Sample:
    """The sampled prompts, in sample order, and the query that drew them."""

    prompt_ids: list[str]
    categories: list[str]
    sql: str


def _inline(sql: str, seed: int, n: Optional[int], set_name: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) == "seed":
            return f"'{int(seed)}'"
        if m.group(1) == "set":
            return sql_str(set_name)
        if n is None:
            raise UserError("the sample query uses $n but no `n` was given. Pass `n`.")
        return str(int(n))

    return _PARAM.sub(sub, sql)


def sample_query(n: Optional[int], seed: int, where: Optional[str] = None, sample_sql: Optional[str] = None,
                 set_name: str = "") -> str:
    """The query that will run, with ``$seed`` / ``$n`` / ``$set`` inlined."""
    if where is not None and sample_sql is not None:
        raise UserError("pass `where` or `sample_sql`, not both (`where` edits the default query, "
                        "`sample_sql` replaces it).")
    if sample_sql is None:
        if n is None:
            raise UserError("pass `n` (how many prompts to sample), or `sample_sql` (a file with the query).")
        if where is not None and not where.strip():
            raise UserError("`where` is empty. Pass an SQL predicate over prompts, "
                            "e.g. \"category = 'spatial'\".")
        return _inline(DEFAULT_SAMPLE_SQL.format(where=f"({where})" if where else "TRUE"), seed, n, set_name)
    if not sample_sql.strip():
        raise UserError("the `sample_sql` file is empty. Put one SELECT over `prompts` in it.")
    if n is not None and not re.search(r"\$n\b", sample_sql):
        raise UserError(f"`n` {n} was given but the `sample_sql` query does not use $n. Use $n in it "
                        "(e.g. LIMIT $n) or leave `n` out.")
    return _inline(sample_sql, seed, n, set_name)


def sample_prompts(prompts: pa.Table, n: Optional[int] = None, seed: int = 0, where: Optional[str] = None,
                   sample_sql: Optional[str] = None) -> Sample:
    """Run the sample query over ``prompts`` (one set, ``schemas.prompts.SCHEMA``); see the module docstring."""
    import duckdb

    if n is not None and (isinstance(n, bool) or n < 1):
        raise UserError(f"`n` must be >= 1, got {n}. Pass the number of prompts to evaluate.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"`seed` must be an integer >= 0, got {seed!r}.")
    sets = set(prompts.column("set").to_pylist())
    if len(sets) != 1:
        raise ValueError(f"sample_prompts takes the prompts of one set, got {sorted(sets)}")
    sql = sample_query(n, seed, where, sample_sql, sets.pop())
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 1")
        con.register("prompts", prompts)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as e:
            raise UserError(f"the sample query does not parse: {str(e).splitlines()[0]}. Fix it.") from None
        if len(statements) != 1 or statements[0].type.name != "SELECT":
            raise UserError("the sample query must be exactly one SELECT statement over `prompts`.")
        try:
            result = con.sql(sql).to_arrow_table()
        except duckdb.Error as e:
            raise UserError(f"the sample query failed: {str(e).splitlines()[0]}. Columns of prompts: set, prompt_id, "
                            "prompt, category.") from None
    finally:
        con.close()
    if "prompt_id" not in result.column_names:
        raise UserError(f"the sample query must return a prompt_id column; it returned "
                        f"{', '.join(result.column_names)}.")
    ids = [str(x) for x in result.column("prompt_id").to_pylist()]
    known = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("category").to_pylist()))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UserError(f"the sample query returned prompt_id {unknown[0]!r}, which is not in the prompt set.")
    if len(set(ids)) != len(ids):
        raise UserError("the sample query returned a prompt_id twice. Use SELECT DISTINCT or fix the query.")
    if not ids:
        raise UserError("the sample query selected no prompt. Loosen `where`, or check the `sample_sql` query.")
    if n is not None and sample_sql is None and len(ids) < n:
        raise UserError(f"`n` {n} but only {len(ids)} prompt(s) of the set match{' `where`' if where else ''}. "
                        f"Lower `n` to at most {len(ids)}.")
    return Sample(prompt_ids=ids, categories=[known[i] for i in ids], sql=sql)
