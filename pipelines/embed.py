"""The embed job: every decisive Pick-a-Pic pair, embedded once into Lance.

    read row groups -> orient (winner, loser), drop ties -> full decode -> IP tokens actors
      -> MLLM guidance actors [-> text guidance actors] -> fragment writer tasks -> driver commits

Exactly once, resumable: workers write Lance *fragments* (invisible until
committed) and return their small metadata; the driver commits them per table
in the order features -> pairs -> quarantine. A pair is done when its
``pair_id`` is in ``pairs`` or ``quarantine``. On start, ``features`` rows whose
pair is not in ``pairs`` (a kill between the two commits) are deleted and
redone, so after any SIGKILL the same command finishes with every good pair
present exactly once. The whole run holds the lake's writer lock
(``img.lake.lock``), so a second embed on the same lake waits instead of
planning the same pairs or reconciling between this run's commits.

    summary = run_embed("data/sample", "lake", "tiny", EmbedConfig())

The stages are callable classes so the tiny profile runs the same code as the
real one; read, decode and the fragment writers are in ``pipelines/embed_io.py``
(no torch import). Ray starts embedded unless ``RAY_ADDRESS`` points at a cluster.
``summary.startup`` splits the start-up: Ray, per actor process when Ray Data
created it, its imports and model load, and the first batch.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from img import fp8
from img.config import fingerprint
from img.errors import UserError
from img.features import GuidanceEncoder, IPTokenEncoder, TextGuidanceEncoder
from img.finetune.adapter import with_mllm_adapter
from img.lake import tables as lake_mod
from img.lake.lock import writer_lock
from img.models.profiles import get_profile
from img.models.tiny import tiny_dir
from img.paths import check_lake_folder
from img.questions import questions_id, resolve_questions
from pipelines.common import JobProgress, check_cluster_fits, check_ray_address, init_ray
from pipelines.embed_config import EmbedConfig, ModelPool
from pipelines.embed_io import (  # noqa: F401 (Decode, read_unit(s) are re-exported for callers of this module)
    TIMERS,
    Decode,
    WriteFragments,
    _ragged,
    read_and_decode,
    read_unit,
    read_units,
    startup_record,
)
from pipelines.source import check_limit, list_shards, plan_units
from schemas import features as features_schema
from schemas import pairs as pairs_schema
from schemas import quarantine as quarantine_schema
from schemas.meta import with_provenance

log = logging.getLogger(__name__)
IMPORTED_AT = time.time()  # this module's imports are done (torch etc. for the model stages): the start-up split


def _to_storage(t, dtype: str) -> np.ndarray:
    """A torch tensor as 2-byte words in the profile's storage dtype (bf16 is bit-cast into fp16 slots)."""
    import torch

    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.float16)
    return t.to(torch.float16).contiguous().numpy()


def _unpadded(column: str, hidden: list, idx: np.ndarray, n: int, dtype: str,
              guidance_dtype: str = "fp16") -> dict[str, np.ndarray]:
    """Per-row (L_i, E) tensors as blob bytes in ``column`` plus their lengths; rows not in ``idx`` stay empty.

    ``guidance_dtype="fp8"``: the blob holds float8 e4m3 bytes and ``<column>_scale`` one float32 scale per token.
    """
    blobs = [b""] * n
    lens = np.zeros(n, np.int32)
    scales = [np.zeros(0, np.float32)] * n if guidance_dtype == "fp8" else None
    for i, h in zip(idx, hidden):
        if scales is not None:
            q, scale = fp8.quantize(h)
            blobs[i], scales[i] = q.numpy().tobytes(), scale.numpy()
        else:
            blobs[i] = _to_storage(h, dtype).tobytes()
        lens[i] = h.shape[0]
    out = {column: _ragged(blobs), f"{column}_len": lens}
    if scales is not None:
        out[f"{column}_scale"] = _ragged(scales)
    return out


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(arr, dtype=np.uint8))


