"""``quarantine``: one row per input row that could not be embedded, and why."""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),  # e.g. "jpg_1: truncated JPEG", "empty caption"
        ("caption", pa.string()),
    ]
)
