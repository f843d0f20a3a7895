"""``win_rates``: each IMG system against the base model, per run, scorer and category.

Derived from ``scores`` (and ``eval_runs`` for categories) by
``img.eval.winrates.WIN_RATES_SQL`` and rewritten in one commit when it
changes. Per prompt, a system's score is its mean over seeds; it wins when it
is above the base's mean, ties when equal. ``category = '(all)'`` is the
overall row; per-category rows exist for non-empty categories.
``win_rate = (wins + ties / 2) / n``, with a 95 % Wilson score interval over
prompts. ``mean_system`` / ``mean_base`` are the mean scores (the paper's Pick
Score selection criterion).
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
OVERALL = "(all)"
SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("system", pa.string()),
        ("scorer", pa.string()),
        ("scorer_version", pa.string()),
        ("category", pa.string()),
        ("n", pa.int64()),  # prompts compared
        ("wins", pa.int64()),
        ("ties", pa.int64()),
        ("losses", pa.int64()),
        ("win_rate", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("mean_system", pa.float64()),
        ("mean_base", pa.float64()),
    ]
)