def add_startup(batch: dict[str, np.ndarray], out: dict[str, np.ndarray], entry: dict | None) -> None:
    """Carry the ``startup`` column (JSON lists of stage start-up records) and add ``entry`` to its first row."""
    n = len(out["pair_id"])
    col = np.array(batch["startup"], dtype=object) if "startup" in batch else np.array([""] * n, dtype=object)
    if entry is not None and n:
        col[0] = json.dumps((json.loads(col[0]) if col[0] else []) + [entry])
    out["startup"] = col


class _ModelStage:
    """Base of the model actors: loads its encoder once per actor, runs only on good rows.

    Each actor records its start-up (process start -> ``__init__`` = spawn and imports; ``__init__`` = model
    load) and sends it once, in the ``startup`` column, to the driver's start-up split. Safe to call from
    several threads at once (the pool's ``calls``): each call sets its own thread's torch thread count.
    """

    timer = ""
    name = ""  # in the start-up split (Ray Data may wrap the class, so not type(self).__name__)

    def __init__(self, profile_name: str, device: str = "auto", threads: int = 0, guidance_dtype: str = "fp16",
                 batch_size: int = 0, mllm_adapter: str | None = None, mllm_adapter_id: str = ""):
        t_init = time.time()
        import torch

        self.threads = threads
        if threads:
            torch.set_num_threads(threads)  # one actor per core share; Ray's OMP default may differ
        self._startup_lock = threading.Lock()
        self.profile = with_mllm_adapter(get_profile(profile_name), mllm_adapter)
        if mllm_adapter and self.profile.mllm_adapter_id != mllm_adapter_id:  # the driver's fingerprint names this id
            raise UserError(f"the MLLM adapter {mllm_adapter!r} changed since the embed job started "
                            f"({mllm_adapter_id} -> {self.profile.mllm_adapter_id}). Re-run the job.")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.guidance_dtype, self.batch_size = guidance_dtype, batch_size
        self.encoder = self.load()
        self.startup: dict | None = startup_record(self.name, IMPORTED_AT, t_init)

    def load(self):
        raise NotImplementedError

    def compute(self, batch: dict[str, np.ndarray], good: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        if self.threads:
            import torch

            # per calling thread: Ray may run this call on a thread other than __init__'s (always with
            # ``calls`` > 1). There torch.get_num_threads() already says 1, yet a matmul used 1.97 cores
            # until the thread set it itself (torch 2.13, measured)
            torch.set_num_threads(self.threads)
        good = np.array([e == "" for e in batch["error"]], dtype=bool)
        out = dict(batch)
        out.update(self.compute(batch, good))
        out[self.timer] = np.full(len(good), (time.perf_counter() - t0) / max(len(good), 1))
        with self._startup_lock:  # sent once, even when calls run side by side
            entry, self.startup = self.startup, None
        add_startup(batch, out, entry)
        return out


class IPTokens(_ModelStage):
    """IP-Adapter image tokens (penultimate CLIP states -> resampler -> N x D) of winner and loser."""

    timer = "t_ip"
    name = "IPTokens"

    def load(self):
        return IPTokenEncoder(self.profile, device=self.device)

    def compute(self, batch, good):
        d = self.profile.dims
        n = len(good)
        width = d.ip_tokens * d.ip_dim
        win = np.zeros((n, width), np.float16)
        lose = np.zeros((n, width), np.float16)
        idx = np.flatnonzero(good)
        if len(idx):
            images = [_pil(batch["winner_image"][i]) for i in idx] + [_pil(batch["loser_image"][i]) for i in idx]
            tokens = self.encoder(images).reshape(len(images), width)
            tokens = _to_storage(tokens, self.profile.tensor_dtype)
            win[idx], lose[idx] = tokens[: len(idx)], tokens[len(idx):]
        return {"winner_tokens": win, "loser_tokens": lose}


class Guidance(_ModelStage):
    """MLLM last-layer hidden states over (loser image + question), unpadded, with their length.

    ``guidance_dtype="fp8"`` stores them as float8 e4m3 with one scale per token (``img.fp8``);
    ``batch_size`` > 0 runs the MLLM on chunks of that many rows (used when it shares an actor).
    """

    timer = "t_mllm"
    name = "Guidance"

    def load(self):
        return GuidanceEncoder(self.profile, device=self.device)

    def compute(self, batch, good):
        idx = np.flatnonzero(good)
        step = self.batch_size or max(len(idx), 1)
        hidden = []
        for s in range(0, len(idx), step):
            part = idx[s: s + step]
            hidden += self.encoder([_pil(batch["loser_image"][i]) for i in part],
                                   [str(batch["question"][i]) for i in part])
        return _unpadded("guidance", hidden, idx, len(good), self.profile.tensor_dtype, self.guidance_dtype)


class TextGuidance(_ModelStage):
    """The diffusion text encoders' caption embeddings (for the text-only guidance ablation; always 16-bit)."""

    timer = "t_text"
    name = "TextGuidance"

    def load(self):
        return TextGuidanceEncoder(self.profile, device=self.device)

    def compute(self, batch, good):
        idx = np.flatnonzero(good)
        hidden = self.encoder([str(batch["caption"][i]) for i in idx]) if len(idx) else []
        return _unpadded("text_guidance", hidden, idx, len(good), self.profile.tensor_dtype)


class FusedModels:
    """IP tokens, then guidance, in one actor (``fuse_models``): one process imports torch and holds both models.

    The guidance runs in chunks of ``mllm_batch_size`` rows of each (IP-sized) batch.
    """

    def __init__(self, profile_name: str, device: str = "auto", threads: int = 0, guidance_dtype: str = "fp16",
                 mllm_batch_size: int = 0, mllm_adapter: str | None = None, mllm_adapter_id: str = ""):
        adapter = {"mllm_adapter": mllm_adapter, "mllm_adapter_id": mllm_adapter_id}
        self.stages = [IPTokens(profile_name, device, threads, **adapter),
                       Guidance(profile_name, device, threads, guidance_dtype, mllm_batch_size, **adapter)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            batch = stage(batch)
        return batch


# ----------------------------------------------------------------------------- driver
@dataclass
class EmbedSummary:
    written: int = 0
    quarantined: int = 0
    unreadable: int = 0  # of the quarantined: rows (or whole shards) whose parquet data could not be read
    skipped_done: int = 0
    skipped_ties: int = 0
    orphans_redone: int = 0
    seconds: float = 0.0
    first_commit_seconds: float = 0.0  # start-up: planning, Ray actors, model loading, first batch
    first_commit_pairs: int = 0
    bytes_per_pair: float = 0.0
    tensor_bytes_per_pair: float = 0.0
    time_split: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""
    # start-up split (seconds from the job's start): ray_init, plan, and per actor process
    # {stage, pid, spawn_at, scheduled_at, imports_s, load_s, ready_at}; first_batch_s = first commit - last actor
    # ready
    startup: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        split = ", ".join(f"{k[2:]} {v:.1f}s" for k, v in self.time_split.items() if v > 0 and k.startswith("t_"))
        damaged = f" ({self.unreadable} unreadable input)" if self.unreadable else ""
        return (f"embed done in {self.seconds:.1f}s: {self.written} pairs written, {self.quarantined} quarantined{damaged}, "
                f"{self.skipped_done} skipped as already done, {self.skipped_ties} ties dropped; "
                f"{self.bytes_per_pair / 1e3:.1f} kB/pair on disk ({self.tensor_bytes_per_pair / 1e3:.1f} kB raw tensors); "
                f"stage time (summed over workers): {split}; fingerprint {self.fingerprint}")


def table_schemas(profile, cfg: EmbedConfig, fp: str) -> dict[str, pa.Schema]:
    """The three tables' schemas with provenance (schema version, model ids, fingerprint)."""
    d = profile.dims
    ids = profile.model_ids()
    extra = {"ip_tokens": d.ip_tokens, "ip_dim": d.ip_dim, "guidance_dim": d.mllm_hidden,
             "dtype": profile.tensor_dtype, "profile": profile.name}
    if cfg.text_guidance:
        extra["text_guidance_dim"] = profile.text_guidance_dim()
    if cfg.guidance_dtype == "fp8":
        extra["guidance_dtype"] = features_schema.FP8  # the loader dequantises with guidance_scale
    return {
        "features": with_provenance(features_schema.schema(d.ip_tokens, d.ip_dim, cfg.text_guidance,
                                                           cfg.guidance_dtype),
                                    table="features", version=features_schema.VERSION, model_ids=ids,
                                    fingerprint=fp, extra=extra),
        "pairs": with_provenance(pairs_schema.SCHEMA, table="pairs", version=pairs_schema.VERSION,
                                 model_ids=ids, fingerprint=fp, extra={"profile": profile.name}),
        "quarantine": with_provenance(quarantine_schema.SCHEMA, table="quarantine",
                                      version=quarantine_schema.VERSION, model_ids=ids, fingerprint=fp),
    }


def embed_fingerprint(profile, cfg: EmbedConfig, questions: Sequence[str] | None = None) -> str:
    """Hash of everything that decides the stored tensors: settings, models, dtype, the MLLM's conversation
    template and image mode, and the question pool's content (``questions``: the loaded ``cfg.questions``).

    The guidance dtype enters as its own key when it is fp8, so fp16 lakes keep the fingerprint they had
    before the option existed (and can still be extended)."""
    import hashlib

    base = fingerprint(cfg, exclude=EmbedConfig.RUN_KNOBS + EmbedConfig.CONTENT_KEYS + ("guidance_dtype",))
    models = profile.model_ids()
    if profile.tiny:  # tiny models are built in code: their build (version + recipe hash) is their identity
        models = {**models, "tiny_build": tiny_dir(profile.tiny).name}
    parts = {"cfg": base, "profile": profile.name, "models": models,
             "dtype": profile.tensor_dtype, "mllm_template": profile.mllm_template,
             "mllm_image": profile.mllm_image, "questions": questions_id(questions)}
    if cfg.guidance_dtype != "fp16":
        parts["guidance_dtype"] = cfg.guidance_dtype
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reconcile(lake: str, storage_options) -> tuple[set[str], int]:
    """Delete ``features`` rows whose pair never reached ``pairs`` (a kill between commits); return done ids."""
    feats = lake_mod.open_table(lake, "features", storage_options)
    pairs = set(lake_mod.column_values(lake_mod.open_table(lake, "pairs", storage_options), "pair_id"))
    quarantined = set(lake_mod.column_values(lake_mod.open_table(lake, "quarantine", storage_options), "pair_id"))
    orphans = [p for p in lake_mod.column_values(feats, "pair_id") if p not in pairs]
    if orphans:
        log.info("removing %d features rows from an interrupted commit; they will be redone", len(orphans))
        for i in range(0, len(orphans), 1000):
            chunk = orphans[i: i + 1000]
            feats.delete("pair_id IN (" + ", ".join(lake_mod.sql_str(p) for p in chunk) + ")")
    return pairs | quarantined, len(orphans)


def check_reservations(cfg: EmbedConfig) -> None:
    """Refuse a plan whose actors reserve more CPUs/GPUs than the cluster has (it would stall, not fail)."""
    check_cluster_fits("embed", model_pools(cfg), (1 + cfg.writers) * cfg.decode_cpus,
                       f"decode + {cfg.writers} writer(s) x {cfg.decode_cpus:g}", "[ip]/[mllm]/[text]")


def model_plan(cfg: EmbedConfig, classes: dict[str, type] | None = None) -> list[tuple[type, ModelPool, dict]]:
    """The model actor pools as (stage class, pool settings, constructor kwargs), in pipeline order.

    ``classes`` replaces stage classes by role ("ip", "mllm", "text", "fused"), e.g. with the stand-ins of
    ``img bench embed --row-size real``, which keep the pipeline and change only what computes the tensors.
    """
    c = {"ip": IPTokens, "mllm": Guidance, "text": TextGuidance, "fused": FusedModels, **(classes or {})}
    if cfg.fuse_models:
        pool = ModelPool(batch_size=cfg.ip.batch_size, concurrency=cfg.mllm.concurrency, calls=cfg.mllm.calls,
                         num_gpus=max(cfg.ip.num_gpus, cfg.mllm.num_gpus), num_cpus=cfg.ip.num_cpus + cfg.mllm.num_cpus)
        plan = [(c["fused"], pool, {"guidance_dtype": cfg.guidance_dtype, "mllm_batch_size": cfg.mllm.batch_size})]
    else:
        plan = [(c["ip"], cfg.ip, {}), (c["mllm"], cfg.mllm, {"guidance_dtype": cfg.guidance_dtype})]
    if cfg.text_guidance:
        plan.append((c["text"], cfg.text, {}))
    return plan


def model_pools(cfg: EmbedConfig) -> list[ModelPool]:
    return [pool for _, pool, _ in model_plan(cfg)]


def build_dataset(units: list[dict], lake: str, profile_name: str, cfg: EmbedConfig, schemas: dict[str, pa.Schema],
                  questions: Sequence[str] | None = None, mllm_adapter: str | None = None,
                  mllm_adapter_id: str = "", classes: dict[str, type] | None = None):
    """The Ray Data plan: read -> decode -> model actor pools -> fragment writers."""
    import ray

    # One unit (<= read_rows rows) per block and per read task: every later stage then takes and emits
    # blocks of one unit, so results stream to the committer unit by unit instead of in one final block.
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(read_and_decode, batch_size=1, num_cpus=cfg.decode_cpus,
                        fn_kwargs={"min_side": cfg.min_side, "max_pixels": cfg.max_pixels,
                                   "question_seed": cfg.question_seed, "questions": questions})
    for stage, pool, kwargs in model_plan(cfg, classes):
        # calls > 1: that many batches at once per actor, each on its own thread (Ray Data runs one by default)
        calls = {"enable_true_multi_threading": True, "max_concurrent_calls_per_actor": pool.calls} \
            if pool.calls > 1 else {}
        if mllm_adapter:  # every model stage loads the profile with the adapter (and checks its id)
            kwargs = {**kwargs, "mllm_adapter": mllm_adapter, "mllm_adapter_id": mllm_adapter_id}
        ds = ds.map_batches(stage, fn_constructor_args=(profile_name, "auto", pool.threads), fn_constructor_kwargs=kwargs,
                            batch_size=pool.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.concurrency, **calls),
                            num_gpus=pool.num_gpus or None, num_cpus=pool.num_cpus)
    ds = ds.map_batches(WriteFragments, fn_constructor_args=(lake, schemas, cfg.storage_options),
                        batch_size=cfg.rows_per_fragment, num_cpus=cfg.decode_cpus, batch_format="pyarrow",
                        # a small job keeps one writer; more start when blocks queue up (rows of 6.6 MB need several)
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.writers, initial_size=1))
    return ds


