"""``eval_images``: every image an eval run generated, as PNG bytes.

One row per (run, prompt_id, seed, system); ``system`` is ``base`` for the
base model's image and the system's name (``img``, ...) for its final IMG
regeneration. The PNG bytes live in the table itself (``large_binary``, left
out of the SQL views) so an image is committed in the same fragment commit as
its row: no orphan files, no dangling paths, and the same lake URI works on an
object store.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("prompt_id", pa.string()),
        ("seed", pa.int64()),
        ("system", pa.string()),
        ("aligner_id", pa.string()),  # "" for base; "sha256:<16 hex>" or "fresh"
        ("rounds", pa.int32()),  # regeneration rounds behind the image (0 for base)
        ("passes", pa.int32()),  # aligner passes per round (0 for base)
        ("question", pa.string()),  # the MLLM question ("" for base)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("seconds", pa.float64()),  # generation time of this image (base: the base pass; IMG: its rounds)
        ("png", pa.large_binary()),
    ]
)
