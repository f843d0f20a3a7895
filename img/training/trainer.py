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
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from img.aligner import AlignerConfig, ImplicitAligner
from img.config import fingerprint, from_dict, project_file
from img.errors import UserError
from img.models.profiles import get_profile
from img.objective import DISTANCE_NAMES, ReferenceKeeper, copy_into_reference, iupo_loss, make_reference, sq_dist
from img.paths import check_lake_folder
from img.training import run_folder
from img.training.loader import LakeDims, TrainLoader
from img.training.run_common import (  # noqa: F401
    MetricsWriter,
    _load_rng,
    _rss_gb,
    _save_rng,
    _tag,
    build_engine,
    deepspeed_config,
    dist_env,
    init_distributed,
    load_engine_checkpoint,
    new_run_id,
)

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
    """Settings of `img jobs train`, filled from TOML. The dataclass defaults are the paper's recipe (jobs/train.toml);
    a profile may carry its own defaults (jobs/train_<profile>.toml, see ``load_train_config``)."""

    # optimisation (paper: AdamW, lr 1e-4, weight decay 1e-4, constant schedule, "8 A100 GPUs and a batch size of 8")
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 8  # per rank
    global_batch: int = 64  # batch_size x ranks must equal it (0 = whatever the launch gives); paper: 8 GPUs x 8
    # objective (paper: lambda = 1, reference copied after k = 10 consecutive wins, d = squared L2 norm)
    lam: float = 1.0
    k: int = 10
    terms: Literal["full", "dpo", "spin", "base"] = "full"  # ablations; see img/objective.py
    distance: Literal["sum", "mean"] = "sum"  # d = ||.||_2^2 (Eq. 4/6) or that / (N x D); see img/objective.py
    reference_init: Literal["random", "identity"] = "random"  # f_ref at step 0; see make_reference
    # data
    guidance: Literal["mllm", "none", "text"] = "mllm"  # none = no guidance (empty); text = caption features
    heldout_pairs: int = 2000  # pairs held out (smallest pair_id hashes), for the end-of-run evaluation
    heldout_split: str = ""  # e.g. "validation": hold out the pairs from shards named so instead (all of them)
    seed: int = 0  # model init, reference init, data order
    num_workers: int = 2  # threads reading guidance blobs in parallel (0 = read in the training thread)
    prefetch: int = 4  # batches in flight (memory bound)
    # inference setting recorded with the aligner
    passes: int = 3  # aligner passes at inference, written to <run-dir>/aligner/config.json (paper: 3)
    # run
    log_every: int = 10  # log line + samples/s every N steps
    checkpoint_every: int = 1000  # also at the last step
    keep_checkpoints: int = 2  # older checkpoints are deleted
    eval_passes: int = 3  # held-out figures for 1, 2, ..., eval_passes aligner passes
    eval_max_pairs: int = 2000  # cap on held-out pairs evaluated (0 = all)
    # engine
    deepspeed_config: str = "jobs/deepspeed_zero0.json"  # absolute, or relative to the img project (not the cwd)
    zero_stage: int | None = None  # overrides zero_optimization.stage of the JSON when set
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    aligner: AlignerOverrides = field(default_factory=AlignerOverrides)

    # Knobs that may change between a run and its resume without changing its results.
    RUN_KNOBS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "prefetch", "eval_max_pairs",
                 "eval_passes")


def profile_config(profile: str | None) -> Path | None:
    """The profile's own training defaults, ``jobs/train_<profile>.toml``, when the checkout has one."""
    if not profile:
        return None
    return project_file(f"train_{profile}.toml")


def load_train_config(profile: str | None, config: str | Path | None = None,
                      overrides: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """(config, the files it came from): dataclass defaults (the paper's recipe), then the profile's
    ``jobs/train_<profile>.toml`` if any, then ``config``, then non-None ``overrides``; later layers win key by key.

        cfg, sources = load_train_config("tiny")                      # TrainConfig + jobs/train_tiny.toml
        cfg, sources = load_train_config("tiny", "jobs/train.toml")   # the paper's recipe on the tiny profile
    """
    data: dict[str, Any] = {}
    sources = []
    for path in (profile_config(profile), Path(config) if config is not None else None):
        if path is None:
            continue
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} does not exist. Pass --config with a TOML file under jobs/.")
        try:
            layer = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {str(path)!r} is not valid TOML: {e}. Fix the file.") from None
        from_dict(TrainConfig, layer)  # unknown keys and bad values are named per file
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        sources.append(str(path))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(TrainConfig, data), sources


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


# ----------------------------------------------------------------------------- checkpoints
def _export(module: torch.nn.Module, config: AlignerConfig, directory: Path) -> None:
    """Save an fp32 CPU copy of an aligner module with save_pretrained."""
    with torch.device("meta"):
        out = ImplicitAligner(config)
    out.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()}, assign=True)
    out.save_pretrained(directory)


