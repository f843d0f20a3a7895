#!/usr/bin/env bash
# fp8 guidance against fp16, measured (README, "fp8 guidance"), offline, tiny profile:
#   1. round-trip error of the quantiser (one scale per token vs one per tensor) on the bench profile's real
#      guidance and on a synthetic row with LLaMA-like outlier channels;
#   2. the same shapes-world sample embedded twice, fp16 (jobs/embed.toml) and fp8 (jobs/embed_fp8.toml):
#      bytes per pair, and the loader's fp8 guidance against the fp16 guidance of the same pairs;
#   3. both lakes trained alike (jobs/train.toml, the paper's settings; same seeds and steps), the held-out
#      metrics side by side.
#
#   bash jobs/fp8_check.sh [OUT]        # OUT defaults to ./fp8_check (deleted and rebuilt each run)
#   FP8_STEPS=2000 FP8_PAIRS=4000 FP8_SEEDS="0 1" bash jobs/fp8_check.sh out/fp8
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-fp8_check}
PAIRS=${FP8_PAIRS:-4000}
STEPS=${FP8_STEPS:-2000}
SEEDS=${FP8_SEEDS:-0 1}

if [ -e "$OUT" ] && [ ! -f "$OUT/.fp8_check" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT exists and was not made by jobs/fp8_check.sh; pass a new folder" >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT/configs" "$OUT/runs"
touch "$OUT/.fp8_check"
T0=$(date +%s)
step() { printf '\n== %s\n' "$*"; }

step "sample: $PAIRS shapes-world pairs, seed 0"
img data sample --out "$OUT/data" --pairs "$PAIRS" --seed 0

for dt in fp16 fp8; do
  cfg="$HERE/embed.toml"; [ "$dt" = fp8 ] && cfg="$HERE/embed_fp8.toml"
  step "embed, $dt guidance ($cfg)"
  img jobs embed --dataset pickapic --source "$OUT/data" --profile tiny --lake "$OUT/lake-$dt" --config "$cfg"
done

for seed in $SEEDS; do
  { grep -v '^seed *=' "$HERE/train.toml"; echo "seed = $seed   # jobs/fp8_check.sh"; } > "$OUT/configs/s$seed.toml"
  for dt in fp16 fp8; do
    step "train on $dt guidance, seed $seed: $STEPS steps"
    img jobs train --lake "$OUT/lake-$dt" --profile tiny --steps "$STEPS" --run-dir "$OUT/runs/$dt-s$seed" \
      --config "$OUT/configs/s$seed.toml" --checkpoint-every "$STEPS"
  done
done

step "measurements"
python - "$OUT" "$STEPS" "$PAIRS" "$(( $(date +%s) - T0 ))" $SEEDS <<'PY' | tee "$OUT/table.md"
import io, json, pathlib, statistics, sys

import numpy as np
import torch
from PIL import Image

from img import fp8
from img.data.sample import read_sample
from img.features import GuidanceEncoder
from img.lake import tables as lake_mod
from img.models.profiles import get_profile
from img.questions import question_for
from img.training.loader import TrainLoader

out, steps, pairs, secs, seeds = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]


