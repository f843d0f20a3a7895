"""``eval_runs``: the prompts an eval run sampled, so the run is reproducible from the lake alone.

One row per sampled prompt. ``run`` is a hash of everything that defines the
run (prompt set, sample, seeds, profile and models, systems, settings,
scorers), so the same command always maps to the same run. ``sample_sql`` is
the exact DuckDB query that drew the sample (parameters inlined) and ``config``
the run's full definition as JSON.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("set", pa.string()),
        ("prompt_id", pa.string()),
        ("category", pa.string()),
        ("rank", pa.int32()),  # position in the sample (0-based)
        ("sample_sql", pa.string()),
        ("config", pa.string()),  # JSON: profile, model ids, systems, settings, seeds, scorers, sampling
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