def _abs_lake(lake: str) -> str:
    return os.path.abspath(lake) if lake_mod.is_local(lake) else lake


def _disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def check_config(cfg: EmbedConfig) -> None:
    """``UserError`` for a setting no run can use (named as in the embed TOML); nothing is touched before this."""
    check_limit(cfg.limit)
    if cfg.guidance_dtype not in features_schema.GUIDANCE_DTYPES:
        raise UserError(f"`guidance_dtype` = {cfg.guidance_dtype!r} is not one of "
                        f"{list(features_schema.GUIDANCE_DTYPES)}. Set guidance_dtype = \"fp16\" or \"fp8\" in the "
                        "embed TOML.")
    if cfg.writers < 1 or cfg.rows_per_fragment < 1 or cfg.read_rows < 1:
        raise UserError(f"`writers` ({cfg.writers}), `rows_per_fragment` ({cfg.rows_per_fragment}) and `read_rows` "
                        f"({cfg.read_rows}) must be >= 1. Fix them in the embed TOML.")
    if cfg.fuse_models and cfg.ip.calls != 1:
        raise UserError(f"`[ip] calls` = {cfg.ip.calls} does nothing with fuse_models = true: the fused actor takes "
                        "`[mllm] calls`. Set calls in [mllm] and leave [ip] at 1.")
    for name in ("ip", "mllm", "text"):
        pool = getattr(cfg, name)
        for key in ("batch_size", "concurrency", "calls"):
            if getattr(pool, key) < 1:
                raise UserError(f"`[{name}] {key}` must be >= 1, got {getattr(pool, key)}. Fix it in the embed TOML.")


