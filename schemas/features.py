"""``features``: the cached tensors of one pair, stored once by the embed job.

Layout follows measured read speed: the big variable-length MLLM guidance is a
``large_binary`` *blob* column, with its length beside it and no padding; the
small fixed-size IP tokens are ``FixedSizeList`` columns. Shapes and dtype live
in the schema metadata (``extra``) so a reader never guesses::

    s = schema(ip_tokens=16, ip_dim=2048)
    # winner_tokens / loser_tokens: N*D values; guidance: L*E values of `dtype`
    s = schema(ip_tokens=16, ip_dim=2048, guidance_dtype="fp8")
    # guidance: L*E float8 e4m3 bytes; guidance_scale: L float32 scales (one per token, see img/fp8.py)

The features table is written in Lance file format 2.1 (``DATA_STORAGE_VERSION``):
there a blob lives inside its fragment's data file at the ``position`` its
description gives, which lets the training loader copy it straight from a
memory map into the padded batch (see ``img/training/loader.py``).
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
BLOB = {b"lance-encoding:blob": b"true"}
DTYPES = {"float16": pa.float16(), "bfloat16": pa.float16()}  # bf16 is stored bit-cast as 2-byte words
GUIDANCE_DTYPES = ("fp16", "fp8")  # fp16: the profile's 16-bit dtype (fp16 or bf16); fp8: e4m3 + per-token scales
FP8 = "float8_e4m3fn"  # the ``guidance_dtype`` recorded in the table's metadata for fp8 guidance
DATA_STORAGE_VERSION = "2.1"  # blobs inline in the data file (2.2 moves each large blob into a file of its own)


def schema(ip_tokens: int, ip_dim: int, text_guidance: bool = False, guidance_dtype: str = "fp16") -> pa.Schema:
    """Arrow schema of the features table for N=``ip_tokens`` x D=``ip_dim`` image tokens."""
    if guidance_dtype not in GUIDANCE_DTYPES:
        raise ValueError(f"guidance_dtype {guidance_dtype!r} is not one of {GUIDANCE_DTYPES}")
    n = ip_tokens * ip_dim
    fields = [
        pa.field("pair_id", pa.string()),
        pa.field("winner_tokens", pa.list_(pa.float16(), n)),
        pa.field("loser_tokens", pa.list_(pa.float16(), n)),
        pa.field("guidance", pa.large_binary(), metadata=BLOB),
        pa.field("guidance_len", pa.int32()),
    ]
    if guidance_dtype == "fp8":
        fields.append(pa.field("guidance_scale", pa.list_(pa.float32())))
    if text_guidance:
        fields += [
            pa.field("text_guidance", pa.large_binary(), metadata=BLOB),
            pa.field("text_guidance_len", pa.int32()),
        ]
    return pa.schema(fields)
