#!/usr/bin/env bash
# The ablation table (`make ablation`, docs/ablation.md), offline, tiny profile, ~15-25 min on 2 shared cores:
#   sample -> embed once (MLLM + text guidance in one lake) -> train every row alike -> Markdown table.
#
#   bash jobs/ablation.sh [OUT]        # OUT defaults to ./ablation (deleted and rebuilt each run)
#   ABLATION_STEPS=600 ABLATION_PAIRS=2000 ABLATION_SEEDS="0 1" bash jobs/ablation.sh out/abl   # the defaults
#
# Rows follow the paper's Table 5: (a) guidance, (b) lambda, (c) loss components, with d the paper's squared
# L2 norm ("sum"), and (c) again with the per-element mean ("mean"). "No Guidance" is the paper's row: the
# initial features unchanged, i.e. heldout_d_identity (no training). "Aligner trained without guidance" is a
# separate, trained row. Every run uses the tiny profile's defaults (jobs/train_tiny.toml on top of the paper's
# recipe) with only the ablated keys changed (jobs/train_ablation_*.toml), the same seeds and steps.
# The table is read back from the lake's `metrics` table with `img sql --json` and written to OUT/table.md.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-ablation}
PAIRS=${ABLATION_PAIRS:-2000}
STEPS=${ABLATION_STEPS:-600}
SEEDS=${ABLATION_SEEDS:-0 1}
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

# row name | ablation TOMLs, joined (empty: the tiny profile's defaults: MLLM guidance, full objective, lambda 1, sum)
ROWS="mllm_full:
none_full:train_ablation_noguidance.toml
text_full:train_ablation_textguidance.toml
mllm_lam0:train_ablation_lam0.toml
mllm_lam0.1:train_ablation_lam0.1.toml
mllm_lam10:train_ablation_lam10.toml
mllm_dpo:train_ablation_dpo.toml
mllm_spin:train_ablation_spin.toml
mean_full:train_ablation_mean.toml
mean_dpo:train_ablation_mean.toml+train_ablation_dpo.toml"

