"""``img bench train``: DeepSpeed steps of the SDXL-size aligner at real guidance size, read through the real loader.

    img bench train --json                          # batch 2, guidance 650 x 5120 fp16, 6 timed steps
    img bench train --guidance-dtype fp8 --json     # the same lake stored as fp8 (dequantised while padding)

A small lake of real-size rows (random IP tokens 2 x 16 x 2048, guidance
650 x 5120 with LLaMA-like outlier channels) is written to a temporary folder;
``TrainLoader`` reads it exactly as ``img jobs train`` does, and the engine is
built by the trainer's own ``init_distributed`` / ``build_engine`` from
``jobs/train.toml``'s settings (AdamW, ZeRO stage of the DeepSpeed JSON, fp32
on CPU) with the ``sdxl`` profile's aligner (195,094,528 parameters) and the
reference model beside it. Each step is the trainer's: forward, reference
forward, IUPO loss, backward, optimizer step. Reported: samples/s over the
timed steps (after ``warmup`` steps), peak RSS of the process, FLOPs per sample
(counted by ``torch.utils.flop_counter`` on one step, and worked out from the
architecture), bytes per sample read from the lake, and the seconds per step
spent waiting for the loader.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from img.aligner import AlignerConfig, ImplicitAligner
from img.app.bench_loader import FULL, write_bench_lake
from img.config import load_config, project_file
from img.errors import UserError
from img.objective import iupo_loss, make_reference
from img.training.loader import TrainLoader
from img.training.run_common import build_engine, dist_env, init_distributed
from img.training.trainer import TrainConfig, resolve_aligner_config

PROFILE = "sdxl"  # IP tokens 16 x 2048, guidance width 5120: the released SDXL aligner


def aligner_flops(cfg: AlignerConfig, guidance_len: int, tokens: int) -> dict[str, float]:
    """Matmul FLOPs of one sample (2 per multiply-add): forward, reference forward, backward.

    The backward of a linear layer costs twice its forward (input and weight gradients), except ``proj_in``,
    whose input (the guidance) needs no gradient. Attention scores are counted; norms and GELU are not.
    """
    d, inner, length = cfg.dim, cfg.heads * cfg.dim_head, guidance_len
    proj_in = 2 * length * cfg.guidance_dim * d
    per_layer = (2 * tokens * d * inner  # to_q
                 + 2 * (length + tokens) * d * 2 * inner  # to_kv over [guidance ; tokens]
                 + 2 * 2 * tokens * (length + tokens) * inner  # scores and weighted values
                 + 2 * tokens * inner * d  # to_out
                 + 2 * 2 * tokens * d * cfg.ff_mult * d)  # feed-forward
    head = 2 * tokens * d * cfg.output_dim * 2  # proj_out, zero_linear
    forward = proj_in + cfg.depth * per_layer + head
    backward = proj_in + 2 * (forward - proj_in)
    return {"forward": forward, "reference_forward": forward, "backward": backward,
            "total": 2 * forward + backward}


def run_bench(steps: int = 6, warmup: int = 2, batch_size: int = 2, rows: int = 16, guidance_dtype: str = "fp16",
              num_workers: int = 2, workdir: str | None = None) -> dict[str, Any]:
    """Write the lake, build the engine, time ``steps`` training steps after ``warmup``; return the figures."""
    if steps < 1 or warmup < 1 or batch_size < 1:
        raise UserError(f"--steps ({steps}), --warmup ({warmup}) and --batch-size ({batch_size}) must be >= 1.")
    if rows < batch_size:
        raise UserError(f"--rows ({rows}) must be at least one batch ({batch_size}). Pass more rows.")
    if guidance_dtype not in ("fp16", "fp8"):
        raise UserError(f"--guidance-dtype must be fp16 or fp8, got {guidance_dtype!r}.")
    root = Path(tempfile.mkdtemp(prefix="img-bench-train-", dir=workdir))
    try:
        return _run(root, steps, warmup, batch_size, rows, guidance_dtype, num_workers)
    finally:  # the process group stays up, as after a training run: DeepSpeed caches it for later engines
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, steps: int, warmup: int, batch_size: int, rows: int, guidance_dtype: str,
         num_workers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    write_bench_lake(root, rows, **FULL, guidance_dtype=guidance_dtype, flat=False)
    write_s = time.perf_counter() - t0
    lake_bytes = sum(f.stat().st_size for f in (root / "features.lance").rglob("*") if f.is_file())
    cfg = dataclasses.replace(load_config(TrainConfig, project_file("train.toml")), batch_size=batch_size,
                              num_workers=num_workers, heldout_pairs=0)
    rank, world, local_rank = dist_env()
    loader = TrainLoader(str(root), rank=rank, world_size=world, batch_size=cfg.batch_size, seed=cfg.seed,
                         heldout_pairs=cfg.heldout_pairs, heldout_split=cfg.heldout_split, guidance=cfg.guidance,
                         num_workers=cfg.num_workers,
                         prefetch=cfg.prefetch, pad_dtype="stored" if torch.cuda.is_available() else None)
    acfg = resolve_aligner_config(PROFILE, loader.dims, cfg.guidance, str(root))
    device, bf16, dtype = init_distributed(local_rank, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = ImplicitAligner(acfg)
    params = sum(p.numel() for p in model.parameters())
    ref = make_reference(acfg, seed=cfg.seed + 1, init=cfg.reference_init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    engine = build_engine(model, optimizer, cfg, world, bf16)
    ref.to(device=device, dtype=dtype)
    engine.train()
    it = iter(loader)
    wait: list[float] = []
    times: list[float] = []

    def step() -> float:
        t = time.perf_counter()
        with next(it) as read:  # its padded buffer goes back to the loader once copied
            wait.append(time.perf_counter() - t)
            batch = read.to(device, dtype)
        pred = engine(batch.guidance, batch.loser, batch.mask)
        with torch.no_grad():
            ref_pred = ref(batch.guidance, batch.loser, batch.mask)
        loss, _ = iupo_loss(pred, ref_pred, batch.winner, batch.loser, lam=cfg.lam, terms=cfg.terms,
                            distance=cfg.distance)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    from torch.utils.flop_counter import FlopCounterMode

    losses = []
    for i in range(warmup):
        if i == warmup - 1:  # count one step's FLOPs (slower; not timed)
            with FlopCounterMode(display=False) as counter:
                losses.append(step())
            counted = counter.get_total_flops()
        else:
            losses.append(step())
    wait.clear()
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    if hasattr(it, "close"):
        it.close()
    total = sum(times)
    sample_bytes = lake_bytes / rows
    analytic = aligner_flops(acfg, FULL["guidance_len"], FULL["ip_tokens"])
    flops_per_sample = counted / batch_size
    return {
        "aligner_params": params,
        "guidance_len": FULL["guidance_len"],
        "guidance_dim": FULL["guidance_dim"],
        "guidance_dtype": guidance_dtype,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "samples_per_s": round(steps * batch_size / total, 4),
        "seconds_per_step": round(statistics.median(times), 3),
        "seconds_per_step_runs": [round(t, 3) for t in times],
        "loader_wait_s_per_step": round(statistics.median(wait), 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "flops_per_sample": int(flops_per_sample),
        "flops_per_sample_analytic": int(analytic["total"]),
        "flops_split_analytic": {k: int(v) for k, v in analytic.items()},
        "achieved_gflop_per_s": round(flops_per_sample * steps * batch_size / total / 1e9, 2),
        "bytes_per_sample": int(sample_bytes),
        "MB_per_s_read": round(sample_bytes * steps * batch_size / total / 1e6, 2),
        "losses": [round(x, 6) for x in losses],
        "lake_rows": rows,
        "loader_read_path": loader.blob_api,
        "deepspeed_config": cfg.deepspeed_config,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "write_seconds": round(write_s, 1),
    }
