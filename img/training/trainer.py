"""The training job: the Implicit Aligner on cached lake tensors, with DeepSpeed.

    img jobs train --lake lake --profile tiny --steps 200 --run-dir runs/r1
    img jobs train --lake lake --profile tiny --steps 400 --run-dir runs/r1 --resume   # continue to step 400
    torchrun --nproc_per_node 2 -m img.cli jobs train --lake lake --steps 200 --run-dir runs/r2
    deepspeed --num_gpus 2 --no_local_rank --module img.cli jobs train --lake lake --steps 200 --run-dir runs/r3

``--steps`` is the run's total number of optimizer steps; ``--resume`` continues
from the last complete checkpoint in ``--run-dir`` up to it, reproducing the
losses of an uninterrupted run. One process with no launcher is a world of one
(RANK etc. default here, gloo on CPU); under ``torchrun``/``deepspeed`` the
launcher's variables are used.

Run folder::

    run.json                          run id, config, fingerprint, lake version, dims
    latest_checkpoint                 tag of the last *complete* checkpoint
    checkpoints/step_00000200/        DeepSpeed engine state (model, AdamW) for every rank
        aligner/  reference/          safetensors + config.json of f and f_ref
        state.json                    step, ReferenceKeeper, loader position
        rng_rank{r}.safetensors       torch RNG states
        COMPLETE                      written last, once every rank's files are fsynced
    aligner/                          the final aligner (fp32), for `img infer`

Checkpoints are durable before the pointer moves (files and folders fsynced,
then ``COMPLETE``, then ``latest_checkpoint``, see :mod:`img.training.run_folder`).
Pruning keeps ``keep_checkpoints`` complete checkpoints and never deletes the
pointer's target; a partial checkpoint a kill left past the pointer is removed
when the run starts again. The final ``aligner/`` is written under a temporary
name and renamed into place.

Scalars go to ``<lake>/metrics.lance`` (run_id, step, name, value).

Our own files are safetensors/JSON. The DeepSpeed engine state is written by
``engine.save_checkpoint`` in DeepSpeed's format and read back by
``engine.load_checkpoint`` through :mod:`img.training.checkpoint_io`, which swaps DeepSpeed's
checkpoint engine for one that unpickles with ``torch.load(weights_only=True)``
and allows only the three DeepSpeed classes those files hold (ZeroStageEnum,
LossScaler, fragment_address). No pickle is loaded with ``weights_only=False``;
a file naming any other global is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from img.aligner import AlignerConfig, ImplicitAligner
from img.config import fingerprint, project_file, resolve_project_path
from img.errors import UserError
from img.lake import tables as lake_mod
from img.lake.lock import writer_lock
from img.models.profiles import get_profile
from img.objective import (
    ReferenceKeeper,
    copy_into_reference,
    iupo_loss,
    make_reference,
    sq_dist,
)
from img.paths import check_lake_folder
from img.training import run_folder
from img.training.checkpoint_io import use_weights_only_loading
from img.training.loader import LakeDims, TrainLoader
from schemas import metrics as metrics_schema

log = logging.getLogger(__name__)

DEFAULT_CONFIG = project_file("train.toml")  # the installed project's jobs/train.toml, or None
PART_NAMES = ("loss", "loss_base", "loss_pref", "d_win", "d_win_ref", "d_lose", "d_lose_ref", "d_ref", "z",
              "win_vs_ref")


@dataclass
class AlignerOverrides:
    """Optional architecture overrides on top of the profile's aligner (small experiments, tests)."""

    depth: int | None = None
    heads: int | None = None
    dim_head: int | None = None
    ff_mult: int | None = None


