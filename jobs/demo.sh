#!/usr/bin/env bash
# The demo `make demo` runs: sample -> embed -> train -> infer -> SQL summary, offline, tiny profile.
# Everything lands under ./demo (deleted and rebuilt each run).
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
OUT=${DEMO_DIR:-demo}
PAIRS=${DEMO_PAIRS:-2000}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/3 shapes-world sample in Pick-a-Pic v2 format ($PAIRS rows, 10% ties, 2% corrupt)"
img data sample --out "$OUT/data" --pairs "$PAIRS" --seed 0 --corrupt 0.02

step "2/3 the tiny profile resolves through from_pretrained"
img profile check tiny

step "3/3 SQL over the sample"
img sql --lake "$OUT" --source "$OUT/data" \
  "select broken, count(*) as pairs, round(avg(length(jpg_0))) as jpg_bytes from source group by broken order by broken"
