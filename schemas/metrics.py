"""``metrics``: training scalars, one (run_id, step, name, value) row each."""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("name", pa.string()),  # loss, loss_base, loss_pref, ref_copy, samples_per_s, heldout_*
        ("value", pa.float64()),
    ]
)