@dataclass
class TrainConfig:
    """Settings of `img jobs train`, filled from jobs/train.toml. Paper values are the defaults."""

    # optimisation (paper: AdamW, lr 1e-4, weight decay 1e-4, constant schedule, batch 8 per GPU)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant"] = "constant"
    batch_size: int = 8  # per rank
    # objective (paper: lambda = 1, reference copied after k = 10 consecutive wins)
    lam: float = 1.0
    k: int = 10
    terms: Literal["full", "dpo", "spin", "base"] = "full"  # ablations; see img/objective.py
    reference_init: Literal["random", "identity"] = "random"  # f_ref at step 0; see make_reference
    # data
    guidance: Literal["mllm", "none", "text"] = "mllm"  # none = no guidance (empty); text = caption features
    heldout_fraction: float = 0.05  # pairs held out by pair_id hash, for the end-of-run evaluation
    seed: int = 0  # model init, reference init, data order
    num_workers: int = 2  # threads reading guidance blobs in parallel (0 = read in the training thread)
    prefetch: int = 4  # batches in flight (memory bound)
    # run
    log_every: int = 10  # log line + samples/s every N steps
    checkpoint_every: int = 1000  # also at the last step
    keep_checkpoints: int = 2  # older checkpoints are deleted
    eval_passes: int = 3  # held-out figures are also given with this many passes (the inference setting)
    eval_max_pairs: int = 2000  # cap on held-out pairs evaluated (0 = all)
    # engine
    deepspeed_config: str = "jobs/deepspeed_zero0.json"  # absolute, or relative to the img project (not the cwd)
    zero_stage: int | None = None  # overrides zero_optimization.stage of the JSON when set
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    aligner: AlignerOverrides = field(default_factory=AlignerOverrides)

    # Knobs that may change between a run and its resume without changing its results.
    RUN_KNOBS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "prefetch", "eval_max_pairs",
                 "eval_passes")


@dataclass
class TrainSummary:
    run_id: str
    steps: int
    resumed_from: int
    seconds: float
    samples_per_s: float
    final_loss: float
    ref_copies: int
    heldout: dict[str, float]
    aligner_dir: str

    def render(self) -> str:
        h = ", ".join(f"{k} {v:.4g}" for k, v in self.heldout.items())
        return (f"trained {self.run_id}: step {self.resumed_from} -> {self.steps} in {self.seconds:.1f}s "
                f"({self.samples_per_s:.1f} samples/s), final loss {self.final_loss:.4g}, "
                f"{self.ref_copies} reference copies; held-out: {h or 'none'}; aligner at {self.aligner_dir}")


# ----------------------------------------------------------------------------- set-up helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); a plain process becomes a world of one on 127.0.0.1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def resolve_aligner_config(profile: str | None, dims: LakeDims, guidance: str, lake: str,
                           overrides: AlignerOverrides | None = None) -> AlignerConfig:
    """The aligner for ``profile``, checked against the lake's dims (or from the lake when no profiles module)."""
    if profile:
        prof = get_profile(profile)
        pd = prof.dims
        want = (int(pd.ip_tokens), int(pd.ip_dim), int(pd.mllm_hidden))
        have = (dims.ip_tokens, dims.ip_dim, dims.guidance_dim)
        if want != have:
            fix = (f"The profile's dims changed since the lake was embedded: re-embed into a new --lake."
                   if dims.profile == profile else
                   f"Pass --profile {dims.profile or '<the profile used by img jobs embed>'}, "
                   "or train on a lake embedded with this profile.")
            raise UserError(
                f"profile {profile!r} has ip_tokens x ip_dim = {want[0]} x {want[1]} and mllm_hidden {want[2]}, "
                f"but the features in {lake} are {have[0]} x {have[1]} with guidance_dim {have[2]} "
                f"(embedded with profile {dims.profile!r}). {fix}"
            )
        acfg = prof.aligner_config()
    else:
        log.info("img.models.profiles not available: aligner dims from the lake (%s)", dims)
        acfg = AlignerConfig(dim=dims.ip_dim, output_dim=dims.ip_dim, guidance_dim=dims.guidance_dim)
    if guidance == "text":
        acfg = dataclasses.replace(acfg, guidance_dim=int(dims.text_guidance_dim or 0))
    if overrides is not None:
        acfg = dataclasses.replace(acfg, **{k: v for k, v in dataclasses.asdict(overrides).items() if v is not None})
    return acfg


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON, with batch sizes and precision set from the TrainConfig."""
    p = resolve_project_path(cfg.deepspeed_config)
    if not p.is_file():
        raise UserError(f"DeepSpeed config {cfg.deepspeed_config!r} not found (looked at {str(p)!r}; relative paths "
                        "are taken from the img project folder, never the working directory). Set deepspeed_config "
                        "in the train TOML to an absolute path or to a file such as jobs/deepspeed_zero0.json.")
    try:
        ds = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"DeepSpeed config {str(p)!r} is not readable JSON ({e}). Fix the file.") from None
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["train_batch_size"] = cfg.batch_size * ds["gradient_accumulation_steps"] * world_size
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds["fp16"] = {"enabled": False}
    if cfg.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    ds.setdefault("steps_per_print", 10**9)
    return ds


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


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, world_size: int,
                 bf16: bool):
    """``deepspeed.initialize`` with :func:`deepspeed_config`; every checkpoint read goes through weights_only=True."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world_size, bf16))
    use_weights_only_loading(engine)  # DeepSpeed's own loader would unpickle with weights_only=False
    return engine