# ----------------------------------------------------------------------------- the job
def run_training(lake: str, profile: str | None, steps: int, run_dir: str | Path, cfg: TrainConfig,
                 resume: bool = False, break_lock: bool = False, settings_from: list[str] | None = None) -> TrainSummary:
    """Train to ``steps`` total optimizer steps; every rank calls this.

    ``settings_from``: the TOML files ``cfg`` was layered from (``load_train_config``), logged once validated.
    """
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
    if cfg.passes < 0 or cfg.eval_passes < 1:
        raise UserError(f"passes ({cfg.passes}) must be >= 0 and eval_passes ({cfg.eval_passes}) >= 1. The paper uses 3.")
    if cfg.global_batch and cfg.batch_size * world != cfg.global_batch:
        raise UserError(
            f"global_batch = {cfg.global_batch} but this launch gives batch_size x ranks = {cfg.batch_size} x {world} "
            f"= {cfg.batch_size * world}. Set batch_size = {cfg.global_batch // world if cfg.global_batch % world == 0 else '?'} "
            f"for {world} rank(s), or global_batch = 0 to accept any layout (the paper: 8 GPUs x 8 = 64)."
        )
    if rank == 0:
        log.info("settings: paper defaults%s", "".join(f" < {s}" for s in settings_from or []))
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
                         heldout_pairs=cfg.heldout_pairs, heldout_split=cfg.heldout_split, guidance=cfg.guidance,
                         num_workers=cfg.num_workers,
                         prefetch=cfg.prefetch, version=version, pairs_version=pairs_version,
                         pad_dtype="stored" if torch.cuda.is_available() else None)  # fp8: dequantised on the GPU
    acfg = dataclasses.replace(resolve_aligner_config(profile, loader.dims, cfg.guidance, lake, cfg.aligner),
                               passes=cfg.passes)

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
        ck = load_engine_checkpoint(engine, run_dir, tag)
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
        run_id = new_run_id(run_dir, world)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            run_json.write_text(json.dumps({
                "run_id": run_id, "fingerprint": fp, "lake": str(lake), "profile": profile, "world_size": world,
                "features_version": loader.version, "pairs_version": loader.pairs_version,
                "dims": dataclasses.asdict(loader.dims),
                "aligner": acfg.to_dict(), "config": dataclasses.asdict(cfg),
                "train_pairs": int(len(loader.train_indices)), "heldout_pairs": int(len(loader.heldout_indices)),
                "global_batch": cfg.batch_size * world, "distance": cfg.distance,
            }, indent=2, sort_keys=True, default=str) + "\n")

    metrics = MetricsWriter(lake, run_id, after_step=start if resume else None, break_lock=break_lock) \
        if rank == 0 else None
    if rank == 0:
        log.info("run %s: %d train / %d held-out pairs, global batch %d (%d rank(s) x %d), %d steps/epoch, "
                 "d = %s, aligner %s, %s on %s", run_id, len(loader.train_indices), len(loader.heldout_indices),
                 cfg.batch_size * world, world, cfg.batch_size, loader.steps_per_epoch, DISTANCE_NAMES[cfg.distance],
                 acfg.to_dict(), dtype, device)

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
            loss, parts = iupo_loss(pred, ref_pred, batch.winner, batch.loser, lam=cfg.lam, terms=cfg.terms,
                                    distance=cfg.distance)
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


