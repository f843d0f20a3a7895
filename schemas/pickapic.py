"""Pick-a-Pic v2 input rows, exactly as the published parquet shards have them.

``SCHEMA`` is the published column set and types. The bundled shapes-world
sample adds one extra column, ``broken`` (which element the rejected image
breaks: colour, shape, count or relation), so alignment can be scored exactly;
readers must tolerate extra columns and need only ``REQUIRED``.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
    ]
)

# The extra column the shapes-world sample carries (not part of Pick-a-Pic).
SAMPLE_EXTRA = pa.schema([("broken", pa.string())])
SAMPLE_SCHEMA = pa.schema(list(SCHEMA) + list(SAMPLE_EXTRA))

# What the embed job reads; any other column is ignored.
REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "image_0_uid", "image_1_uid", "best_image_uid")
