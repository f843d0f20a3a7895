"""``features``: the cached tensors of one pair, stored once by the embed job.

The big variable-length MLLM guidance is a ``large_binary`` *blob* column (read
whole with ``take_blobs`` into a reused buffer), with its length beside it and no
padding (see docs/architecture.md, "Storage layout"); the small
fixed-size IP tokens are ``FixedSizeList`` columns. Shapes and dtype live in the
schema metadata (``extra``) so a reader never guesses::

    s = schema(ip_tokens=16, ip_dim=2048)
    # winner_tokens / loser_tokens: N*D values; guidance: L*E values of `dtype`
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
BLOB = {b"lance-encoding:blob": b"true"}


def schema(ip_tokens: int, ip_dim: int, text_guidance: bool = False) -> pa.Schema:
    """Arrow schema of the features table for N=``ip_tokens`` x D=``ip_dim`` image tokens."""
    n = ip_tokens * ip_dim
    fields = [
        pa.field("pair_id", pa.string()),
        pa.field("winner_tokens", pa.list_(pa.float16(), n)),
        pa.field("loser_tokens", pa.list_(pa.float16(), n)),
        pa.field("guidance", pa.large_binary(), metadata=BLOB),
        pa.field("guidance_len", pa.int32()),
    ]
    if text_guidance:
        fields += [
            pa.field("text_guidance", pa.large_binary(), metadata=BLOB),
            pa.field("text_guidance_len", pa.int32()),
        ]
    return pa.schema(fields)