for seed in $SEEDS; do
  for spec in $ROWS; do
    name=${spec%%:*}
    files=${spec#*:}
    cfg="$OUT/configs/$name-s$seed.toml"
    : > "$cfg"
    for f in ${files//+/ }; do grep -v '^seed *=' "$HERE/$f" >> "$cfg"; done
    echo "seed = $seed   # jobs/ablation.sh" >> "$cfg"
    step "train $name, seed $seed: $STEPS steps (${files:-defaults of the tiny profile})"
    img jobs train --lake "$LAKE" --profile tiny --steps "$STEPS" --run-dir "$OUT/runs/$name-s$seed" \
      --config "$cfg" --checkpoint-every "$STEPS"
  done
done

step "table (img sql over $LAKE/metrics)"
img sql --lake "$LAKE" --json \
  "select run_id, name, value from metrics where name like 'heldout_%' order by run_id, name" > "$OUT/metrics.json"
SECONDS_TAKEN=$(( $(date +%s) - T0 ))
python - "$OUT" "$STEPS" "$PAIRS" "$SECONDS_TAKEN" $SEEDS <<'PY' | tee "$OUT/table.md"
import json, pathlib, statistics, sys

out, steps, pairs, secs, seeds = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
KINDS = ("colour", "count", "shape", "relation")
metrics = {}
for r in json.loads((out / "metrics.json").read_text()):
    metrics.setdefault(r["run_id"], {})[r["name"]] = r["value"]


def run(name, seed):
    return metrics[json.loads((out / "runs" / f"{name}-s{seed}" / "run.json").read_text())["run_id"]]


def ratios(name, key, kind=""):
    """d_aligned / d_identity per seed (identity of the same pairs)."""
    k = f"_{kind}" if kind else ""
    return [run(name, s)[f"{key}{k}"] / run(name, s)[f"heldout_d_identity{k}"] for s in seeds]


def cell(values, fmt="{:.3f}"):
    mean = fmt.format(statistics.mean(values))
    return mean if len(values) == 1 else f"{mean} ({' / '.join(fmt.format(v) for v in values)})"


def mean(values):
    return statistics.mean(values)


ROWS = [
    ("(a) guidance", "No Guidance (identity: initial features unchanged)", "-", None),
    ("(a) guidance", "aligner trained without guidance", "sum", "none_full"),
    ("(a) guidance", "Text Embedding (SDXL text encoders)", "sum", "text_full"),
    ("(a) guidance", "MLLM (tiny, instruction-tuned)", "sum", "mllm_full"),
    ("(b) lambda", "λ = 0", "sum", "mllm_lam0"),
    ("(b) lambda", "λ = 0.1", "sum", "mllm_lam0.1"),
    ("(b) lambda", "λ = 1 (paper)", "sum", "mllm_full"),
    ("(b) lambda", "λ = 10", "sum", "mllm_lam10"),
    ("(c) loss", "L_base", "sum", "mllm_lam0"),
    ("(c) loss", "L_base + DPO", "sum", "mllm_dpo"),
    ("(c) loss", "L_base + SPIN", "sum", "mllm_spin"),
    ("(c) loss", "L_base + DPO + SPIN (paper)", "sum", "mllm_full"),
    ("(c) loss, mean d", "L_base (same as sum up to AdamW's eps)", "sum", "mllm_lam0"),
    ("(c) loss, mean d", "L_base + DPO", "mean", "mean_dpo"),
    ("(c) loss, mean d", "L_base + DPO + SPIN", "mean", "mean_full"),
]
print("| table | row | d | 1 pass / identity | win rate | 3 passes / identity | win rate, 3 passes "
      "| colour | count | shape | relation | step ratio |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for table, label, dist, name in ROWS:
    if name is None:
        print(f"| {table} | {label} | - | 1 | 0 | 1 | 0 | 1 | 1 | 1 | 1 | - |")
        continue
    ms = [run(name, s) for s in seeds]
    kinds = [cell(ratios(name, "heldout_d_aligned", k), "{:.2f}") for k in KINDS]
    print(f"| {table} | {label} | {dist} | {cell(ratios(name, 'heldout_d_aligned'))} "
          f"| {cell([m['heldout_win_rate'] for m in ms], '{:.2f}')} "
          f"| {cell(ratios(name, 'heldout_d_aligned_3pass'))} "
          f"| {cell([m['heldout_win_rate_3pass'] for m in ms], '{:.2f}')} | " + " | ".join(kinds)
          + f" | {cell([m['heldout_step_ratio'] for m in ms], '{:.2f}')} |")
n = int(run("mllm_full", seeds[0])["heldout_pairs"])
print(f"\nMeans over seeds {', '.join(seeds)}, each seed in brackets; {n} held-out pairs; {steps} steps per run; "
      f"{pairs} sample pairs; wall time {secs // 60} min {secs % 60} s.\n"
      "Ratios are held-out mean d(w, f(c)) / mean d(w, l) (lower is better; identity = 1). The kind columns give the "
      "one-pass ratio per broken kind. Step ratio = ||f(f(q)) - f(q)|| / ||f(q) - q||.\n")


def order(label, names, passes="heldout_d_aligned"):
    """Does ratio(names[0]) > ratio(names[1]) > ... hold (each better than the one before), per seed?"""
    per_seed = []
    for i, s in enumerate(seeds):
        vals = [1.0 if n is None else ratios(n, passes)[i] for n in names]
        per_seed.append(all(a > b for a, b in zip(vals, vals[1:])))
    means = [1.0 if n is None else mean(ratios(n, passes)) for n in names]
    in_mean = all(a > b for a, b in zip(means, means[1:]))
    verdict = "holds in every seed" if all(per_seed) else (
        "holds in the mean only" if in_mean else "does not hold")
    shown = " > ".join(f"{m:.3f}" for m in means)
    print(f"- {label}: {verdict} ({'; '.join(f'seed {s}: ' + ('yes' if ok else 'no') for s, ok in zip(seeds, per_seed))}; "
          f"means {shown})")


print("Table 5 orderings (ratio to identity, one pass; 'A > B' = B closer to the winners):")
order("(a) No Guidance > Text > MLLM", [None, "text_full", "mllm_full"])
order("(a) aligner without guidance > MLLM", ["none_full", "mllm_full"])
order("(b) λ = 0 > λ = 1", ["mllm_lam0", "mllm_full"])
order("(b) λ = 10 > λ = 1", ["mllm_lam10", "mllm_full"])
order("(b) λ = 0.1 > λ = 1", ["mllm_lam0.1", "mllm_full"])
order("(c) L_base > + DPO > + DPO + SPIN (progressive)", ["mllm_lam0", "mllm_dpo", "mllm_full"])
order("(c) same with mean d (L_base: the sum run)", ["mllm_lam0", "mean_dpo", "mean_full"])
print("\nThe same with three passes (the paper's inference setting):")
order("(a) No Guidance > Text > MLLM", [None, "text_full", "mllm_full"], "heldout_d_aligned_3pass")
order("(c) L_base > + DPO > + DPO + SPIN", ["mllm_lam0", "mllm_dpo", "mllm_full"], "heldout_d_aligned_3pass")
PY
