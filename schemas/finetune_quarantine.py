"""``finetune_quarantine``: input records `img jobs finetune-mllm` could not train on, and why.

The columns of the embed job's ``quarantine`` table (``pair_id`` holds the record id
``<shard file name>#<row>``, ``caption`` the edited caption) plus ``run_id``: a
fine-tuning run reads a data folder, not the lake's pairs, so its rows must not
enter the embed job's done-set and are kept per run.
"""
from __future__ import annotations

import pyarrow as pa

from schemas import quarantine

VERSION = 1
SCHEMA = pa.schema(list(quarantine.SCHEMA) + [pa.field("run_id", pa.string())])