def run_embed(source: str, lake: str, profile_name: str, cfg: EmbedConfig, new_table: bool = False,
              progress: bool = True, break_lock: bool = False, mllm_adapter: str | os.PathLike | None = None,
              classes: dict[str, type] | None = None) -> EmbedSummary:
    """Embed every not-yet-done decisive pair of ``source`` into ``lake``; see the module docstring.

    The whole run (table creation, reconcile, planning, every commit) holds the lake's writer lock
    (``img.lake.lock``): a second writer waits for it. ``break_lock`` takes an object-store lease from a stuck holder.
    ``mllm_adapter``: a fine-tuned MLLM adapter folder (else the profile's, if it names one); its id is part of
    the fingerprint, so guidance with and without it never mix in one table.
    ``classes`` replaces model stages by role (see ``model_plan``; benchmarks only).
    """
    t_start, wall_start = time.perf_counter(), time.time()
    check_config(cfg)  # everything a user can get wrong, before the lake is touched
    check_ray_address()
    profile = with_mllm_adapter(get_profile(profile_name), mllm_adapter)
    questions = resolve_questions(cfg.questions)  # a bad file fails here, before anything is written
    lake = _abs_lake(lake)
    check_lake_folder(lake)
    so = cfg.storage_options or None
    shards = list_shards(source, so)
    fp = embed_fingerprint(profile, cfg, questions)
    schemas = table_schemas(profile, cfg, fp)
    with writer_lock(lake, job="embed", break_lock=break_lock, storage_options=so) as lock:
        return _embed_locked(lake, shards, profile, cfg, schemas, fp, questions, new_table, progress, lock,
                             (t_start, wall_start), classes)


