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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from img.aligner import AlignerConfig, ImplicitAligner
from img.config import fingerprint, from_dict, project_file, read_toml
from img.errors import UserError
from img.models.profiles import get_profile
from img.objective import DISTANCE_NAMES, ReferenceKeeper, copy_into_reference, iupo_loss, make_reference, sq_dist
from img.paths import check_lake_folder
from img.training import run_folder
from img.training.loader import Batch, LakeDims, TrainLoader
from img.training.run_common import (  # noqa: F401
    HeldoutSums,
    MetricsWriter,
    build_engine,
    checkpoint_tag,
    commit_checkpoint,
    deepspeed_config,
    dist_env,
    init_distributed,
    load_engine_checkpoint,
    load_rng,
    new_run_id,
    progress_bar,
    rss_gb,
    save_rng,
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
        layer = read_toml(path)
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


# ----------------------------------------------------------------------------- building blocks
def train_loader(lake: str, cfg: TrainConfig, rank: int, world: int, version: int | None = None,
                 pairs_version: int | None = None) -> TrainLoader:
    """The job's loader over ``lake`` with ``cfg``'s batch, split and guidance (``version``s pin a resumed run's).

        loader = train_loader("lake", cfg, rank=0, world=1)
    """
    return TrainLoader(lake, rank=rank, world_size=world, batch_size=cfg.batch_size, seed=cfg.seed,
                       heldout_pairs=cfg.heldout_pairs, heldout_split=cfg.heldout_split, guidance=cfg.guidance,
                       num_workers=cfg.num_workers,
                       prefetch=cfg.prefetch, version=version, pairs_version=pairs_version,
                       pad_dtype="stored" if torch.cuda.is_available() else None)  # fp8: dequantised on the GPU


def init_aligners(acfg: AlignerConfig, cfg: TrainConfig) -> tuple[ImplicitAligner, ImplicitAligner]:
    """(f, f_ref) at step 0: f from ``cfg.seed``, f_ref from ``cfg.seed + 1``; the same weights on every rank.

        model, ref = init_aligners(acfg, cfg)
    """
    torch.manual_seed(cfg.seed)
    model = ImplicitAligner(acfg)
    return model, make_reference(acfg, seed=cfg.seed + 1, init=cfg.reference_init)


def aligner_engine(model: torch.nn.Module, cfg: TrainConfig, world: int, bf16: bool) -> Any:
    """The DeepSpeed engine of ``model`` with the job's AdamW (``cfg.lr``, ``weight_decay``, ``betas``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=tuple(cfg.betas))
    return build_engine(model, optimizer, cfg, world, bf16)


def train_step(engine: Any, ref: torch.nn.Module, batch: Batch, cfg: TrainConfig
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step of the IUPO objective on a batch on the engine's device; (loss, its parts).

        loss, parts = train_step(engine, ref, batch.to(device, dtype), cfg)
    """
    pred = engine(batch.guidance, batch.loser, batch.mask)
    with torch.no_grad():
        ref_pred = ref(batch.guidance, batch.loser, batch.mask)
    loss, parts = iupo_loss(pred, ref_pred, batch.winner, batch.loser, lam=cfg.lam, terms=cfg.terms,
                            distance=cfg.distance)
    engine.backward(loss)
    engine.step()
    return loss, parts


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
    trainer = Trainer(lake, profile, steps, run_dir, cfg, resume=resume, break_lock=break_lock)
    trainer.validate(settings_from)
    trainer.build()
    trainer.restore()
    trainer.train()
    return trainer.finish(trainer.evaluate())


class Trainer:
    """`img jobs train` as named phases, which every rank runs in this order (``run_training`` does):

        t = Trainer("lake", "tiny", 200, "runs/r1", cfg)
        t.validate()               # every user mistake, before the loader, DeepSpeed or any file
        t.build()                  # loader, aligner config, f in its DeepSpeed engine, f_ref, ReferenceKeeper
        t.restore()                # --resume: the last complete checkpoint; else a new run.json
        t.train()                  # step() up to ``steps``, checkpoint() every checkpoint_every steps and at the last
        t.finish(t.evaluate())     # held-out figures, the final aligner/, a TrainSummary
    """

    def __init__(self, lake: str, profile: str | None, steps: int, run_dir: str | Path, cfg: TrainConfig,
                 resume: bool = False, break_lock: bool = False) -> None:
        self.lake, self.profile, self.steps, self.cfg = lake, profile, steps, cfg
        self.run_dir, self.resume, self.break_lock = Path(run_dir), resume, break_lock
        self.rank, self.world, self.local_rank = dist_env()
        self.pointer, self.run_json = self.run_dir / "latest_checkpoint", self.run_dir / "run.json"
        self.info: dict[str, Any] | None = None  # run.json of the run being resumed
        self.start = 0  # optimizer steps done before this invocation
        self.last = {n: float("nan") for n in PART_NAMES}  # the latest step's loss parts, mean over ranks
        self.metrics: MetricsWriter | None = None  # rank 0 only

    # ------------------------------------------------------------------ validate
    def validate(self, settings_from: list[str] | None = None) -> None:
        """Refuse bad settings, folders and resumes before the loader and DeepSpeed start; clear a killed save."""
        cfg, world, steps = self.cfg, self.world, self.steps
        if steps < 1:
            raise UserError(f"--steps must be >= 1, got {steps}.")
        if cfg.checkpoint_every < 1 or cfg.log_every < 1:
            raise UserError(f"checkpoint_every ({cfg.checkpoint_every}) and log_every ({cfg.log_every}) must be >= 1.")
        if self.rank == 0:  # before anything starts (DeepSpeed, the loader); one rank, so probes do not race
            run_folder.check_run_dir(self.run_dir)
            check_lake_folder(str(self.lake), must_exist=True)  # metrics are written there
        deepspeed_config(cfg, world, False)  # a missing or broken DeepSpeed JSON, before the loader and DeepSpeed
        if cfg.passes < 0 or cfg.eval_passes < 1:
            raise UserError(f"passes ({cfg.passes}) must be >= 0 and eval_passes ({cfg.eval_passes}) >= 1. The paper uses 3.")
        if cfg.global_batch and cfg.batch_size * world != cfg.global_batch:
            raise UserError(
                f"global_batch = {cfg.global_batch} but this launch gives batch_size x ranks = {cfg.batch_size} x {world} "
                f"= {cfg.batch_size * world}. Set batch_size = {cfg.global_batch // world if cfg.global_batch % world == 0 else '?'} "
                f"for {world} rank(s), or global_batch = 0 to accept any layout (the paper: 8 GPUs x 8 = 64)."
            )
        if self.rank == 0:
            log.info("settings: paper defaults%s", "".join(f" < {s}" for s in settings_from or []))
        self.fingerprint = fingerprint(cfg, exclude=TrainConfig.RUN_KNOBS)
        self.info = self._resumed_run()
        if self.rank == 0:
            run_folder.remove_partial_checkpoints(self.run_dir)  # a kill mid-save; the pointer's target stays

    def _resumed_run(self) -> dict[str, Any] | None:
        """run.json of the run ``--resume`` continues, checked against this command; None for a new run."""
        if not self.resume:
            if self.pointer.exists():
                raise UserError(f"{str(self.run_dir)!r} already holds a run. Pass --resume to continue it, "
                                "or a new --run-dir.")
            return None
        if not self.pointer.is_file() or not self.run_json.is_file():
            raise UserError(f"--resume: no complete checkpoint in {str(self.run_dir)!r}. Drop --resume to start "
                            "a new run.")
        info = json.loads(self.run_json.read_text())
        fp, lake, world = self.fingerprint, self.lake, self.world
        if info["fingerprint"] != fp or info["lake"] != str(lake) or info["world_size"] != world:
            raise UserError(
                f"--resume: {self.run_json} was made with fingerprint {info['fingerprint']}, lake {info['lake']!r}, "
                f"{info['world_size']} rank(s); this command has {fp}, {str(lake)!r}, {world}. "
                "Resume with the same --config, --lake and number of ranks."
            )
        return info

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """The loader (pinned to a resumed run's table versions), the aligner, its engine, f_ref and the keeper."""
        cfg, info = self.cfg, self.info
        self.loader = train_loader(self.lake, cfg, self.rank, self.world,
                                   version=int(info["features_version"]) if info is not None else None,
                                   pairs_version=info.get("pairs_version") if info is not None else None)
        self.acfg = dataclasses.replace(
            resolve_aligner_config(self.profile, self.loader.dims, cfg.guidance, self.lake, cfg.aligner),
            passes=cfg.passes)
        self.device, bf16, self.dtype = init_distributed(self.local_rank, cfg.precision)
        model, self.ref = init_aligners(self.acfg, cfg)
        self.engine = aligner_engine(model, cfg, self.world, bf16)
        self.ref.to(device=self.device, dtype=self.dtype)
        self.keeper = ReferenceKeeper(cfg.k)

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Resume from the last complete checkpoint, or record a new run; then open the metrics (rank 0)."""
        if self.info is not None:
            self._load_checkpoint()
        else:
            self._record_new_run()
        if self.rank != 0:
            return
        self.metrics = MetricsWriter(self.lake, self.run_id, after_step=self.start if self.resume else None,
                                     break_lock=self.break_lock)
        loader, cfg, world = self.loader, self.cfg, self.world
        log.info("run %s: %d train / %d held-out pairs, global batch %d (%d rank(s) x %d), %d steps/epoch, "
                 "d = %s, aligner %s, %s on %s", self.run_id, len(loader.train_indices), len(loader.heldout_indices),
                 cfg.batch_size * world, world, cfg.batch_size, loader.steps_per_epoch, DISTANCE_NAMES[cfg.distance],
                 self.acfg.to_dict(), self.dtype, self.device)

    def _load_checkpoint(self) -> None:
        """Engine, f_ref, keeper, loader position and this rank's RNG from the checkpoint the pointer names."""
        tag = self.pointer.read_text().strip()
        ck = load_engine_checkpoint(self.engine, self.run_dir, tag)
        state = json.loads((ck / "state.json").read_text())
        self.ref.load_state_dict(load_file(str(ck / "reference" / "model.safetensors")))
        self.keeper.load_state_dict(state["keeper"])
        self.loader.load_state_dict(state["loader"])
        load_rng(ck / f"rng_rank{self.rank}.safetensors")
        self.start = int(state["step"])
        self.run_id = self.info["run_id"]
        log.info("resumed %s from %s (step %d)", self.run_id, tag, self.start)

    def _record_new_run(self) -> None:
        """A run id shared by every rank; rank 0 writes run.json (what a resume must match)."""
        self.run_id = new_run_id(self.run_dir, self.world)
        if self.rank != 0:
            return
        loader, cfg = self.loader, self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_json.write_text(json.dumps({
            "run_id": self.run_id, "fingerprint": self.fingerprint, "lake": str(self.lake), "profile": self.profile,
            "world_size": self.world, "features_version": loader.version, "pairs_version": loader.pairs_version,
            "dims": dataclasses.asdict(loader.dims),
            "aligner": self.acfg.to_dict(), "config": dataclasses.asdict(cfg),
            "train_pairs": int(len(loader.train_indices)), "heldout_pairs": int(len(loader.heldout_indices)),
            "global_batch": cfg.batch_size * self.world, "distance": cfg.distance,
        }, indent=2, sort_keys=True, default=str) + "\n")

    # ------------------------------------------------------------------ step and checkpoint
    def train(self) -> None:
        """step() from the restored step to ``steps``; checkpoint() every checkpoint_every steps and at the last."""
        self._t0 = self._win_t = time.perf_counter()
        self._win_steps = 0
        self.engine.train()
        it = iter(self.loader)
        try:
            with progress_bar(self.rank, "train", total=self.steps, completed=self.start) as advance:
                for step in range(self.start + 1, self.steps + 1):
                    self.step(step, next(it).to(self.device, self.dtype))
                    advance(step)
                    if step % self.cfg.checkpoint_every == 0 or step == self.steps:
                        self.checkpoint(step)
        finally:
            if hasattr(it, "close"):
                it.close()

    def step(self, step: int, batch: Batch) -> None:
        """Optimizer step ``step`` on a batch on the device: loss parts averaged over ranks, keeper, metrics, log."""
        _, parts = train_step(self.engine, self.ref, batch, self.cfg)
        vals = torch.stack([parts[n].float().cpu() for n in PART_NAMES])
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        self.last = dict(zip(PART_NAMES, vals.tolist()))
        copied = self.keeper.observe(self.last["d_win"], self.last["d_win_ref"])  # same decision on every rank
        if copied:
            copy_into_reference(self.engine.module, self.ref)
        self._win_steps += 1
        self._record(step, copied)

    def _record(self, step: int, copied: bool) -> None:
        """The step's metrics rows; every log_every steps (and at the last) samples/s and a log line."""
        last, metrics, cfg = self.last, self.metrics, self.cfg
        if metrics is not None:
            for n in PART_NAMES:
                metrics.add(step, n, last[n])
            if copied:
                metrics.add(step, "ref_copy", self.keeper.copies)
        if step % cfg.log_every == 0 or step == self.steps:
            dt = time.perf_counter() - self._win_t
            samples_per_s = self._win_steps * cfg.batch_size * self.world / max(dt, 1e-9)
            self._win_t, self._win_steps = time.perf_counter(), 0
            if metrics is not None:
                metrics.add(step, "samples_per_s", samples_per_s)
                log.info("step %d/%d loss %.5f (base %.5f pref %.5f) lr %.2e %.1f samples/s rss %.2f GB "
                         "ref copies %d", step, self.steps, last["loss"], last["loss_base"], last["loss_pref"],
                         self.engine.get_lr()[0], samples_per_s, rss_gb(), self.keeper.copies)

    def checkpoint(self, step: int) -> None:
        """Every rank's engine state and RNG, rank 0's f, f_ref and state.json; the pointer moves once all are durable."""
        tag = checkpoint_tag(step)
        ck = self.run_dir / "checkpoints" / tag
        if self.metrics is not None:
            self.metrics.flush()
        self.engine.save_checkpoint(str(self.run_dir / "checkpoints"), tag=tag)
        ck.mkdir(parents=True, exist_ok=True)
        save_rng(ck / f"rng_rank{self.rank}.safetensors")
        if self.rank == 0:
            _export(self.engine.module, self.acfg, ck / "aligner")
            _export(self.ref, self.acfg, ck / "reference")
            (ck / "state.json").write_text(json.dumps({"step": step, "keeper": self.keeper.state_dict(),
                                                        "loader": self.loader.state_dict(), "run_id": self.run_id},
                                                       indent=2))
        commit_checkpoint(self.run_dir, tag, self.cfg.keep_checkpoints, self.rank)  # fsync, barrier, pointer, prune

    # ------------------------------------------------------------------ evaluate and finish
    def evaluate(self) -> dict[str, float]:
        """The held-out figures of the trained aligner (``evaluate_heldout``), recorded at the last step."""
        heldout = evaluate_heldout(self.engine.module, self.loader, self.cfg, self.device, self.dtype, self.world)
        if self.metrics is not None:
            for n, v in heldout.items():
                self.metrics.add(max(self.steps, self.start), n, v)
            self.metrics.flush()
        return heldout

    def finish(self, heldout: dict[str, float]) -> TrainSummary:
        """The final fp32 aligner/ (rank 0 swaps it in whole) and the run's summary."""
        final_dir = self.run_dir / "aligner"
        if self.rank == 0:  # under a temporary name, then renamed: a reader never sees half an aligner
            run_folder.install_folder(final_dir, lambda tmp: _export(self.engine.module, self.acfg, tmp))
        dist.barrier()
        seconds = time.perf_counter() - self._t0
        done = max(self.steps - self.start, 0)
        return TrainSummary(run_id=self.run_id, steps=max(self.steps, self.start), resumed_from=self.start,
                            seconds=seconds,
                            samples_per_s=done * self.cfg.batch_size * self.world / max(seconds, 1e-9),
                            final_loss=self.last["loss"], ref_copies=self.keeper.copies, heldout=heldout,
                            aligner_dir=str(final_dir))


# ----------------------------------------------------------------------------- held-out evaluation
def _heldout_names(kinds: list[str], max_passes: int) -> list[str]:
    """The accumulators: step sums over all pairs, then pairs, d and MSE per pass for all pairs and each kind."""
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
    was_training = model.training
    model.eval()
    kinds = loader.heldout_kinds()
    max_passes = max(cfg.eval_passes, cfg.passes, 2)
    acc = HeldoutSums(_heldout_names([f"_{k}" for k in kinds], max_passes))
    for batch in loader.heldout_batches(max_pairs=cfg.eval_max_pairs):
        kind_of = [f"_{loader.kinds[p]}" if p in loader.kinds else None for p in batch.pair_ids]
        _add_heldout_batch(acc, model, batch.to(device, dtype), kind_of, cfg.distance, max_passes)
    acc.all_reduce(world)
    model.train(was_training)
    if acc["pairs"] == 0:
        log.warning("no held-out pairs (heldout_pairs=%s): skipping the held-out evaluation", cfg.heldout_pairs)
        return {}
    out = _heldout_figures(acc, kinds, max_passes)
    if dist.get_rank() == 0:
        _log_heldout(out, kinds, max_passes, cfg.distance)
    return out


def _add_heldout_batch(acc: HeldoutSums, model: torch.nn.Module, b: Batch, kind_of: list[str | None],
                       distance: str, max_passes: int) -> None:
    """Add one batch (on the device) to the sums: the first two passes' steps, then each pair in its groups."""
    d_id = sq_dist(b.winner, b.loser, distance)
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
    per_pass = [(sq_dist(b.winner, o, distance), sq_dist(b.winner, o, "mean")) for o in outs]
    for j in range(len(b)):
        for group in ("", kind_of[j]) if kind_of[j] is not None else ("",):
            acc.add(f"pairs{group}", 1.0)
            acc.add(f"d_identity{group}", d_id[j])
            acc.add(f"mse_identity{group}", mse_id[j])
            for p, (d_al, mse_al) in enumerate(per_pass, start=1):
                acc.add(f"d_aligned_{p}{group}", d_al[j])
                acc.add(f"mse_aligned_{p}{group}", mse_al[j])
                acc.add(f"win_{p}{group}", float(d_al[j] < d_id[j]))


def _heldout_figures(acc: HeldoutSums, kinds: list[str], max_passes: int) -> dict[str, float]:
    """The ``heldout_*`` metrics (see ``evaluate_heldout``) from the all-reduced sums."""
    n = acc["pairs"]
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
    return out


def _log_heldout(out: dict[str, float], kinds: list[str], max_passes: int, distance: str) -> None:
    """One line for all held-out pairs, one per broken kind."""
    log.info("held-out (%d pairs, d = %s): d_identity %.5g; d_aligned %s; win rate %s; step ratio %.3f",
             out["heldout_pairs"], DISTANCE_NAMES[distance], out["heldout_d_identity"],
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
