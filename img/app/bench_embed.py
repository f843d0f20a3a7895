"""``img bench embed``: the embed job against a bare in-process loop, in one run.

    img bench embed --pairs 1024 --profile bench --json
    img bench embed --pairs 1024 --format pickapic   # the sample in the published form (no `broken`)

Both sides embed the same generated sample with the same models: the job is
the full Ray Data + Lance pipeline (``run_embed``, Ray already started, so the
figure is steady-state throughput including actor start-up and model loading);
the bare loop decodes the same JPEGs and calls the same encoders on the same
batches in this process, writing nothing, once with 1 torch thread and once
with all cores; the faster run is the baseline. Prints pairs/s for each, ``ratio`` =
job / bare, and ``bytes_ratio`` = bytes on disk per pair / raw tensor bytes per
pair.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from img.config import load_config, project_file
from img.data.sample import FORMATS, write_sample
from img.errors import UserError
from pipelines.common import init_ray
from pipelines.embed import Decode, Guidance, IPTokens, read_units, run_embed
from pipelines.embed_config import EmbedConfig
from pipelines.source import list_shards, plan_units


def _bare_loop(data: str, profile_name: str, cfg) -> dict[str, Any]:
    """Decode + IP tokens + guidance over every decisive pair, in process, no Ray and no writes."""

    units, _, _ = plan_units(list_shards(data), set(), None, unit_rows=cfg.read_rows)
    batch = {k: np.array([u[k] for u in units], dtype=object) for k in units[0]}
    ip, mllm = IPTokens(profile_name, "cpu"), Guidance(profile_name, "cpu")
    decode = Decode(cfg.min_side, cfg.max_pixels, cfg.question_seed)
    warm = {k: v[: cfg.mllm.batch_size] for k, v in read_units({k: v[:1] for k, v in batch.items()}).items()}
    mllm(ip(decode(warm)))  # first calls allocate and pick kernels; the job's actors pay this in start-up
    t0 = time.perf_counter()
    rows = read_units(batch)
    n = len(rows["pair_id"])
    raw_bytes = good = 0
    for start in range(0, n, cfg.ip.batch_size):
        part = {k: v[start: start + cfg.ip.batch_size] for k, v in rows.items()}
        part = decode(part)
        part = ip(part)
        for s2 in range(0, len(part["pair_id"]), cfg.mllm.batch_size):
            sub = {k: v[s2: s2 + cfg.mllm.batch_size] for k, v in part.items()}
            sub = mllm(sub)
            ok = np.array([e == "" for e in sub["error"]])
            good += int(ok.sum())
            raw_bytes += int(sub["winner_tokens"][ok].nbytes + sub["loser_tokens"][ok].nbytes)
            raw_bytes += sum(len(sub["guidance"][i]) for i in np.flatnonzero(ok))
    seconds = time.perf_counter() - t0
    return {"pairs": good, "seconds": seconds, "raw_bytes_per_pair": raw_bytes / max(good, 1)}


def run_bench(pairs: int = 1024, profile_name: str = "bench", seed: int = 0, workdir: str | None = None,
              fmt: str = "sample") -> dict[str, Any]:
    """Generate a sample (``fmt`` as in ``img data sample --format``), run the job and the bare loop on it."""


    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}. Pass --format pickapic "
                        "for exactly the published columns.")
    root = workdir or tempfile.mkdtemp(prefix="img-bench-embed-")
    data, lake = os.path.join(root, "data"), os.path.join(root, "lake")
    write_sample(data, pairs=pairs, seed=seed, corrupt=0.0, ties=0.0, fmt=fmt)
    cfg = load_config(EmbedConfig, project_file("embed.toml"))
    import torch

    # The bare loop gets its best thread setting (1 thread, or all cores): the ratio is against the faster one.
    threads_before = torch.get_num_threads()
    bare_runs = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        bare_runs[threads] = _bare_loop(data, profile_name, cfg)
    torch.set_num_threads(threads_before)
    best = max(bare_runs, key=lambda t: bare_runs[t]["pairs"] / bare_runs[t]["seconds"])
    bare = bare_runs[best]
    init_ray()
    t0 = time.perf_counter()
    summary = run_embed(data, lake, profile_name, cfg, progress=False)
    job_s = time.perf_counter() - t0
    job_rate = summary.written / job_s
    bare_rate = bare["pairs"] / bare["seconds"]
    steady = (summary.written - summary.first_commit_pairs) / max(summary.seconds - summary.first_commit_seconds, 1e-9)
    return {
        "profile": profile_name,
        "format": fmt,
        "pairs": summary.written,
        "job_pairs_per_s": round(job_rate, 3),
        "bare_pairs_per_s": round(bare_rate, 3),
        "ratio": round(job_rate / bare_rate, 3),
        # after the first commit: actors are up and models loaded (what a long job sees)
        "job_steady_pairs_per_s": round(steady, 3),
        "ratio_steady": round(steady / bare_rate, 3),
        "job_startup_s": round(summary.first_commit_seconds, 2),
        "job_seconds": round(job_s, 2),
        "bare_seconds": round(bare["seconds"], 2),
        "bare_threads": best,
        "bare_pairs_per_s_by_threads": {t: round(r["pairs"] / r["seconds"], 3) for t, r in bare_runs.items()},
        "bytes_per_pair_on_disk": round(summary.bytes_per_pair, 1),
        "raw_tensor_bytes_per_pair": round(bare["raw_bytes_per_pair"], 1),
        "bytes_ratio": round(summary.bytes_per_pair / bare["raw_bytes_per_pair"], 4),
        "job_time_split_s": {k: round(v, 2) for k, v in summary.time_split.items()},
        "cpus": os.cpu_count(),
    }