class HeldoutSums:
    """Named float64 accumulators for the held-out evaluation, all-reduced as one tensor in a fixed name order.

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
            import torch.distributed as dist

            dist.all_reduce(self.sums)


def _heldout_names(kinds: list[str], max_passes: int) -> list[str]:
    names = ["step_sq1", "step_sq2", "step_cos"]
    for group in ["", *kinds]:
        names += [f"pairs{group}", f"d_identity{group}", f"mse_identity{group}"]
        for p in range(1, max_passes + 1):
            names += [f"d_aligned_{p}{group}", f"win_{p}{group}", f"mse_aligned_{p}{group}"]
    return names


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, loader: TrainLoader, cfg: TrainConfig, device: torch.device,
                     dtype: torch.dtype, world: int) -> dict[str, float]:
    """Held-out pairs: d(w, f(c)) against d(w, l), with 1 to ``max(eval_passes, passes)`` aligner passes.

    d is the run's ``distance`` (the one trained and compared by the ReferenceKeeper). Metrics, P = passes:

    heldout_d_aligned           mean d(w, f(c)): one aligner pass, the quantity the objective trains
    heldout_d_identity          mean d(w, l): doing nothing (the paper's "No Guidance" row)
    heldout_win_rate            share of pairs with d(w, f(c)) < d(w, l)
    heldout_d_aligned_{P}pass, heldout_win_rate_{P}pass      the aligner applied P = 2, 3, ... times (inference: 3)
    heldout_mse_aligned, heldout_mse_identity                 the same d as per-element mean squared error, whatever
                                                              the distance (compare runs of either distance with these)
    heldout_step_ratio          ||f(f(q)) - f(q)|| / ||f(q) - q|| over all pairs (q = c_I^l), root of summed squares:
                                near 1 means a second pass repeats the first
    heldout_step_cos            mean cosine between the second pass's step and the first's
    heldout_pairs               pairs evaluated
    ..._<kind>                  every figure above (but the step ones) per broken kind, when pairs.broken exists:
                                heldout_d_aligned_colour, heldout_d_identity_colour, heldout_win_rate_colour,
                                heldout_d_aligned_3pass_colour, heldout_pairs_colour, ...
    """
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    kinds = loader.heldout_kinds()
    max_passes = max(cfg.eval_passes, cfg.passes, 2)
    acc = HeldoutSums(_heldout_names([f"_{k}" for k in kinds], max_passes))
    for batch in loader.heldout_batches(max_pairs=cfg.eval_max_pairs):
        b = batch.to(device, dtype)
        kind_of = [f"_{loader.kinds[p]}" if p in loader.kinds else None for p in batch.pair_ids]
        d_id = sq_dist(b.winner, b.loser, cfg.distance)
        mse_id = sq_dist(b.winner, b.loser, "mean")
        outs, q = [], b.loser
        for _ in range(max_passes):
            q = model(b.guidance, q, b.mask)
            outs.append(q)
        step1 = (outs[0] - b.loser).float().flatten(1)
        step2 = (outs[1] - outs[0]).float().flatten(1)
        acc.add("step_sq1", step1.pow(2).sum())
        acc.add("step_sq2", step2.pow(2).sum())
        acc.add("step_cos", torch.nn.functional.cosine_similarity(step1, step2, dim=1, eps=1e-12).sum())
        per_pass = [(sq_dist(b.winner, o, cfg.distance), sq_dist(b.winner, o, "mean")) for o in outs]
        for j in range(len(batch)):
            for group in ("", kind_of[j]) if kind_of[j] is not None else ("",):
                acc.add(f"pairs{group}", 1.0)
                acc.add(f"d_identity{group}", d_id[j])
                acc.add(f"mse_identity{group}", mse_id[j])
                for p, (d_al, mse_al) in enumerate(per_pass, start=1):
                    acc.add(f"d_aligned_{p}{group}", d_al[j])
                    acc.add(f"mse_aligned_{p}{group}", mse_al[j])
                    acc.add(f"win_{p}{group}", float(d_al[j] < d_id[j]))
    acc.all_reduce(world)
    model.train(was_training)
    n = acc["pairs"]
    if n == 0:
        log.warning("no held-out pairs (heldout_pairs=%s): skipping the held-out evaluation", cfg.heldout_pairs)
        return {}
    out: dict[str, float] = {"heldout_pairs": n}
    for group in ["", *(f"_{k}" for k in kinds)]:
        m = acc[f"pairs{group}"]
        if m == 0:
            continue
        if group:
            out[f"heldout_pairs{group}"] = m
        out[f"heldout_d_identity{group}"] = acc[f"d_identity{group}"] / m
        for p in range(1, max_passes + 1):
            tag = "" if p == 1 else f"_{p}pass"
            out[f"heldout_d_aligned{tag}{group}"] = acc[f"d_aligned_{p}{group}"] / m
            out[f"heldout_win_rate{tag}{group}"] = acc[f"win_{p}{group}"] / m
        if not group:
            out["heldout_mse_identity"] = acc["mse_identity"] / m
            out["heldout_mse_aligned"] = acc["mse_aligned_1"] / m
    out["heldout_step_ratio"] = (acc["step_sq2"] / acc["step_sq1"]) ** 0.5 if acc["step_sq1"] > 0 else float("nan")
    out["heldout_step_cos"] = acc["step_cos"] / n
    if dist.get_rank() == 0:
        log.info("held-out (%d pairs, d = %s): d_identity %.5g; d_aligned %s; win rate %s; step ratio %.3f",
                 n, DISTANCE_NAMES[cfg.distance], out["heldout_d_identity"],
                 " / ".join(f"{out['heldout_d_aligned' + ('' if p == 1 else f'_{p}pass')]:.5g}"
                            for p in range(1, max_passes + 1)) + f" ({max_passes} passes)",
                 " / ".join(f"{out['heldout_win_rate' + ('' if p == 1 else f'_{p}pass')]:.3f}"
                            for p in range(1, max_passes + 1)), out["heldout_step_ratio"])
        for k in kinds:
            if f"heldout_d_identity_{k}" in out:
                log.info("held-out %-8s (%d pairs): d_aligned / d_identity %.3f, win rate %.3f", k,
                         out[f"heldout_pairs_{k}"], out[f"heldout_d_aligned_{k}"] / max(out[f"heldout_d_identity_{k}"],
                                                                                        1e-30),
                         out[f"heldout_win_rate_{k}"])
    return out
