"""The eval job: base vs IMG images for sampled prompts, scored by PickScore / HPSv2, win rates with intervals.

    plan = plan_eval("prompts.txt", "lake", "tiny", ["tiny"], n=6)     # validates everything, writes nothing
    summary = run_eval(plan, EvalConfig())                              # Ray Data job + commits
    print(summary.render())

Steps. The prompt file is read in its published format into a prompt set; a
DuckDB query samples it (``img.eval.sampling``); every (prompt, seed) is a
*unit*. Ray Data runs, per unit: one generator actor pool (the profile's
``IMGPipeline``, the same code as ``img infer``: the base image, then for each
system its rounds of analysis -> alignment -> regeneration from that base
image, same seed) -> one actor pool per scorer -> a fragment writer. The
driver commits fragments of ``eval_images`` then ``scores``, and at the end
rewrites ``win_rates`` from ``scores`` if it changed.

Exactly once, resumable, with the embed job's protocol and helpers
(``img.lake.write_fragments`` / ``commit_fragments``): a unit is done when its
scores are in ``scores`` (all scorers and systems of a unit are committed in
one commit, the commit marker). On start, ``eval_images`` rows of units
without scores (a kill between the two commits) are deleted and redone; done
units are skipped. The run id is a hash of what defines the run, so the same
command finds its own run and adds nothing once it is complete.

Every write happens inside the lake's writer lock (``img.lake.lock.writer_lock``,
job ``eval``): a second writer on the same lake waits for this job to finish.

Systems. ``--aligner [NAME=]PATH`` (repeatable) makes one IMG system per
checkpoint, named ``img``, ``img2``, ... unless named; all share ``--passes``
and ``--rounds``. Without ``--aligner`` the tiny profiles use a fresh aligner
(the identity, as ``img infer`` does): IMG is then the base image regenerated
once with its own IP tokens at IP scale 0.2. Real profiles require ``--aligner``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from img.errors import UserError
from img.eval import winrates
from img.eval.prompts import PromptSet, load_prompt_set
from img.eval.sampling import Sample, sample_prompts
from img.eval.scorers import ScorerSpec, load_scorer, resolve_scorers, tiny_scorer_root
from img.finetune.adapter import with_mllm_adapter
from img.inference.generation import GenerationSettings, IMGPipeline, load_aligner, released_resampler
from img.lake import tables as lake_mod
from img.lake.lock import writer_lock
from img.models.loading import locate, quiet_loading
from img.models.profiles import get_profile
from img.models.tiny import tiny_dir
from pipelines.common import JobProgress, check_cluster_fits, check_ray_address, init_ray
from pipelines.eval_config import EvalConfig
from schemas import eval_images as eval_images_schema
from schemas import eval_runs as eval_runs_schema
from schemas import prompts as prompts_schema
from schemas import scores as scores_schema
from schemas.meta import read_provenance, with_provenance

log = logging.getLogger(__name__)

TABLES = {"prompts": prompts_schema, "eval_runs": eval_runs_schema, "eval_images": eval_images_schema,
          "scores": scores_schema}


def table_schema(name: str) -> pa.Schema:
    mod = TABLES[name]
    return with_provenance(mod.SCHEMA, table=name, version=mod.VERSION)


# ----------------------------------------------------------------------------- plan (validation, no writes)
@dataclass(frozen=True)
class System:
    """One IMG system: an aligner checkpoint with its passes and rounds."""

    name: str
    aligner: Optional[str]  # checkpoint path, or None for a fresh aligner (tiny profiles)
    aligner_id: str
    passes: int
    rounds: int


@dataclass
class EvalPlan:
    """Everything a run needs, validated; ``run`` is the hash of ``identity``."""

    lake: str
    profile: str
    prompt_set: PromptSet
    sample: Sample
    seeds: list[int]
    systems: list[System]
    settings: dict[str, Any]  # img.inference.generation.GenerationSettings as a dict
    scorers: list[ScorerSpec]
    identity: dict[str, Any]
    run: str
    resampler: Optional[str] = None
    mllm_adapter: Optional[str] = None  # a fine-tuned MLLM adapter folder (its id is in identity's model_ids)

    @property
    def units(self) -> list[dict[str, Any]]:
        prompts = dict(zip(self.prompt_set.table.column("prompt_id").to_pylist(),
                           self.prompt_set.table.column("prompt").to_pylist()))
        return [{"prompt_id": pid, "prompt": prompts[pid], "seed": seed}
                for pid in self.sample.prompt_ids for seed in self.seeds]

    def config_json(self) -> str:
        """The stored definition: the identity plus where things were found (paths do not define the run)."""
        extra = {"aligner_paths": {s.name: s.aligner for s in self.systems},
                 "scorer_files": {s.key: {"weights": s.weights, "processor": s.processor} for s in self.scorers},
                 "prompt_source": self.prompt_set.source, "prompt_format": self.prompt_set.format}
        return json.dumps({**self.identity, **extra}, sort_keys=True)


def parse_aligners(specs: list[str]) -> list[tuple[str, str]]:
    """``[NAME=]PATH`` values of ``--aligner`` -> (name, path); default names ``img``, ``img2``, ..."""
    out: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or not name:
            name, path = ("img" if i == 0 else f"img{i + 1}"), spec
        if name == "base" or not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"`aligner` {spec!r}: system name {name!r} is not allowed. Use letters, digits, '-' "
                            "or '_' (and not 'base').")
        if not path.strip():
            raise UserError(f"`aligner` {spec!r} has no path. Pass `aligner` as PATH or NAME=PATH.")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"`aligner` names must differ, got {names}. Name them: a=PATH, b=PATH.")
    return out


def _check_lake(lake: str, prompt_set: PromptSet, storage_options: Optional[dict]) -> None:
    """The lake is writable, its eval tables have this schema version, and the prompt set is not changed."""
    if lake_mod.is_local(lake):
        p = Path(lake.removeprefix("file://"))
        if p.exists() and not p.is_dir():
            raise UserError(f"`lake` {lake!r} exists and is not a folder. Pass a lake folder.")
        anchor = p
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
        if not os.access(anchor, os.W_OK):
            raise UserError(f"`lake` {lake!r} is not writable ({anchor} is read-only). Pass a folder you can write to.")
    for name in (*TABLES, "win_rates"):
        ds = lake_mod.open_table(lake, name, storage_options)
        if ds is None:
            continue
        want = TABLES[name].VERSION if name in TABLES else winrates.win_rates_schema.VERSION
        have = read_provenance(ds.schema)["schema_version"]
        if have != want:
            raise UserError(f"{lake_mod.table_uri(lake, name)} has schema v{have}, this img writes v{want}. "
                            "Use another `lake`, or move the old table away.")
    existing = _stored_set(lake, prompt_set.name, storage_options)
    if existing is not None and existing != _set_rows(prompt_set.table):
        raise UserError(f"prompt set {prompt_set.name!r} in {lake} holds other prompts than {prompt_set.source} "
                        f"({len(existing)} stored, {len(prompt_set)} in the file). A set never changes once loaded: "
                        "pass a new `set_name` for these prompts.")


def _set_rows(table: pa.Table) -> dict[str, tuple[str, str]]:
    return {r["prompt_id"]: (r["prompt"], r["category"]) for r in table.to_pylist()}


def _stored_set(lake: str, name: str, storage_options: Optional[dict]) -> Optional[dict[str, tuple[str, str]]]:
    ds = lake_mod.open_table(lake, "prompts", storage_options)
    if ds is None:
        return None
    table = ds.to_table(filter=f"set = {lake_mod.sql_str(name)}")
    return _set_rows(table) if table.num_rows else None


def plan_eval(prompts: str | Path, lake: str, profile: str, scorers: list[str], *, n: Optional[int] = None,
              seed: int = 0, where: Optional[str] = None, sample_sql: Optional[str | Path] = None,
              prompt_format: Optional[str] = None, set_name: Optional[str] = None,
              aligners: Optional[list[str]] = None, seeds: int = 1, rounds: int = 1,
              settings: Optional[GenerationSettings] = None, storage_options: Optional[dict] = None,
              mllm_adapter: Optional[str | Path] = None) -> EvalPlan:
    """Check every input (scorers first: a missing one fails in well under a second) and fix the run's identity.

    ``settings``: the generation settings (None fields, or None: the profile's). Nothing is written. Raises
    ``UserError`` naming the value and the fix.
    """
    specs = resolve_scorers(scorers)  # before importing torch: a missing scorer fails in well under a second

    prof = with_mllm_adapter(get_profile(profile), mllm_adapter)  # a fine-tuned MLLM (img jobs finetune-mllm)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"seeds must be >= 1, got {seeds!r}. Set seeds in the eval TOML (1 is the default).")
    if rounds < 1:
        raise UserError(f"`rounds` must be >= 1 for an eval (round 0 is the base image), got {rounds}.")
    settings = (settings or GenerationSettings()).resolve(prof)
    prompt_set = load_prompt_set(prompts, prompt_format, set_name)
    sql_text = None
    if sample_sql is not None:
        path = Path(sample_sql).expanduser()
        if not path.is_file():
            raise UserError(f"`sample_sql` {str(path)!r} is not a file. Pass a file holding one SELECT over prompts.")
        sql_text = path.read_text(encoding="utf-8")
    sample = sample_prompts(prompt_set.table, n=n, seed=seed, where=where, sample_sql=sql_text)
    named = parse_aligners(aligners or [])
    if not named:
        load_aligner(prof, None)  # tiny: fine (fresh aligner); real profiles: "pass --aligner"
    for comp in prof.components():
        locate(prof, comp)  # ModelNotFound names the variable to set
    systems: list[System] = []
    if not named:
        systems.append(System("img", None, "fresh", settings.passes, rounds))
    for name, path in named:
        _, aid = load_aligner(prof, path)
        systems.append(System(name, str(Path(path).expanduser().absolute()), aid, settings.passes, rounds))
    found = released_resampler(named[0][1], prof) if named else None
    resampler = str(found.absolute()) if found is not None else None
    lake = os.path.abspath(lake) if lake_mod.is_local(lake) else lake
    _check_lake(lake, prompt_set, storage_options)
    models = prof.model_ids()
    if prof.tiny:

        models["tiny_build"] = tiny_dir(prof.tiny).name
    identity = {
        "set": prompt_set.name, "set_fingerprint": prompt_set.fingerprint(), "sample_sql": sample.sql,
        "prompt_ids": sample.prompt_ids, "seeds": list(range(seeds)), "profile": prof.name, "model_ids": models,
        "systems": [{"name": s.name, "aligner_id": s.aligner_id, "passes": s.passes, "rounds": s.rounds}
                    for s in systems],
        "settings": asdict(settings), "scorers": [{"name": s.name, "version": s.version} for s in specs],
        "resampler": hashlib.sha256(Path(resampler).read_bytes()).hexdigest()[:16] if resampler else None,
    }
    run = "eval-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return EvalPlan(lake=lake, profile=prof.name, prompt_set=prompt_set, sample=sample, seeds=list(range(seeds)),
                    systems=systems, settings=asdict(settings), scorers=specs, identity=identity, run=run,
                    resampler=resampler, mllm_adapter=prof.mllm_adapter)


# ----------------------------------------------------------------------------- Ray stages
def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _device(device: str, num_gpus: float) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() and num_gpus > 0 else "cpu"
    return device


class Generate:
    """The profile's ``IMGPipeline`` (the code ``img infer`` runs): per unit, the base image and each system's
    final regeneration from it, same prompt and seed, as PNG bytes."""

    def __init__(self, profile: str, systems_json: str, settings_json: str, resampler: Optional[str],
                 device: str, num_gpus: float, threads: int, mllm_adapter: Optional[str] = None) -> None:
        import torch


        torch.set_num_threads(max(1, threads))
        quiet_loading()
        prof = with_mllm_adapter(get_profile(profile), mllm_adapter)
        self.systems = [System(**s) for s in json.loads(systems_json)]
        self.settings = GenerationSettings(**json.loads(settings_json))
        self.aligners = []
        for s in self.systems:
            model, aid = load_aligner(prof, s.aligner)
            if aid != s.aligner_id:
                raise RuntimeError(f"aligner {s.aligner} changed since the run was planned ({s.aligner_id} -> {aid})")
            self.aligners.append((model, aid))
        self.pipe = IMGPipeline.from_profile(prof, aligner=self.aligners[0][0], aligner_id=self.aligners[0][1],
                                             device=_device(device, num_gpus), resampler=resampler)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["prompt_id"])
        k = 1 + len(self.systems)
        png = [[b""] * n for _ in range(k)]
        secs = np.zeros((k, n))
        questions = [[""] * n for _ in range(k)]
        sizes = np.zeros((k, n, 2), np.int32)
        for j in range(n):
            prompt, seed = str(batch["prompt"][j]), int(batch["seed"][j])
            t0 = time.perf_counter()
            base = self.pipe.generate_base(prompt, seed, self.settings)
            secs[0, j] = time.perf_counter() - t0
            images = [base]
            for i, (system, (model, aid)) in enumerate(zip(self.systems, self.aligners), start=1):
                self.pipe.set_aligner(model, aid)
                t0 = time.perf_counter()
                rounds = self.pipe.refine(prompt, base, seed, system.rounds,
                                          dataclasses.replace(self.settings, passes=system.passes))
                secs[i, j] = time.perf_counter() - t0
                questions[i][j] = rounds[-1].question
                images.append(rounds[-1].image)
            for i, im in enumerate(images):
                png[i][j] = png_bytes(im)
                sizes[i, j] = im.size
        out = dict(batch)
        for i in range(k):
            out[f"png_{i}"] = _objects(png[i])
            out[f"sec_{i}"] = secs[i]
            out[f"q_{i}"] = _objects(questions[i])
            out[f"w_{i}"], out[f"h_{i}"] = sizes[i, :, 0], sizes[i, :, 1]
        return out


def _objects(items: list[Any]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


class Score:
    """One scorer (``img.eval.scorers``) over every image of every unit: ``score_<scorer>_<image>`` columns."""

    def __init__(self, spec_json: str, index: int, images: int, device: str, num_gpus: float, threads: int) -> None:
        import torch


        torch.set_num_threads(max(1, threads))
        self.index, self.images = index, images
        self.scorer = load_scorer(ScorerSpec.from_json(spec_json), _device(device, num_gpus))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["prompt_id"])
        groups = [[Image.open(io.BytesIO(batch[f"png_{i}"][j])) for i in range(self.images)] for j in range(n)]
        scores = self.scorer.score([str(p) for p in batch["prompt"]], groups)
        out = dict(batch)
        for i in range(self.images):
            out[f"score_{self.index}_{i}"] = np.array([s[i] for s in scores], dtype=np.float64)
        return out


class WriteFragments:
    """Write a batch of whole units as uncommitted fragments of ``eval_images`` and ``scores``."""

    def __init__(self, lake: str, run: str, systems_json: str, scorers_json: str, storage_options: dict) -> None:
        self.lake, self.run, self.storage_options = lake, run, storage_options or None
        self.systems = [System(**s) for s in json.loads(systems_json)]
        self.scorers = [ScorerSpec.from_json(s) for s in json.loads(scorers_json)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["prompt_id"])
        names = ["base"] + [s.name for s in self.systems]
        images, scores = [], []
        for j in range(n):
            pid, seed = str(batch["prompt_id"][j]), int(batch["seed"][j])
            for i, name in enumerate(names):
                system = self.systems[i - 1] if i else None
                images.append({
                    "run": self.run, "prompt_id": pid, "seed": seed, "system": name,
                    "aligner_id": system.aligner_id if system else "", "rounds": system.rounds if system else 0,
                    "passes": system.passes if system else 0, "question": str(batch[f"q_{i}"][j]),
                    "width": int(batch[f"w_{i}"][j]), "height": int(batch[f"h_{i}"][j]),
                    "seconds": float(batch[f"sec_{i}"][j]), "png": bytes(batch[f"png_{i}"][j]),
                })
                for k, spec in enumerate(self.scorers):
                    scores.append({"run": self.run, "prompt_id": pid, "system": name, "seed": seed,
                                   "scorer": spec.name, "scorer_version": spec.version,
                                   "score": float(batch[f"score_{k}_{i}"][j])})
        out: dict[str, np.ndarray] = {}
        for name, rows in (("eval_images", images), ("scores", scores)):
            schema = table_schema(name)
            frags = lake_mod.write_fragments(self.lake, name, pa.Table.from_pylist(rows, schema=schema), schema,
                                             self.storage_options)
            out[name] = np.array([json.dumps(frags)], dtype=object)
        out["units"] = np.array([n])
        out["gen_seconds"] = np.array([float(sum(np.sum(batch[f"sec_{i}"]) for i in range(len(names))))])
        return out


# ----------------------------------------------------------------------------- driver
@dataclass
class EvalSummary:
    run: str
    set: str
    prompts: int
    seeds: int
    systems: list[str]
    scorers: list[str]
    units: int
    skipped_done: int = 0
    generated: int = 0
    orphans_redone: int = 0
    win_rates_written: bool = False
    seconds: float = 0.0
    gen_seconds: float = 0.0
    win_rates: list[dict] = field(default_factory=list)

    def render(self) -> str:
        head = (f"eval {self.run}: set {self.set!r}, {self.prompts} prompt(s) x {self.seeds} seed(s); systems "
                f"{', '.join(self.systems)} vs base; scorers {', '.join(self.scorers)}\n"
                f"{self.generated} unit(s) generated and scored, {self.skipped_done} skipped as already done, "
                f"{self.orphans_redone} redone after an interrupted commit; {self.seconds:.1f}s "
                f"({self.gen_seconds:.1f}s generating); "
                f"win_rates {'updated' if self.win_rates_written else 'unchanged'}")
        return head + "\n\n" + winrates.render(self.win_rates)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _unit_filter(run: str, units: list[tuple[str, int]]) -> str:
    ors = " OR ".join(f"(prompt_id = {lake_mod.sql_str(p)} AND seed = {int(s)})" for p, s in units)
    return f"run = {lake_mod.sql_str(run)} AND ({ors})"


def reconcile(lake: str, run: str, storage_options: Optional[dict]) -> tuple[set[tuple[str, int]], int]:
    """Delete ``eval_images`` rows of units without scores (a kill between commits); return the done units."""
    scores = lake_mod.open_table(lake, "scores", storage_options)
    t = scores.to_table(columns=["prompt_id", "seed"], filter=f"run = {lake_mod.sql_str(run)}")
    done = set(zip(t.column("prompt_id").to_pylist(), t.column("seed").to_pylist()))
    images = lake_mod.open_table(lake, "eval_images", storage_options)
    t = images.to_table(columns=["prompt_id", "seed"], filter=f"run = {lake_mod.sql_str(run)}")
    orphans = sorted(set(zip(t.column("prompt_id").to_pylist(), t.column("seed").to_pylist())) - done)
    for i in range(0, len(orphans), 200):
        images.delete(_unit_filter(run, orphans[i: i + 200]))
    if orphans:
        log.info("removed eval_images of %d unit(s) from an interrupted commit; they will be redone", len(orphans))
    return done, len(orphans)


def record_prompts_and_run(plan: EvalPlan, storage_options: Optional[dict]) -> None:
    """Append the prompt set (if new) and the run's ``eval_runs`` rows (if new), one commit each."""
    lake = plan.lake
    stored = _stored_set(lake, plan.prompt_set.name, storage_options)
    if stored is None:
        lake_mod.append_rows(lake, "prompts", plan.prompt_set.table, table_schema("prompts"), storage_options)
    elif stored != _set_rows(plan.prompt_set.table):  # loaded by another writer since the plan was made
        raise UserError(f"prompt set {plan.prompt_set.name!r} in {lake} now holds other prompts than "
                        f"{plan.prompt_set.source}. Pass a new `set_name` for these prompts.")
    runs = lake_mod.open_table(lake, "eval_runs", storage_options)
    if runs.count_rows(filter=f"run = {lake_mod.sql_str(plan.run)}") == 0:
        now = datetime.now(timezone.utc)
        rows = [{"run": plan.run, "set": plan.prompt_set.name, "prompt_id": pid, "category": cat, "rank": i,
                 "sample_sql": plan.sample.sql, "config": plan.config_json(), "created_at": now}
                for i, (pid, cat) in enumerate(zip(plan.sample.prompt_ids, plan.sample.categories))]
        schema = table_schema("eval_runs")
        lake_mod.append_rows(lake, "eval_runs", pa.Table.from_pylist(rows, schema=schema), schema, storage_options)


def check_reservations(cfg: EvalConfig, n_scorers: int) -> None:
    """Refuse a plan whose actors reserve more CPUs/GPUs than the Ray cluster has (it would stall, not fail)."""
    pools = [cfg.generate] + [cfg.scorer] * n_scorers
    check_cluster_fits("eval", pools, cfg.writer_cpus, f"writer {cfg.writer_cpus:g}", "[generate]/[scorer]")


def build_dataset(units: list[dict], plan: EvalPlan, cfg: EvalConfig):
    """The Ray Data plan: units -> generator actors -> one scorer pool per scorer -> fragment writer."""
    import ray

    systems_json = json.dumps([asdict(s) for s in plan.systems])
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    g = cfg.generate
    ds = ds.map_batches(Generate, batch_size=g.batch_size, num_cpus=g.num_cpus, num_gpus=g.num_gpus or None,
                        compute=ray.data.ActorPoolStrategy(size=g.concurrency),
                        fn_constructor_args=(plan.profile, systems_json, json.dumps(plan.settings), plan.resampler,
                                             cfg.device, g.num_gpus, g.threads, plan.mllm_adapter))
    sc = cfg.scorer
    for k, spec in enumerate(plan.scorers):
        ds = ds.map_batches(Score, batch_size=sc.batch_size, num_cpus=sc.num_cpus, num_gpus=sc.num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(size=sc.concurrency),
                            fn_constructor_args=(spec.to_json(), k, 1 + len(plan.systems), cfg.device, sc.num_gpus,
                                                 sc.threads))
    ds = ds.map_batches(WriteFragments, batch_size=cfg.units_per_fragment, num_cpus=cfg.writer_cpus,
                        compute=ray.data.ActorPoolStrategy(size=1),
                        fn_constructor_args=(plan.lake, plan.run, systems_json,
                                             json.dumps([s.to_json() for s in plan.scorers]), cfg.storage_options))
    return ds


def run_eval(plan: EvalPlan, cfg: EvalConfig, progress: bool = True) -> EvalSummary:
    """Generate, score and commit every unit of ``plan`` not yet done, then refresh ``win_rates``."""
    t_start = time.perf_counter()
    so = cfg.storage_options or None
    if cfg.units_per_fragment < 1:
        raise UserError(f"units_per_fragment must be >= 1, got {cfg.units_per_fragment}. Fix the eval TOML.")
    check_ray_address()  # before the lake is touched
    units = plan.units
    summary = EvalSummary(run=plan.run, set=plan.prompt_set.name, prompts=len(plan.sample.prompt_ids),
                          seeds=len(plan.seeds), systems=[s.name for s in plan.systems],
                          scorers=[s.key for s in plan.scorers], units=len(units))
    if any(s.version.startswith("tiny-") for s in plan.scorers):

        tiny_scorer_root()  # build once here, not in every scorer actor at once
    with writer_lock(plan.lake, job="eval", storage_options=so):
        if lake_mod.is_local(plan.lake):
            os.makedirs(plan.lake, exist_ok=True)
        for name in TABLES:
            lake_mod.ensure_table(plan.lake, name, table_schema(name), storage_options=so)
        record_prompts_and_run(plan, so)
        done, summary.orphans_redone = reconcile(plan.lake, plan.run, so)
        todo = [u for u in units if (u["prompt_id"], u["seed"]) not in done]
        summary.skipped_done = len(units) - len(todo)
        log.info("eval %s: %d unit(s), %d already done, %d to generate", plan.run, len(units), summary.skipped_done,
                 len(todo))
        if todo:
            init_ray()
            check_reservations(cfg, len(plan.scorers))
            ds = build_dataset(todo, plan, cfg)
            with JobProgress(len(todo), enabled=progress, label="eval", unit="units") as bar:
                for row in ds.iter_rows():
                    for name in ("eval_images", "scores"):  # scores is the commit marker
                        lake_mod.commit_fragments(plan.lake, name, json.loads(row[name]), so)
                    log.debug("committed %d unit(s)", int(row["units"]))
                    summary.generated += int(row["units"])
                    summary.gen_seconds += float(row["gen_seconds"])
                    bar.advance(int(row["units"]))
        summary.win_rates_written = winrates.write_win_rates(plan.lake, so)
    summary.win_rates = winrates.read_win_rates(plan.lake, plan.run, so)
    summary.seconds = time.perf_counter() - t_start
    return summary
