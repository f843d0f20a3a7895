"""``prompts``: every prompt of every loaded prompt set, one row each.

``set`` names the prompt set (``hpdv2``, ``parti``, ``t2i-compbench``,
``pickapic-test``, or a plain file's name); ``prompt_id`` is stable within a set
and follows the published order (HPDv2: ``<style>/<index:05d>``, the index its
benchmark images are named by; T2I-CompBench: ``<category>/<line:05d>``; others:
``<row:05d>``). ``category`` is "" when the format has none. A set is immutable
once loaded: loading other prompts under the same name is refused.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 1
SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("category", pa.string()),
    ]
)
