"""``pairs``: one row per decisive preference pair, oriented (winner, loser).

``pair_id`` is ``"<shard file name>#<row index>"``: deterministic from the
input, so a resumed job can skip what is already written.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("caption", pa.string()),
        ("question", pa.string()),  # the paraphrased MLLM question actually asked
        ("winner_uid", pa.string()),
        ("loser_uid", pa.string()),
        ("source", pa.string()),  # shard path the row came from
        ("row", pa.int64()),  # row index inside that shard
        ("broken", pa.string()),  # shapes-world only: which element the loser breaks; null otherwise
    ]
)