def _embed_locked(lake, shards, profile, cfg, schemas, fp, questions, new_table, progress, lock,
                  start, classes) -> EmbedSummary:
    """run_embed's work once the lake's writer lock is held."""
    t_start, wall_start = start
    so = cfg.storage_options or None
    if lake_mod.is_local(lake):
        os.makedirs(lake, exist_ok=True)
    for name, schema in schemas.items():
        lake_mod.ensure_table(lake, name, schema, new_table=new_table, storage_options=so,
                              data_storage_version=features_schema.DATA_STORAGE_VERSION if name == "features" else None)
    done, orphans = reconcile(lake, so)
    units, counts, damaged = plan_units(shards, done, cfg.limit, unit_rows=cfg.read_rows)
    summary = EmbedSummary(skipped_done=counts["done"], skipped_ties=counts["ties"], orphans_redone=orphans,
                           fingerprint=fp)
    todo = counts["todo"]
    log.info("plan: %d rows in %d shards: %d to embed, %d already done, %d ties dropped, %d unreadable",
             counts["rows"], len(shards), todo, counts["done"], counts["ties"], len(damaged))
    if damaged:  # unreadable shards and row groups: quarantined now, in one commit
        table = pa.Table.from_pylist(damaged, schema=schemas["quarantine"])
        lake_mod.commit_fragments(lake, "quarantine",
                                  lake_mod.write_fragments(lake, "quarantine", table, schemas["quarantine"], so), so)
        summary.quarantined += len(damaged)
        summary.unreadable += len(damaged)
    timers = {t: 0.0 for t in TIMERS}
    tensor_bytes, actors = 0, []
    if todo:
        summary.startup["plan_s"] = round(time.perf_counter() - t_start, 3)
        summary.startup["ray_init_s"] = round(init_ray(), 3)
        check_reservations(cfg)
        ds = build_dataset(units, lake, profile.name, cfg, schemas, questions, profile.mllm_adapter,
                           profile.mllm_adapter_id, classes)
        tensor_bytes, actors = _drain(ds, lake, cfg, summary, timers, lock, todo, progress, t_start)
    if actors:
        _startup_report(summary, actors, wall_start)
    if summary.unreadable:
        log.warning("%d quarantined rows (or whole shards) are unreadable input; list them with: img sql --lake %s "
                    "\"select reason, count(*) from quarantine where reason like 'shard %%' group by 1\"",
                    summary.unreadable, lake)
    summary.seconds = time.perf_counter() - t_start
    summary.time_split = timers
    feats = lake_mod.open_table(lake, "features", so)
    n_feat = feats.count_rows() if feats is not None else 0
    if n_feat and lake_mod.is_local(lake):
        summary.bytes_per_pair = _disk_bytes(lake_mod.table_uri(lake, "features")) / n_feat
    if summary.written:
        summary.tensor_bytes_per_pair = tensor_bytes / summary.written
    return summary