def _rss_gb() -> float:
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

    def __init__(self, lake: str, run_id: str, after_step: int | None = None, break_lock: bool = False) -> None:
        self.lake, self.run_id, self.rows, self.break_lock = lake, run_id, [], break_lock
        self.seen: set[tuple[int, str]] = set()
        if after_step is not None:
            ds = lake_mod.open_table(lake, "metrics")
            if ds is not None:
                import pyarrow.compute as pc

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
        import pyarrow as pa


        steps, names, values = zip(*self.rows)
        table = pa.table({"run_id": [self.run_id] * len(steps), "step": list(steps), "name": list(names),
                          "value": list(values)}, schema=metrics_schema.SCHEMA)
        with writer_lock(self.lake, job="train", break_lock=self.break_lock):
            lake_mod.append_rows(self.lake, "metrics", table, metrics_schema.SCHEMA)
        self.rows, self.break_lock = [], False


# ----------------------------------------------------------------------------- checkpoints
def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _export(module: torch.nn.Module, config: AlignerConfig, directory: Path) -> None:
    """Save an fp32 CPU copy of an aligner module with save_pretrained."""
    with torch.device("meta"):
        out = ImplicitAligner(config)
    out.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()}, assign=True)
    out.save_pretrained(directory)


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(state, str(path))


def _load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


