"""``generations``: one row per image written by ``img infer``."""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("generation_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("profile", pa.string()),
        ("aligner_id", pa.string()),
        ("round", pa.int32()),  # 0 = initial image, r >= 1 = r-th regeneration
        ("path", pa.string()),
        ("t_base_s", pa.float64()),
        ("t_mllm_s", pa.float64()),
        ("t_aligner_s", pa.float64()),
        ("t_regen_s", pa.float64()),
    ]
)
