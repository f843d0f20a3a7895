"""InstructPix2Pix input records, as the published parquet shards have them.

``timbrooks/instructpix2pix-clip-filtered`` (313,010 rows) declares the features
original_prompt, original_image, edit_prompt, edited_prompt, edited_image, the
two images being ``datasets.Image``, which parquet stores as
``struct<bytes: binary, path: string>``. Readers also accept images as plain
binary (and, in JSONL shards, base64 text). The bundled shapes-world sample adds
one column, ``edit_kind``; readers ignore extra columns.
"""
from __future__ import annotations

import json

import pyarrow as pa

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("original_prompt", pa.string()),  # caption of the input image
        ("original_image", IMAGE),
        ("edit_prompt", pa.string()),  # the instruction, e.g. "make the circle red"
        ("edited_prompt", pa.string()),  # caption of the edited image
        ("edited_image", IMAGE),
    ]
)
SAMPLE_EXTRA = pa.schema([("edit_kind", pa.string())])  # shapes-world only: colour, shape, count, add, ...
SAMPLE_SCHEMA = pa.schema(list(SCHEMA) + list(SAMPLE_EXTRA))

# What `img jobs finetune-mllm` reads: the input image, the edited caption and the instruction.
REQUIRED = ("original_image", "edited_prompt", "edit_prompt")

# The `datasets` feature description that published parquet files carry under the b"huggingface" key.
HF_FEATURES = json.dumps({"info": {"features": {
    "original_prompt": {"dtype": "string", "_type": "Value"},
    "original_image": {"_type": "Image"},
    "edit_prompt": {"dtype": "string", "_type": "Value"},
    "edited_prompt": {"dtype": "string", "_type": "Value"},
    "edited_image": {"_type": "Image"},
    "edit_kind": {"dtype": "string", "_type": "Value"},
}}})
