"""Pieces shared by the DeepSpeed jobs (`img jobs train`, `img jobs finetune-mllm`).

    rank, world, local_rank = dist_env()              # a plain process is a world of one
    device, bf16, dtype = init_distributed(local_rank, cfg.precision)
    engine = build_engine(model, optimizer, cfg, world, bf16)   # checkpoints read with weights_only=True
    metrics = MetricsWriter(lake, run_id, after_step=start)    # rank 0: rows of the `metrics` table
    info = open_run(run_dir, resume, expect={...}, fix="...")  # run.json of the run to resume, or None
    run_id = new_run_id(run_dir, world)                        # the same on every rank
    ck = load_engine_checkpoint(engine, run_dir, tag)          # --resume
    save_rng(ck / "rng_rank0.safetensors"); load_rng(...)
    commit_checkpoint(run_dir, checkpoint_tag(200), keep=2, rank=rank)   # pointer + pruning, after every rank
    with progress_bar(rank, "train", total=steps, completed=start) as advance: ...
    acc = HeldoutSums(["pairs", "loss"]); acc.add("pairs", 8); acc.all_reduce(world); acc["pairs"]

A run folder holds ``run.json``, ``latest_checkpoint`` (the tag of the last
*complete* checkpoint) and ``checkpoints/step_XXXXXXXX/``; the pointer moves only
after every rank has written its files.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from img.config import resolve_project_path
from img.errors import UserError
from img.lake import tables as lake_mod
from img.lake.lock import writer_lock
from img.net import free_port
from img.progress import progress_bars
from img.training import run_folder
from schemas import metrics as metrics_schema


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); a plain process becomes a world of one on 127.0.0.1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def init_distributed(local_rank: int, precision: str) -> tuple[torch.device, bool, torch.dtype]:
    """Start the process group (nccl on GPU, gloo on CPU); (device, bf16?, compute dtype).

    ``precision``: "auto" (fp32 on CPU, bf16 on GPU), "fp32" or "bf16".
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device(get_accelerator().device_name(local_rank) if on_gpu else "cpu")
    bf16 = precision == "bf16" or (precision == "auto" and on_gpu)
    return device, bf16, torch.bfloat16 if bf16 else torch.float32


