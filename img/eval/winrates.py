"""Win rates of each IMG system against the base model, with 95 % Wilson intervals, by DuckDB.

    rows = compute_win_rates(scores_table, eval_runs_table)      # pyarrow Table, schemas.win_rates.SCHEMA
    print(render(rows.to_pylist()))
    changed = write_win_rates("lake")                           # recompute from the lake; one commit if changed

Per prompt, a system's score is its mean over the run's seeds, compared with
the base model's mean for the same prompt, scorer and scorer version (so HPS
v2.0 and v2.1, or PickScore and HPS, are never mixed). A win is a higher
score, a tie an equal one; ``win_rate = (wins + ties / 2) / n`` over prompts.
The interval is the Wilson score interval at 95 % (z = 1.959964) for that
proportion with n prompts: it stays inside [0, 1] and behaves at n = 6, where
the normal approximation does not; prompts are the independent units (seeds
are averaged first). ``category = '(all)'`` rows pool every category; prompts
without a category ("") appear in those only.
"""
from __future__ import annotations

import math

import pyarrow as pa

from img.lake import tables as lake_mod
from schemas import win_rates as win_rates_schema
from schemas.meta import with_provenance

Z95 = 1.959963984540054

WIN_RATES_SQL = f"""\
WITH per_prompt AS (
    SELECT run, prompt_id, system, scorer, scorer_version, avg(score) AS score
    FROM scores
    GROUP BY run, prompt_id, system, scorer, scorer_version
),
paired AS (
    SELECT i.run, i.system, i.scorer, i.scorer_version, coalesce(r.category, '') AS category,
           i.score AS s, b.score AS b
    FROM per_prompt i
    JOIN per_prompt b
      ON b.run = i.run AND b.prompt_id = i.prompt_id AND b.scorer = i.scorer
     AND b.scorer_version = i.scorer_version AND b.system = 'base'
    LEFT JOIN (SELECT DISTINCT run, prompt_id, category FROM eval_runs) r
      ON r.run = i.run AND r.prompt_id = i.prompt_id
    WHERE i.system <> 'base'
),
counted AS (
    SELECT run, system, scorer, scorer_version,
           CASE WHEN grouping(category) = 1 THEN '{win_rates_schema.OVERALL}' ELSE category END AS category,
           count(*) AS n,
           count(*) FILTER (WHERE s > b) AS wins,
           count(*) FILTER (WHERE s = b) AS ties,
           count(*) FILTER (WHERE s < b) AS losses,
           avg(s) AS mean_system,
           avg(b) AS mean_base
    FROM paired
    GROUP BY GROUPING SETS ((run, system, scorer, scorer_version),
                            (run, system, scorer, scorer_version, category))
    HAVING grouping(category) = 1 OR category <> ''
),
rated AS (
    SELECT *, (wins + ties / 2.0) / n AS p, {Z95} ^ 2 / n AS zn FROM counted
)
SELECT run, system, scorer, scorer_version, category, n, wins, ties, losses,
       p AS win_rate,
       CASE WHEN p = 0 THEN 0.0
            ELSE (p + zn / 2 - {Z95} * sqrt(p * (1 - p) / n + zn / (4 * n))) / (1 + zn) END AS ci_low,
       CASE WHEN p = 1 THEN 1.0
            ELSE (p + zn / 2 + {Z95} * sqrt(p * (1 - p) / n + zn / (4 * n))) / (1 + zn) END AS ci_high,
       mean_system, mean_base
FROM rated
ORDER BY run, system, scorer, scorer_version, category = '{win_rates_schema.OVERALL}' DESC, category"""


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (the same formula as ``WIN_RATES_SQL``)."""
    p = successes / n
    zn = z * z / n
    half = z * math.sqrt(p * (1 - p) / n + zn / (4 * n))
    return (p + zn / 2 - half) / (1 + zn), (p + zn / 2 + half) / (1 + zn)


def compute_win_rates(scores: pa.Table, eval_runs: pa.Table) -> pa.Table:
    """``WIN_RATES_SQL`` over the given ``scores`` and ``eval_runs`` rows (single-threaded, so reruns are bit-equal)."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 1")
        con.register("scores", scores)
        con.register("eval_runs", eval_runs)
        con.execute("SET enable_external_access = false")
        result = con.sql(WIN_RATES_SQL).to_arrow_table()
    finally:
        con.close()
    return result.cast(win_rates_schema.SCHEMA)


def win_rates_table_schema() -> pa.Schema:
    return with_provenance(win_rates_schema.SCHEMA, table="win_rates", version=win_rates_schema.VERSION)


def write_win_rates(lake: str, storage_options: dict | None = None) -> bool:
    """Recompute ``win_rates`` from the lake's ``scores`` and ``eval_runs``; rewrite it in one commit if it
    changed. Returns True when a new version was written."""
    import lance

    scores_ds = lake_mod.open_table(lake, "scores", storage_options)
    runs_ds = lake_mod.open_table(lake, "eval_runs", storage_options)
    if scores_ds is None or runs_ds is None:
        return False
    new = compute_win_rates(scores_ds.to_table(), runs_ds.to_table(columns=["run", "prompt_id", "category"]))
    schema = win_rates_table_schema()
    old = lake_mod.open_table(lake, "win_rates", storage_options)
    if old is not None and old.to_table().to_pylist() == new.to_pylist():
        return False
    lance.write_dataset(new.cast(schema), lake_mod.table_uri(lake, "win_rates"), schema=schema,
                        mode="overwrite" if old is not None else "create", storage_options=storage_options)
    return True


def read_win_rates(lake: str, run: str | None = None, storage_options: dict | None = None) -> list[dict]:
    """Rows of ``win_rates`` (of one ``run`` when given), in table order."""
    ds = lake_mod.open_table(lake, "win_rates", storage_options)
    if ds is None:
        return []
    rows = ds.to_table().to_pylist()
    return [r for r in rows if run is None or r["run"] == run]


def render(rows: list[dict]) -> str:
    """A plain-text table: win rate with its interval, wins/ties/losses, and mean scores."""
    if not rows:
        return "no win rates (no scores yet)"
    head = ("system", "scorer", "category", "n", "win rate [95% CI]", "W/T/L", "mean IMG", "mean base")
    body = []
    for r in rows:
        body.append((r["system"], f"{r['scorer']} {r['scorer_version']}", r["category"] or '""', str(r["n"]),
                     f"{100 * r['win_rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]",
                     f"{r['wins']}/{r['ties']}/{r['losses']}", f"{r['mean_system']:.4f}", f"{r['mean_base']:.4f}"))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(line.rstrip() for line in lines)
