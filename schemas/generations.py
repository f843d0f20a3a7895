"""``generations``: one row per image written by ``img infer``.

Round 0 is the base model's image; round r >= 1 is the r-th regeneration, made
from the image of round r - 1. The stage times of a row are those that made its
image: round 0 has only ``t_base_s``; a round r row has ``t_ip_s``, ``t_mllm_s``,
``t_aligner_s`` (analysis and alignment of the previous image) and ``t_regen_s``.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 2  # v2: prompt_idx, question, settings, t_ip_s, model_ids, run_id, created_at
SCHEMA = pa.schema(
    [
        ("generation_id", pa.string()),  # "<run_id>-<prompt_idx>-r<round>"
        ("run_id", pa.string()),  # one per `img infer` invocation
        ("prompt_idx", pa.int32()),  # position of the prompt in the input
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("profile", pa.string()),
        ("aligner_id", pa.string()),  # "sha256:<16 hex>" of the aligner weights, or "fresh"
        ("round", pa.int32()),  # 0 = initial image, r >= 1 = r-th regeneration
        ("path", pa.string()),  # absolute path of the PNG
        ("question", pa.string()),  # MLLM question (empty for round 0)
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("ip_scale", pa.float64()),  # IP-Adapter scale of the regeneration (round 0 is made without IP-Adapter)
        ("passes", pa.int32()),  # aligner passes
        ("negative_prompt", pa.string()),
        ("t_base_s", pa.float64()),
        ("t_ip_s", pa.float64()),
        ("t_mllm_s", pa.float64()),
        ("t_aligner_s", pa.float64()),
        ("t_regen_s", pa.float64()),
        ("model_ids", pa.string()),  # JSON {component: model id} of the profile
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
