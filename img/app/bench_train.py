"""``img bench train``: DeepSpeed steps of the SDXL-size aligner at real guidance size, read through the real loader.

    img bench train --json                          # batch 2, guidance 650 x 5120 fp16, 6 timed steps
    img bench train --guidance-dtype fp8 --json     # the same lake stored as fp8 (dequantised while padding)

A small lake of real-size rows (random IP tokens 2 x 16 x 2048, guidance
650 x 5120 with LLaMA-like outlier channels) is written to a temporary folder;
the trainer's own ``train_loader`` reads it exactly as ``img jobs train`` does,
and the engine is built by its ``init_aligners`` / ``aligner_engine`` from
``jobs/train.toml``'s settings (AdamW, ZeRO stage of the DeepSpeed JSON, fp32
on CPU) with the ``sdxl`` profile's aligner (195,094,528 parameters) and the
reference model beside it. Each step is the trainer's ``train_step``: forward,
reference forward, IUPO loss, backward, optimizer step. Reported: samples/s over the
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

from img.aligner import AlignerConfig, param_count
from img.app.bench_loader import FULL, write_bench_lake
from img.config import load_config, project_file
from img.errors import UserError
from img.training.loader import TrainLoader
from img.training.run_common import dist_env, init_distributed
from img.training.trainer import (
    TrainConfig,
    aligner_engine,
    init_aligners,
    resolve_aligner_config,
    train_loader,
    train_step,
)

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
    """Write the lake, build the trainer's loader and engine on it, time the steps; return the figures."""
    t0 = time.perf_counter()
    write_bench_lake(root, rows, **FULL, guidance_dtype=guidance_dtype, flat=False)
    write_s = time.perf_counter() - t0
    lake_bytes = sum(f.stat().st_size for f in (root / "features.lance").rglob("*") if f.is_file())
    cfg, loader, acfg, engine, ref, device, dtype, params = _build(root, batch_size, num_workers)
    losses, times, wait, counted = _time_steps(engine, ref, loader, cfg, device, dtype, steps, warmup)
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


def _build(root: Path, batch_size: int, num_workers: int) -> tuple:
    """jobs/train.toml's settings, and the trainer's own loader, aligner engine and reference on the bench lake:
    (cfg, loader, aligner config, engine, reference, device, dtype, aligner parameters)."""
    cfg = dataclasses.replace(load_config(TrainConfig, project_file("train.toml")), batch_size=batch_size,
                              num_workers=num_workers, heldout_pairs=0)
    rank, world, local_rank = dist_env()
    loader = train_loader(str(root), cfg, rank, world)
    acfg = resolve_aligner_config(PROFILE, loader.dims, cfg.guidance, str(root))
    device, bf16, dtype = init_distributed(local_rank, cfg.precision)
    model, ref = init_aligners(acfg, cfg)
    params = param_count(model)
    engine = aligner_engine(model, cfg, world, bf16)
    ref.to(device=device, dtype=dtype)
    return cfg, loader, acfg, engine, ref, device, dtype, params


def _time_steps(engine: Any, ref: torch.nn.Module, loader: TrainLoader, cfg: TrainConfig, device: torch.device,
                dtype: torch.dtype, steps: int, warmup: int) -> tuple[list[float], list[float], list[float], int]:
    """``warmup`` untimed training steps (FLOPs counted on the last), then ``steps`` timed ones:
    (losses, seconds per timed step, seconds of each waiting for the loader, FLOPs of one step)."""
    from torch.utils.flop_counter import FlopCounterMode

    engine.train()
    it = iter(loader)
    wait: list[float] = []
    times: list[float] = []

    def step() -> float:
        t = time.perf_counter()
        with next(it) as read:  # its padded buffer goes back to the loader once copied
            wait.append(time.perf_counter() - t)
            batch = read.to(device, dtype)
        loss, _ = train_step(engine, ref, batch, cfg)  # the trainer's step: forward, reference, IUPO, backward, step
        return float(loss.detach())

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
    return losses, times, wait, counted