def stats_table(title, rows):
    keys = ["rel_l2", "cosine", "cosine_min", "worst_token_rel_l2", "zeroed"]
    print(f"\n{title}\n\n| scaling | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for label, prefix in (("one scale per token (stored)", ""), ("one scale per tensor", "per_tensor_")):
        vals = [statistics.mean(r[prefix + k] for r in rows) if k not in ("cosine_min",) else
                min(r[prefix + k] for r in rows) for k in keys]
        vals[3] = max(r[prefix + "worst_token_rel_l2"] for r in rows)
        print(f"| {label} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")


# 1a. the bench profile's guidance (its random LLaVA at larger widths) on the sample's first 32 loser images
table = read_sample(str(out / "data")).slice(0, 40).to_pylist()
enc = GuidanceEncoder(get_profile("bench"))
rows = []
for r in table[:32]:
    img = Image.open(io.BytesIO(r["jpg_1"]["bytes"] if isinstance(r["jpg_1"], dict) else r["jpg_1"])).convert("RGB")
    h = enc([img], [question_for(r["caption"], r["image_1_uid"], 0)])[0]
    rows.append(fp8.error_stats(h.float()))
stats_table(f"Quantiser round trip, bench profile guidance ({len(rows)} rows, {tuple(h.shape)} each; mean over rows, "
            "cosine_min and worst_token over all)", rows)
# 1b. a synthetic row with LLaMA-like outlier channels and massive activations (img.fp8.llama_like)
stats_table("Quantiser round trip, synthetic 650 x 5120 row with LLaMA-like outliers (3 seeds)",
            [fp8.error_stats(fp8.llama_like(seed=s)) for s in range(3)])

# 2. the two lakes: bytes, and fp8 guidance as the loader gives it vs the fp16 guidance of the same pairs
def disk(lake):
    p = pathlib.Path(lake_mod.table_uri(str(lake), "features"))
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

l16 = TrainLoader(str(out / "lake-fp16"), batch_size=8, heldout_pairs=0, num_workers=0, pad_dtype=torch.float32)
l8 = TrainLoader(str(out / "lake-fp8"), batch_size=8, heldout_pairs=0, num_workers=0, pad_dtype=torch.float32)
n16, n8 = len(l16.pair_ids), len(l8.pair_ids)
print(f"\nBytes on disk per pair (features table): fp16 {disk(out / 'lake-fp16') / n16:,.0f}, "
      f"fp8 {disk(out / 'lake-fp8') / n8:,.0f} (ratio {disk(out / 'lake-fp8') / n8 / (disk(out / 'lake-fp16') / n16):.3f})")
where = {p: i for i, p in enumerate(l8.pair_ids)}
common = [i for i, p in enumerate(l16.pair_ids) if p in where][:256]
rel, cos = [], []
for s in range(0, len(common), 8):
    a = l16.read(common[s:s + 8])
    b = l8.read([where[l16.pair_ids[i]] for i in common[s:s + 8]])
    assert a.pair_ids == b.pair_ids
    for j in range(len(a)):
        n = int(a.lengths[j])
        x, y = a.guidance[j, :n], b.guidance[j, :n]
        rel.append(float((y - x).norm() / x.norm()))
        cos.append(float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()))
print(f"Loader, fp8 lake vs fp16 lake, {len(rel)} pairs (tiny profile): relative L2 error mean {np.mean(rel):.4f} "
      f"(max {np.max(rel):.4f}), per-token cosine mean {np.mean(cos):.5f} (min over pairs {np.min(cos):.5f}); "
      "the fp16 values are themselves rounded from the model's fp32")

# 3. held-out metrics of the trainings
metrics = {}
for dt in ("fp16", "fp8"):
    r = lake_mod.open_table(str(out / f"lake-{dt}"), "metrics").to_table().to_pylist()
    for m in r:
        metrics.setdefault(m["run_id"], {})[m["name"]] = m["value"]


def run(dt, seed):
    rid = json.loads((out / "runs" / f"{dt}-s{seed}" / "run.json").read_text())["run_id"]
    return {k: v for k, v in metrics[rid].items() if k.startswith("heldout")}


keys = ["heldout_d_aligned", "heldout_d_identity", "heldout_win_rate", "heldout_d_aligned_3pass", "heldout_win_rate_3pass"]
print(f"\nHeld-out metrics after {steps} steps (jobs/train.toml; {pairs} sample pairs; seeds {', '.join(seeds)})\n")
print("| guidance | seed | " + " | ".join(keys) + " | aligned / identity |\n|---|---|" + "---:|" * (len(keys) + 1))
for seed in seeds:
    for dt in ("fp16", "fp8"):
        m = run(dt, seed)
        print(f"| {dt} | {seed} | " + " | ".join(f"{m[k]:.5f}" for k in keys)
              + f" | {m['heldout_d_aligned'] / m['heldout_d_identity']:.4f} |")
print(f"\nheld-out pairs: {int(run('fp16', seeds[0])['heldout_pairs'])}; wall time {secs // 60} min {secs % 60} s")
PY