def deepspeed_config(cfg: Any, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON named by ``cfg.deepspeed_config``, with batch sizes and precision set from ``cfg``.

    ``cfg`` has ``deepspeed_config``, ``batch_size`` (per rank) and ``zero_stage`` (None = the JSON's), and
    optionally ``grad_accum`` (gradient accumulation steps; default: the JSON's, else 1).
    """
    p = resolve_project_path(cfg.deepspeed_config)
    if not p.is_file():
        raise UserError(f"DeepSpeed config {cfg.deepspeed_config!r} not found (looked at {str(p)!r}; relative paths "
                        "are taken from the img project folder, never the working directory). Set deepspeed_config "
                        "in the job's TOML to an absolute path or to a file such as jobs/deepspeed_zero0.json.")
    try:
        ds = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"DeepSpeed config {str(p)!r} is not readable JSON ({e}). Fix the file.") from None
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if getattr(cfg, "grad_accum", None):
        ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["train_batch_size"] = cfg.batch_size * ds["gradient_accumulation_steps"] * world_size
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds["fp16"] = {"enabled": False}
    if cfg.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, world_size: int, bf16: bool,
                 lr_scheduler: Any = None):
    """``deepspeed.initialize`` with :func:`deepspeed_config`; every checkpoint read goes through weights_only=True."""
    import deepspeed

    from img.training.checkpoint_io import use_weights_only_loading  # heavy: imports deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=deepspeed_config(cfg, world_size, bf16))
    use_weights_only_loading(engine)  # DeepSpeed's own loader would unpickle with weights_only=False
    return engine


def rss_gb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsWriter:
    """Buffers (run_id, step, name, value) rows on rank 0 and appends them to <lake>/metrics.lance.

    On resume, rows already recorded for this run (same step and name) are not written again.
    Each flush holds the lake's writer lock (waiting while, e.g., an embed job holds it);
    ``break_lock`` applies to the first flush only.
    """

    def __init__(self, lake: str, run_id: str, after_step: int | None = None, break_lock: bool = False,
                 job: str = "train") -> None:
        self.lake, self.run_id, self.rows, self.break_lock, self.job = lake, run_id, [], break_lock, job
        self.seen: set[tuple[int, str]] = set()
        if after_step is not None:
            ds = lake_mod.open_table(lake, "metrics")
            if ds is not None:
                # an expression, not an SQL string: run ids come from --run-dir names, which may hold quotes
                t = ds.to_table(columns=["step", "name"],
                                filter=(pc.field("run_id") == run_id) & (pc.field("step") > int(after_step)))
                self.seen = set(zip(t.column("step").to_pylist(), t.column("name").to_pylist()))

    def add(self, step: int, name: str, value: float) -> None:
        if (step, name) not in self.seen:
            self.rows.append((step, name, float(value)))

    def flush(self) -> None:
        if not self.rows:
            return
        steps, names, values = zip(*self.rows)
        table = pa.table({"run_id": [self.run_id] * len(steps), "step": list(steps), "name": list(names),
                          "value": list(values)}, schema=metrics_schema.SCHEMA)
        with writer_lock(self.lake, job=self.job, break_lock=self.break_lock):
            lake_mod.append_rows(self.lake, "metrics", table, metrics_schema.SCHEMA)
        self.rows, self.break_lock = [], False


class HeldoutSums:
    """Named float64 accumulators for a held-out evaluation, all-reduced as one tensor in a fixed name order.

        acc = HeldoutSums(["pairs", "d_identity"]); acc.add("pairs", 8.0); acc.add("d_identity", d.sum())
        acc.all_reduce(world); acc["pairs"]
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self._index = {n: i for i, n in enumerate(self.names)}

    def add(self, name: str, value: float | torch.Tensor) -> None:
        self.sums[self._index[name]] += float(value)

    def __getitem__(self, name: str) -> float:
        return float(self.sums[self._index[name]])

    def all_reduce(self, world: int) -> None:
        if world > 1:
            dist.all_reduce(self.sums)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(state, str(path))


def load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def open_run(run_dir: Path, resume: bool, expect: dict[str, Any], fix: str) -> dict[str, Any] | None:
    """``run.json`` of the run to resume (checked against ``expect``), or None for a new run.

    A new run in a folder that already holds a checkpoint, a resume without one, and a resume whose
    ``run.json`` differs from ``expect`` in any key are ``UserError`` s; ``fix`` ends the last message.
    """
    run_dir = Path(run_dir)
    pointer, run_json = run_dir / "latest_checkpoint", run_dir / "run.json"
    if not resume:
        if pointer.exists():
            raise UserError(f"{str(run_dir)!r} already holds a run. Pass --resume to continue it, or a new --run-dir.")
        return None
    run_folder.remove_partial_checkpoints(run_dir)  # a kill mid-save; the pointer's target stays
    if not pointer.is_file() or not run_json.is_file():
        raise UserError(f"--resume: no complete checkpoint in {str(run_dir)!r}. Drop --resume to start a new run.")
    info = json.loads(run_json.read_text())
    diff = {k: (info.get(k), v) for k, v in expect.items() if info.get(k) != v}
    if diff:
        have = ", ".join(f"{k} {a!r}" for k, (a, _) in diff.items())
        want = ", ".join(f"{k} {b!r}" for k, (_, b) in diff.items())
        raise UserError(f"--resume: {run_json} was made with {have}; this command has {want}. {fix}")
    return info


def new_run_id(run_dir: Path, world_size: int) -> str:
    """``<run folder name>-<8 hex>``, broadcast from rank 0 so every rank has the same id."""
    run_id = f"{Path(run_dir).name}-{uuid.uuid4().hex[:8]}"
    if world_size > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


def load_engine_checkpoint(engine: Any, run_dir: Path, tag: str, **kwargs: Any) -> Path:
    """Restore the DeepSpeed state (weights, optimizer, LR schedule) of checkpoint ``tag``; returns its folder."""
    ck = Path(run_dir) / "checkpoints" / tag
    load_path, _ = engine.load_checkpoint(str(Path(run_dir) / "checkpoints"), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, **kwargs)
    if load_path is None:
        raise UserError(f"--resume: DeepSpeed could not load {ck}. The checkpoint is incomplete; delete it.")
    return ck


def commit_checkpoint(run_dir: Path, tag: str, keep: int, rank: int) -> None:
    """Once every rank has its files on disk: rank 0 marks ``tag`` complete, points ``latest_checkpoint`` at it
    and prunes complete checkpoints older than it (``img.training.run_folder``)."""
    run_folder.fsync_tree(run_folder.checkpoints_dir(run_dir) / tag)
    dist.barrier()
    if rank == 0:
        run_folder.commit_checkpoint(run_dir, tag)
        run_folder.prune_checkpoints(run_dir, keep)
    dist.barrier()


@contextlib.contextmanager
def progress_bar(rank: int, label: str, total: int, completed: int) -> Iterator[Callable[[int], None]]:
    """A transient bar (``img.progress``) on rank 0 on a terminal; yields ``advance(step)`` (a no-op otherwise)."""
    with progress_bars(rank == 0, transient=True) as bars:
        task = bars.add_task(label, total=total, completed=completed)
        yield lambda step: bars.update(task, completed=step)
