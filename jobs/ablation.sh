#!/usr/bin/env bash
# The ablation table of issue #4 (`make ablation`), offline, tiny profile, about 10 minutes on 2 cores:
#   sample -> embed once (MLLM + text guidance in one lake) -> train every row alike -> Markdown table.
#
#   bash jobs/ablation.sh [OUT]        # OUT defaults to ./ablation (deleted and rebuilt each run)
#   ABLATION_STEPS=4000 ABLATION_PAIRS=8000 ABLATION_SEED=0 bash jobs/ablation.sh out/abl
#
# Rows: guidance none / text / MLLM (full objective) and objective L_base only / +DPO / +SPIN / full
# (MLLM guidance); the "MLLM, full" run is shared by both groups. Every row uses jobs/train.toml's
# settings (the paper's: AdamW lr 1e-4, batch 8, lambda 1, k 10) with only the ablated key changed
# (jobs/train_ablation_*.toml), the same seed and the same number of steps. The table is read back
# from the lake's `metrics` table with `img sql --json`; it is also written to OUT/table.md.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-ablation}
PAIRS=${ABLATION_PAIRS:-8000}
STEPS=${ABLATION_STEPS:-4000}
SEED=${ABLATION_SEED:-0}
LAKE="$OUT/lake"

if [ -e "$OUT" ] && [ ! -f "$OUT/.ablation" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT exists and was not made by jobs/ablation.sh; pass a new folder" >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT/configs" "$OUT/runs"
touch "$OUT/.ablation"
T0=$(date +%s)
step() { printf '\n== %s\n' "$*"; }

step "sample: $PAIRS shapes-world pairs, seed 0"
img data sample --out "$OUT/data" --pairs "$PAIRS" --seed 0

step "embed once, MLLM and text guidance (jobs/embed_ablation.toml)"
img jobs embed --dataset pickapic --source "$OUT/data" --profile tiny --lake "$LAKE" --config "$HERE/embed_ablation.toml"

# row name | train TOML (the ablated key only; everything else is jobs/train.toml's default)
ROWS="mllm_full:train.toml
none_full:train_ablation_noguidance.toml
text_full:train_ablation_textguidance.toml
mllm_base:train_ablation_lam0.toml
mllm_dpo:train_ablation_dpo.toml
mllm_spin:train_ablation_spin.toml"

for spec in $ROWS; do
  name=${spec%%:*}
  src="$HERE/${spec#*:}"
  cfg="$OUT/configs/$name.toml"
  { grep -v '^seed *=' "$src"; echo "seed = $SEED   # jobs/ablation.sh"; } > "$cfg"
  step "train $name: $STEPS steps, seed $SEED ($src)"
  img jobs train --lake "$LAKE" --profile tiny --steps "$STEPS" --run-dir "$OUT/runs/$name" \
    --config "$cfg" --checkpoint-every "$STEPS"
done

step "table (img sql over $LAKE/metrics)"
img sql --lake "$LAKE" --json \
  "select run_id, name, value from metrics where name like 'heldout_%' order by run_id, name" > "$OUT/metrics.json"
SECONDS_TAKEN=$(( $(date +%s) - T0 ))
python - "$OUT" "$STEPS" "$SEED" "$PAIRS" "$SECONDS_TAKEN" <<'PY' | tee "$OUT/table.md"
import json, pathlib, sys

out, steps, seed, pairs, secs = pathlib.Path(sys.argv[1]), *sys.argv[2:]
metrics = {}
for r in json.loads((out / "metrics.json").read_text()):
    metrics.setdefault(r["run_id"], {})[r["name"]] = r["value"]
rows = [("guidance", "none", "full", "none_full"), ("guidance", "text", "full", "text_full"),
        ("guidance", "MLLM", "full", "mllm_full"), ("objective", "MLLM", "L_base only (lambda 0)", "mllm_base"),
        ("objective", "MLLM", "+ DPO", "mllm_dpo"), ("objective", "MLLM", "+ SPIN", "mllm_spin"),
        ("objective", "MLLM", "full (L_base + DPO + SPIN)", "mllm_full")]
print("| ablation | guidance | objective | d_aligned (3 passes) | d_aligned (1 pass) | d_identity "
      "| 3 passes / identity | 1 pass / identity | win rate (3 passes) |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
n = 0
for group, guidance, objective, name in rows:
    run_id = json.loads((out / "runs" / name / "run.json").read_text())["run_id"]
    m = metrics[run_id]
    a, a1, i = m["heldout_d_aligned"], m["heldout_d_aligned_1pass"], m["heldout_d_identity"]
    n = int(m["heldout_pairs"])
    print(f"| {group} | {guidance} | {objective} | {a:.5f} | {a1:.5f} | {i:.5f} | {a / i:.3f} | {a1 / i:.3f} "
          f"| {m['heldout_win_rate']:.3f} |")
print(f"\n{n} held-out pairs, {steps} steps, seed {seed}, {pairs} sample pairs; wall time {int(secs) // 60} min "
      f"{int(secs) % 60} s. d = per-sample mean squared error to the winner's tokens; win rate = share of held-out "
      "pairs with d(w, aligned) < d(w, l). Per-broken-kind win rates: not available (the trainer reports "
      "aggregates only).")
PY
