"""``scores``: one preference score per (run, prompt_id, system, seed, scorer).

``scorer`` is ``pickscore`` or ``hpsv2``; ``scorer_version`` tells weights
apart (``v1``; ``v2.0`` / ``v2.1``; ``tiny-<hash>``) and win rates never mix
versions. A unit (run, prompt_id, seed) has all its scores committed at once,
which is the eval job's commit marker.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("prompt_id", pa.string()),
        ("system", pa.string()),  # "base" or an IMG system's name
        ("seed", pa.int64()),
        ("scorer", pa.string()),
        ("scorer_version", pa.string()),
        ("score", pa.float64()),
    ]
)
