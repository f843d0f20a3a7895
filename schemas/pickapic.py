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

# What the embed job reads, and the kind of Arrow type each must have; any other column is ignored.
READ_KINDS = {
    "caption": "string",
    "jpg_0": "binary",
    "jpg_1": "binary",
    "label_0": "float",
    "image_0_uid": "string",
    "image_1_uid": "string",
    "best_image_uid": "string",
}
REQUIRED = tuple(READ_KINDS)

# What each kind admits, as the error message names it.
KIND_TYPES = {
    "string": "string, large_string or string_view",
    "binary": "binary, large_binary or binary_view",
    "float": "a float (float16, float32 or float64)",
}


def type_fits(kind: str, t: pa.DataType) -> bool:
    """Whether Arrow type ``t`` holds values of ``kind`` ("string", "binary" or "float").

        type_fits("float", pa.float32())        # True
        type_fits("binary", pa.large_binary())  # True
    """
    if kind == "float":
        return pa.types.is_floating(t)
    if pa.types.is_dictionary(t):  # dictionary-encoded strings read back as plain values
        t = t.value_type
    if kind == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if kind == "binary":
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
    raise ValueError(f"unknown column kind {kind!r}")