# ----------------------------------------------------------------------------- the job
def run_training(lake: str, profile: str | None, steps: int, run_dir: str | Path, cfg: TrainConfig,
                 resume: bool = False, break_lock: bool = False) -> TrainSummary:
    """Train to ``steps`` total optimizer steps; every rank calls this."""
    rank, world, local_rank = dist_env()
    run_dir = Path(run_dir)
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}.")
    if cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise UserError(f"checkpoint_every ({cfg.checkpoint_every}) and log_every ({cfg.log_every}) must be >= 1.")
    if rank == 0:  # before anything starts (DeepSpeed, the loader); one rank, so probes do not race
        run_folder.check_run_dir(run_dir)
        check_lake_folder(str(lake), must_exist=True)  # metrics are written there
    deepspeed_config(cfg, world, False)  # a missing or broken DeepSpeed JSON, before the loader and DeepSpeed
    pointer = run_dir / "latest_checkpoint"
    run_json = run_dir / "run.json"
    fp = fingerprint(cfg, exclude=TrainConfig.RUN_KNOBS)
    if resume:
        if not pointer.is_file() or not run_json.is_file():
            raise UserError(f"--resume: no complete checkpoint in {str(run_dir)!r}. Drop --resume to start a new run.")
        info = json.loads(run_json.read_text())
        if info["fingerprint"] != fp or info["lake"] != str(lake) or info["world_size"] != world:
            raise UserError(
                f"--resume: {run_json} was made with fingerprint {info['fingerprint']}, lake {info['lake']!r}, "
                f"{info['world_size']} rank(s); this command has {fp}, {str(lake)!r}, {world}. "
                "Resume with the same --config, --lake and number of ranks."
            )
        version, pairs_version = int(info["features_version"]), info.get("pairs_version")
    else:
        if pointer.exists():
            raise UserError(f"{str(run_dir)!r} already holds a run. Pass --resume to continue it, or a new --run-dir.")
        info, version, pairs_version = None, None, None
    if rank == 0:
        run_folder.remove_partial_checkpoints(run_dir)  # a kill mid-save; the pointer's target stays

    loader = TrainLoader(lake, rank=rank, world_size=world, batch_size=cfg.batch_size, seed=cfg.seed,
                         heldout_fraction=cfg.heldout_fraction, guidance=cfg.guidance, num_workers=cfg.num_workers,
                         prefetch=cfg.prefetch, version=version, pairs_version=pairs_version,
                         pad_dtype="stored" if torch.cuda.is_available() else None)  # fp8: dequantised on the GPU
    acfg = resolve_aligner_config(profile, loader.dims, cfg.guidance, lake, cfg.aligner)

    import torch.distributed as dist

    device, bf16, dtype = init_distributed(local_rank, cfg.precision)

    torch.manual_seed(cfg.seed)
    model = ImplicitAligner(acfg)
    ref = make_reference(acfg, seed=cfg.seed + 1, init=cfg.reference_init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=tuple(cfg.betas))
    engine = build_engine(model, optimizer, cfg, world, bf16)
    ref.to(device=device, dtype=dtype)
    keeper = ReferenceKeeper(cfg.k)
    start = 0
    if resume:
        tag = pointer.read_text().strip()
        ck = run_dir / "checkpoints" / tag
        load_path, _ = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"--resume: DeepSpeed could not load {ck}. The checkpoint is incomplete; delete it.")
        state = json.loads((ck / "state.json").read_text())
        from safetensors.torch import load_file

        ref.load_state_dict(load_file(str(ck / "reference" / "model.safetensors")))
        keeper.load_state_dict(state["keeper"])
        loader.load_state_dict(state["loader"])
        _load_rng(ck / f"rng_rank{rank}.safetensors")
        start = int(state["step"])
        run_id = info["run_id"]
        log.info("resumed %s from %s (step %d)", run_id, tag, start)
    else:
        run_id = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        if world > 1:  # every rank needs the same id
            box = [run_id]
            dist.broadcast_object_list(box, src=0)
            run_id = box[0]
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            run_json.write_text(json.dumps({
                "run_id": run_id, "fingerprint": fp, "lake": str(lake), "profile": profile, "world_size": world,
                "features_version": loader.version, "pairs_version": loader.pairs_version,
                "dims": dataclasses.asdict(loader.dims),
                "aligner": acfg.to_dict(), "config": dataclasses.asdict(cfg),
                "train_pairs": int(len(loader.train_indices)), "heldout_pairs": int(len(loader.heldout_indices)),
            }, indent=2, sort_keys=True, default=str) + "\n")

    metrics = MetricsWriter(lake, run_id, after_step=start if resume else None, break_lock=break_lock) \
        if rank == 0 else None
    if rank == 0:
        log.info("run %s: %d train / %d held-out pairs, %d steps/epoch, aligner %s, %d rank(s), %s on %s",
                 run_id, len(loader.train_indices), len(loader.heldout_indices), loader.steps_per_epoch,
                 acfg.to_dict(), world, dtype, device)

    def checkpoint(step: int) -> None:
        tag = _tag(step)
        ck = run_dir / "checkpoints" / tag
        if metrics is not None:
            metrics.flush()
        engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag)
        ck.mkdir(parents=True, exist_ok=True)
        _save_rng(ck / f"rng_rank{rank}.safetensors")
        if rank == 0:
            _export(engine.module, acfg, ck / "aligner")
            _export(ref, acfg, ck / "reference")
            (ck / "state.json").write_text(json.dumps({"step": step, "keeper": keeper.state_dict(),
                                                        "loader": loader.state_dict(), "run_id": run_id}, indent=2))
        run_folder.fsync_tree(ck)  # every rank: its own files are on disk before it reaches the barrier
        dist.barrier()
        if rank == 0:  # COMPLETE, then the pointer, only once every rank's files are durable
            run_folder.commit_checkpoint(run_dir, tag)
            run_folder.prune_checkpoints(run_dir, cfg.keep_checkpoints)
        dist.barrier()

    t0 = time.perf_counter()
    win_t, win_steps = time.perf_counter(), 0
    samples_per_s = 0.0
    last = {n: float("nan") for n in PART_NAMES}
    engine.train()
    it = iter(loader)
    progress = None
    if rank == 0 and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        task = progress.add_task("train", total=steps, completed=start)
        progress.start()
    try:
        for step in range(start + 1, steps + 1):
            batch = next(it).to(device, dtype)
            pred = engine(batch.guidance, batch.loser, batch.mask)
            with torch.no_grad():
                ref_pred = ref(batch.guidance, batch.loser, batch.mask)
            loss, parts = iupo_loss(pred, ref_pred, batch.winner, batch.loser, lam=cfg.lam, terms=cfg.terms)
            engine.backward(loss)
            engine.step()
            vals = torch.stack([parts[n].float().cpu() for n in PART_NAMES])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            last = dict(zip(PART_NAMES, vals.tolist()))
            copied = keeper.observe(last["d_win"], last["d_win_ref"])  # same decision on every rank
            if copied:
                copy_into_reference(engine.module, ref)
            win_steps += 1
            if metrics is not None:
                for n in PART_NAMES:
                    metrics.add(step, n, last[n])
                if copied:
                    metrics.add(step, "ref_copy", keeper.copies)
            if step % cfg.log_every == 0 or step == steps:
                dt = time.perf_counter() - win_t
                samples_per_s = win_steps * cfg.batch_size * world / max(dt, 1e-9)
                win_t, win_steps = time.perf_counter(), 0
                if metrics is not None:
                    metrics.add(step, "samples_per_s", samples_per_s)
                    log.info("step %d/%d loss %.5f (base %.5f pref %.5f) lr %.2e %.1f samples/s rss %.2f GB "
                             "ref copies %d", step, steps, last["loss"], last["loss_base"], last["loss_pref"],
                             engine.get_lr()[0], samples_per_s, _rss_gb(), keeper.copies)
            if progress is not None:
                progress.update(task, completed=step)
            if step % cfg.checkpoint_every == 0 or step == steps:
                checkpoint(step)
    finally:
        if progress is not None:
            progress.stop()
        if hasattr(it, "close"):
            it.close()

    heldout = evaluate_heldout(engine.module, loader, cfg, device, dtype, world)
    if metrics is not None:
        for n, v in heldout.items():
            metrics.add(max(steps, start), n, v)
        metrics.flush()
    final_dir = run_dir / "aligner"
    if rank == 0:  # under a temporary name, then renamed: a reader never sees half an aligner
        run_folder.install_folder(final_dir, lambda tmp: _export(engine.module, acfg, tmp))
    dist.barrier()
    seconds = time.perf_counter() - t0
    done = max(steps - start, 0)
    return TrainSummary(run_id=run_id, steps=max(steps, start), resumed_from=start, seconds=seconds,
                        samples_per_s=done * cfg.batch_size * world / max(seconds, 1e-9),
                        final_loss=last["loss"], ref_copies=keeper.copies, heldout=heldout,
                        aligner_dir=str(final_dir))


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, loader: TrainLoader, cfg: TrainConfig, device: torch.device,
                     dtype: torch.dtype, world: int) -> dict[str, float]:
    """Held-out pairs: d(w, f(c)) vs d(w, l), the win rate, and the same in the inference setting.

    heldout_d_aligned         mean d(w, f(c)): one aligner pass, the quantity the objective trains
    heldout_d_identity        mean d(w, l): doing nothing
    heldout_win_rate          share of pairs with d(w, f(c)) < d(w, l)
    heldout_d_aligned_{k}pass, heldout_win_rate_{k}pass
                              the same with the aligner applied k = ``eval_passes`` times (inference: 3)
    """
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    for batch in loader.heldout_batches(max_pairs=cfg.eval_max_pairs):
        b = batch.to(device, dtype)
        one = model(b.guidance, b.loser, b.mask)
        aligned = model.align(b.guidance, b.loser, passes=cfg.eval_passes, guidance_mask=b.mask)
        d_al, d_one, d_id = sq_dist(b.winner, aligned), sq_dist(b.winner, one), sq_dist(b.winner, b.loser)
        sums += torch.stack([d_al.sum(), d_one.sum(), d_id.sum(), (d_al < d_id).sum(),
                             torch.tensor(float(len(d_al))), (d_one < d_id).sum()]).double().cpu()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    n = sums[4].item()
    if n == 0:
        log.warning("no held-out pairs (heldout_fraction=%s): skipping the held-out evaluation", cfg.heldout_fraction)
        return {}
    k = cfg.eval_passes
    out = {"heldout_d_aligned": sums[1].item() / n, "heldout_d_identity": sums[2].item() / n,
           "heldout_win_rate": sums[5].item() / n, f"heldout_d_aligned_{k}pass": sums[0].item() / n,
           f"heldout_win_rate_{k}pass": sums[3].item() / n, "heldout_pairs": n}
    if dist.get_rank() == 0:
        log.info("held-out (%d pairs): d_aligned %.5f (%d passes: %.5f), d_identity %.5f, win rate %.3f (%d passes: %.3f)",
                 n, out["heldout_d_aligned"], k, out[f"heldout_d_aligned_{k}pass"], out["heldout_d_identity"],
                 out["heldout_win_rate"], k, out[f"heldout_win_rate_{k}pass"])
    return out
