#!/usr/bin/env bash
# `make demo`: sample -> embed -> train -> infer -> SQL summary, offline, on the tiny profile.
# Everything lands under ./demo (rebuilt on every run). Takes a few minutes on 2 CPU cores.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
OUT=${DEMO_DIR:-demo}
PAIRS=${DEMO_PAIRS:-2000}
STEPS=${DEMO_STEPS:-800}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/6 shapes-world sample in Pick-a-Pic v2 format ($PAIRS rows, 10% ties, 2% corrupt JPEGs)"
img data sample --out "$OUT/data" --pairs "$PAIRS" --seed 0 --corrupt 0.02

step "2/6 the tiny profile (real classes, encoders pre-trained on the shapes world once) loads through from_pretrained"
img profile check tiny

step "3/6 embed every decisive pair once (Ray Data -> Lance): IP tokens + MLLM guidance"
img jobs embed --dataset pickapic --source "$OUT/data" --profile tiny --lake "$OUT/lake"

step "4/6 train the Implicit Aligner on the cached tensors (DeepSpeed, CPU, $STEPS steps, the tiny profile's defaults)"
img jobs train --lake "$OUT/lake" --profile tiny --steps "$STEPS" --run-dir "$OUT/run" \
  --config jobs/demo_train.toml

step "5/6 IMG inference with the trained aligner: initial image + 2 re-aligned rounds"
img infer --profile tiny --aligner "$OUT/run/aligner" --seed 3 --rounds 2 --lake "$OUT/lake" --out "$OUT/images" \
  --prompt "a red circle to the left of two blue squares"

step "6/6 SQL over the lake (read-only DuckDB)"
img sql --lake "$OUT/lake" "select name, rows, fingerprint from img_tables order by name"
img sql --lake "$OUT/lake" "select broken, count(*) as pairs, round(avg(length(caption))) as caption_chars from pairs group by broken order by broken"
img sql --lake "$OUT/lake" "select reason, count(*) as n from quarantine group by reason order by n desc"
img sql --lake "$OUT/lake" "select name, round(value, 4) as value from metrics where name in ('heldout_pairs', 'heldout_d_identity', 'heldout_d_aligned', 'heldout_win_rate', 'heldout_d_aligned_2pass', 'heldout_d_aligned_3pass', 'heldout_win_rate_3pass', 'heldout_step_ratio') order by name"
img sql --lake "$OUT/lake" "select k.kind, round(max(value) filter (where name = 'heldout_d_identity_' || k.kind), 1) as d_identity, round(max(value) filter (where name = 'heldout_d_aligned_' || k.kind), 1) as d_aligned, round(max(value) filter (where name = 'heldout_win_rate_' || k.kind), 3) as win_rate, round(max(value) filter (where name = 'heldout_d_aligned_3pass_' || k.kind), 1) as d_aligned_3pass from (select distinct replace(name, 'heldout_pairs_', '') as kind from metrics where name like 'heldout_pairs_%') k, metrics group by k.kind order by k.kind"
img sql --lake "$OUT/lake" "select round, path, round(coalesce(t_base_s, 0) + coalesce(t_ip_s, 0) + coalesce(t_mllm_s, 0) + coalesce(t_aligner_s, 0) + coalesce(t_regen_s, 0), 2) as seconds from generations order by round"
printf '\nDone. Images: %s/images   Lake: %s/lake   Try: img sql --lake %s/lake "select * from img_tables"\n' "$OUT" "$OUT" "$OUT"