def _drain(ds, lake: str, cfg: EmbedConfig, summary: EmbedSummary, timers: dict[str, float], lock, todo: int,
           progress: bool, t_start: float) -> tuple[int, list[dict]]:
    """Take the writers' fragment rows off the pipeline and commit them every ``commit_seconds`` (and at the end);
    adds their stage timers to ``timers``. Returns (tensor bytes written, the actors' start-up records)."""
    tensor_bytes, actors = 0, []
    pending: list[dict] = []  # written fragments not yet committed (commit_seconds > 0 groups them)
    last_commit = time.perf_counter()
    with JobProgress(todo, enabled=progress) as bar:
        for row in ds.iter_rows():
            if row.get("startup"):
                actors += json.loads(row["startup"])
            tensor_bytes += int(row["tensor_bytes"])
            for t in TIMERS:
                timers[t] += float(row[t])
            pending.append(row)
            if time.perf_counter() - last_commit >= cfg.commit_seconds:
                _commit(lake, cfg, pending, summary, bar, lock, t_start)
                last_commit = time.perf_counter()
        if pending:
            _commit(lake, cfg, pending, summary, bar, lock, t_start)
    return tensor_bytes, actors


def _commit(lake: str, cfg: EmbedConfig, pending: list[dict], summary: EmbedSummary, bar: JobProgress, lock,
            t_start: float) -> None:
    """Commit the ``pending`` fragments (``pairs``, the commit marker, among them) and count them; empties it."""
    so = cfg.storage_options or None
    lock.check()  # an object-store lease taken over or not renewed: stop before committing
    for name in ("features", "pairs", "quarantine"):  # pairs is the commit marker
        lake_mod.commit_fragments(lake, name, [f for r in pending for f in json.loads(r[name])], so)
    for r in pending:
        summary.written += int(r["n_good"])
        summary.quarantined += int(r["n_bad"])
        summary.unreadable += int(r["n_unreadable"])
        bar.advance(int(r["n_good"]) + int(r["n_bad"]))
    pending.clear()
    if not summary.first_commit_seconds:
        summary.first_commit_seconds = time.perf_counter() - t_start
        summary.first_commit_pairs = summary.written


def _startup_report(summary: EmbedSummary, actors: list[dict], wall_start: float) -> None:
    """Per actor: spawn, imports and model loading, relative to the job's start; the first batch's latency."""
    summary.startup["actors"] = [
        {"stage": a["stage"], "pid": a["pid"], "spawn_at": round(a["process_start"] - wall_start, 2),
         # Ray Data created the actor: its process (spawned then, or idle since Ray's start) began our imports
         "scheduled_at": round(a["import_start"] - wall_start, 2),
         "imports_s": round(a["imported"] - max(a["import_start"], wall_start), 2),  # torch etc. in model actors
         "load_s": round(a["ready"] - a["init_start"], 2), "ready_at": round(a["ready"] - wall_start, 2)}
        for a in actors]
    # actors up before the first commit (writers added later by autoscaling do not count)
    ready = max([a["ready_at"] for a in summary.startup["actors"] if a["ready_at"] <= summary.first_commit_seconds]
                or [0.0])
    summary.startup["first_commit_at"] = round(summary.first_commit_seconds, 2)
    summary.startup["first_batch_s"] = round(summary.first_commit_seconds - ready, 2)


def summary_json(summary: EmbedSummary) -> str:
    return json.dumps(asdict(summary))
