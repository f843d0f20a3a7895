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
real one. Ray starts embedded unless ``RAY_ADDRESS`` points at a cluster.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from img.config import fingerprint
from img.errors import UserError
from img.features import GuidanceEncoder, IPTokenEncoder, TextGuidanceEncoder
from img.finetune.adapter import with_mllm_adapter
from img.lake import tables as lake_mod
from img.lake.lock import writer_lock
from img.models.profiles import get_profile
from img.models.tiny import tiny_dir
from img.paths import check_lake_folder
from img.questions import question_for, questions_id, resolve_questions
from pipelines.common import JobProgress, check_cluster_fits, init_ray
from pipelines.embed_config import EmbedConfig
from pipelines.source import READ_ERRORS, SourceShard, describe_error, list_shards, plan_units
from schemas import features as features_schema
from schemas import pairs as pairs_schema
from schemas import quarantine as quarantine_schema
from schemas.meta import with_provenance
from schemas.pickapic import REQUIRED
from schemas.pickapic import SCHEMA as PUBLISHED

log = logging.getLogger(__name__)

TIMERS = ("t_read", "t_decode", "t_ip", "t_mllm", "t_text", "t_write")


# ----------------------------------------------------------------------------- stages
def read_units(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read a batch of units; see ``read_unit``."""
    parts = [read_unit({k: batch[k][i] for k in batch}) for i in range(len(batch["shard"]))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _text(values: list) -> np.ndarray:
    """Strings as an object array with "" for null: an all-null column would reach the next Ray stage as floats."""
    return np.array([v if isinstance(v, str) else "" for v in values], dtype=object)


def _plain(t: pa.DataType) -> bool:
    """A flat type every reader decodes (numbers, bools, times, strings, bytes)."""
    return pa.types.is_primitive(t) or pa.types.is_string(t) or pa.types.is_large_string(t) \
        or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _read_rows(shard: SourceShard, unit: dict[str, Any], rows: list[int]) -> dict[str, list]:
    """The unit's rows (indices in the shard) of its row group, read up to the last one, as column lists."""
    import pyarrow.parquet as pq

    stream = bool(unit.get("stream", False))  # a huge row group: read page by page, not whole
    with shard.open() as f:
        pf = pq.ParquetFile(f, pre_buffer=not stream, buffer_size=(8 << 20) if stream else 0)
        schema = pf.schema_arrow
        cols = list(REQUIRED)
        if "broken" in schema.names and pa.types.is_string(schema.field("broken").type):
            cols.append("broken")  # the shapes-world sample's extra column
        # The other published columns are decoded too, not kept: a damaged page anywhere in the
        # published data makes the rows unreadable. Columns outside the published set are never read.
        checked = [c for c in PUBLISHED.names if c in schema.names and c not in cols and _plain(schema.field(c).type)]
        want = [r - int(unit["rg_start"]) for r in rows]
        d: dict[str, list] = {c: [] for c in cols}
        seen = 0
        for b in pf.iter_batches(batch_size=64, row_groups=[int(unit["row_group"])], columns=cols + checked,
                                 use_threads=False):
            idx = [w - seen for w in want if seen <= w < seen + b.num_rows]
            for c in cols:  # scalar access works for every accepted type (view types have no take kernel)
                col = b.column(c)
                d[c] += [col[i].as_py() for i in idx]
            seen += b.num_rows
            if seen > want[-1]:
                break
    if len(d["label_0"]) != len(rows):
        raise OSError(f"row group holds {seen} rows, fewer than the footer says")
    return d


def read_unit(unit: dict[str, Any]) -> dict[str, np.ndarray]:
    """Read one unit (todo rows of one row group) and orient each pair as (winner, loser).

    A unit that cannot be read (a damaged page, say) comes back with every row
    carrying a ``read_error`` that names the shard, the row group's rows and the
    error; those rows go to ``quarantine``.
    """
    t0 = time.perf_counter()
    shard = SourceShard(**json.loads(str(unit["shard"])))
    rows = json.loads(str(unit["rows"]))
    n = len(rows)
    d, read_error = None, ""
    attempts = 1 if "://" not in shard.uri else 3  # object stores: retry transient errors first
    for attempt in range(attempts):
        try:
            d, read_error = _read_rows(shard, unit, rows), ""
            break
        except READ_ERRORS as e:
            if isinstance(e, NotImplementedError):  # a limit of ours, not damage: fail loudly
                raise
            lo = int(unit["rg_start"])
            hi = lo + int(unit["rg_rows"]) - 1
            read_error = (f"shard {shard.name} row group {int(unit['row_group'])} (rows {lo}-{hi}): "
                          f"unreadable ({describe_error(e)})")
            if attempt + 1 < attempts:
                time.sleep(2.0 * (attempt + 1))
    if d is None:
        log.warning("%s; its %d todo rows are quarantined", read_error, n)
        d = {c: [None] * n for c in REQUIRED}
        d["label_0"] = [1.0] * n
    first = np.array([lab == 1.0 for lab in d["label_0"]])
    out = {
        "pair_id": np.array([f"{shard.name}#{r}" for r in rows], dtype=object),
        "source": np.array([shard.uri] * n, dtype=object),
        "row": np.array(rows, dtype=np.int64),
        "caption": _text(d["caption"]),
        "winner_jpg": np.array([a if f else b for a, b, f in zip(d["jpg_0"], d["jpg_1"], first)], dtype=object),
        "loser_jpg": np.array([b if f else a for a, b, f in zip(d["jpg_0"], d["jpg_1"], first)], dtype=object),
        "winner_uid": _text([a if f else b for a, b, f in zip(d["image_0_uid"], d["image_1_uid"], first)]),
        "loser_uid": _text([b if f else a for a, b, f in zip(d["image_0_uid"], d["image_1_uid"], first)]),
        "best_image_uid": _text(d["best_image_uid"]),
        "broken": _text(d.get("broken", [None] * n)),  # "" = none; written as null
        "read_error": np.array([read_error] * n, dtype=object),
    }
    out["t_read"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    return out


class Decode:
    """Fully decode both JPEGs; a row that cannot be embedded gets an ``error`` reason instead."""

    def __init__(self, min_side: int, max_pixels: int, question_seed: int, questions: Sequence[str] | None = None):
        self.min_side, self.max_pixels, self.question_seed = min_side, max_pixels, question_seed
        self.questions = questions  # question templates (None: our pool)

    def _decode(self, data: Any, which: str) -> tuple[np.ndarray | None, str | None]:
        from PIL import Image

        if data is None or len(data) == 0:
            return None, f"{which}: empty image bytes"
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if min(w, h) < self.min_side:
                    return None, f"{which}: impossible image size {w}x{h} (min side {self.min_side})"
                if w * h > self.max_pixels:
                    return None, f"{which}: impossible image size {w}x{h} (> {self.max_pixels} pixels)"
                im.load()
                return np.asarray(im.convert("RGB")), None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the data
            detail = "not an image file" if type(e).__name__ == "UnidentifiedImageError" else str(e)[:120]
            return None, f"{which}: does not decode ({type(e).__name__}: {detail})"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        t0 = time.perf_counter()
        n = len(batch["pair_id"])
        winners, losers, errors, questions = [], [], [], []
        for i in range(n):
            err = batch["read_error"][i] or None  # the whole unit could not be read
            caption = str(batch["caption"][i]).strip()
            if err:
                pass
            elif not caption:
                err = "empty caption"
            elif batch["winner_uid"][i] != batch["best_image_uid"][i]:
                err = "label_0 disagrees with best_image_uid"
            w, ew = self._decode(batch["winner_jpg"][i], "winner")
            lo, el = self._decode(batch["loser_jpg"][i], "loser")
            err = err or ew or el
            blank = np.zeros((1, 1, 3), np.uint8)
            winners.append(w if err is None else blank)
            losers.append(lo if err is None else blank)
            errors.append(err or "")
            questions.append(question_for(caption, str(batch["pair_id"][i]), self.question_seed, self.questions)
                             if caption else "")
        out = {k: v for k, v in batch.items() if k not in ("winner_jpg", "loser_jpg")}
        out["winner_image"] = _ragged(winners)
        out["loser_image"] = _ragged(losers)
        out["error"] = np.array(errors, dtype=object)
        out["question"] = np.array(questions, dtype=object)
        out["t_decode"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return out


def read_and_decode(batch: dict[str, np.ndarray], min_side: int, max_pixels: int,
                    question_seed: int, questions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a batch of units, then fully decode their images (one Ray task per unit)."""
    return Decode(min_side, max_pixels, question_seed, questions)(read_units(batch))


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _to_storage(t, dtype: str) -> np.ndarray:
    """A torch tensor as 2-byte words in the profile's storage dtype (bf16 is bit-cast into fp16 slots)."""
    import torch

    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.float16)
    return t.to(torch.float16).contiguous().numpy()


def _unpadded(column: str, hidden: list, idx: np.ndarray, n: int, dtype: str) -> dict[str, np.ndarray]:
    """Per-row (L_i, E) tensors as blob bytes in ``column`` plus their lengths; rows not in ``idx`` stay empty."""
    blobs = [b""] * n
    lens = np.zeros(n, np.int32)
    for i, h in zip(idx, hidden):
        blobs[i] = _to_storage(h, dtype).tobytes()
        lens[i] = h.shape[0]
    return {column: _ragged(blobs), f"{column}_len": lens}


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(arr, dtype=np.uint8))


class _ModelStage:
    """Base of the model actors: loads its encoder once per actor, runs only on good rows."""

    timer = ""

    def __init__(self, profile_name: str, device: str = "auto", threads: int = 0, mllm_adapter: str | None = None,
                 mllm_adapter_id: str = ""):
        import torch


        if threads:
            torch.set_num_threads(threads)  # one actor per core share; Ray's OMP default may differ
        self.profile = with_mllm_adapter(get_profile(profile_name), mllm_adapter)
        if mllm_adapter and self.profile.mllm_adapter_id != mllm_adapter_id:  # the driver's fingerprint names this id
            raise UserError(f"the MLLM adapter {mllm_adapter!r} changed since the embed job started "
                            f"({mllm_adapter_id} -> {self.profile.mllm_adapter_id}). Re-run the job.")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.encoder = self.load()

    def load(self):
        raise NotImplementedError

    def compute(self, batch: dict[str, np.ndarray], good: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        good = np.array([e == "" for e in batch["error"]], dtype=bool)
        out = dict(batch)
        out.update(self.compute(batch, good))
        out[self.timer] = np.full(len(good), (time.perf_counter() - t0) / max(len(good), 1))
        return out


class IPTokens(_ModelStage):
    """IP-Adapter image tokens (penultimate CLIP states -> resampler -> N x D) of winner and loser."""

    timer = "t_ip"

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
    """MLLM last-layer hidden states over (loser image + question), unpadded, with their length."""

    timer = "t_mllm"

    def load(self):

        return GuidanceEncoder(self.profile, device=self.device)

    def compute(self, batch, good):
        idx = np.flatnonzero(good)
        hidden = self.encoder([_pil(batch["loser_image"][i]) for i in idx],
                              [str(batch["question"][i]) for i in idx]) if len(idx) else []
        return _unpadded("guidance", hidden, idx, len(good), self.profile.tensor_dtype)


class TextGuidance(_ModelStage):
    """The diffusion text encoders' caption embeddings (for the text-only guidance ablation)."""

    timer = "t_text"

    def load(self):

        return TextGuidanceEncoder(self.profile, device=self.device)

    def compute(self, batch, good):
        idx = np.flatnonzero(good)
        hidden = self.encoder([str(batch["caption"][i]) for i in idx]) if len(idx) else []
        return _unpadded("text_guidance", hidden, idx, len(good), self.profile.tensor_dtype)


class WriteFragments:
    """Write one batch as uncommitted fragments of features / pairs / quarantine; return their metadata."""

    def __init__(self, lake: str, schemas: dict[str, pa.Schema], storage_options: dict[str, str]):
        self.lake, self.schemas, self.storage_options = lake, schemas, storage_options or None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        good = np.array([e == "" for e in batch["error"]], dtype=bool)
        gi, bi = np.flatnonzero(good), np.flatnonzero(~good)
        fs = self.schemas["features"]
        feat = {"pair_id": [batch["pair_id"][i] for i in gi]}
        nbytes = 0
        for col in ("winner_tokens", "loser_tokens"):
            arr = np.ascontiguousarray(batch[col][gi]).reshape(-1)
            width = fs.field(col).type.list_size
            feat[col] = pa.FixedSizeListArray.from_arrays(pa.array(arr, pa.float16()), width)
            nbytes += arr.nbytes
        for col in ("guidance", "text_guidance"):
            if col in fs.names:
                vals = [bytes(batch[col][i]) for i in gi]
                feat[col] = pa.array(vals, pa.large_binary())
                feat[f"{col}_len"] = pa.array([int(batch[f"{col}_len"][i]) for i in gi], pa.int32())
                nbytes += sum(len(v) for v in vals)
        pairs = {k: [batch[k][i] for i in gi] for k in ("pair_id", "caption", "question", "winner_uid", "loser_uid",
                                                        "source", "row")}
        pairs["broken"] = [batch["broken"][i] or None for i in gi]  # "" stands for null between stages
        quarantine = {
            "pair_id": [batch["pair_id"][i] for i in bi], "source": [batch["source"][i] for i in bi],
            "row": [int(batch["row"][i]) for i in bi], "reason": [batch["error"][i] for i in bi],
            "caption": [batch["caption"][i] for i in bi],
        }
        out = {}
        for name, cols in (("features", feat), ("pairs", pairs), ("quarantine", quarantine)):
            table = pa.table(cols, schema=self.schemas[name]) if len(cols["pair_id"]) else None
            frags = lake_mod.write_fragments(self.lake, name, table, self.schemas[name], self.storage_options) \
                if table is not None else []
            out[name] = np.array([json.dumps(frags)], dtype=object)
        t_write = time.perf_counter() - t0
        out["n_good"] = np.array([len(gi)])
        out["n_bad"] = np.array([len(bi)])
        out["n_unreadable"] = np.array([sum(1 for e in batch.get("read_error", ()) if e)])
        out["tensor_bytes"] = np.array([nbytes])
        for t in TIMERS:
            out[t] = np.array([float(np.sum(batch[t])) if t in batch else 0.0])
        out["t_write"] = np.array([t_write])
        out["written_at"] = np.array([time.time()])  # wall clock, to measure write -> commit lag
        return out


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

    def render(self) -> str:
        split = ", ".join(f"{k[2:]} {v:.1f}s" for k, v in self.time_split.items() if v > 0)
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
    return {
        "features": with_provenance(features_schema.schema(d.ip_tokens, d.ip_dim, cfg.text_guidance),
                                    table="features", version=features_schema.VERSION, model_ids=ids,
                                    fingerprint=fp, extra=extra),
        "pairs": with_provenance(pairs_schema.SCHEMA, table="pairs", version=pairs_schema.VERSION,
                                 model_ids=ids, fingerprint=fp, extra={"profile": profile.name}),
        "quarantine": with_provenance(quarantine_schema.SCHEMA, table="quarantine",
                                      version=quarantine_schema.VERSION, model_ids=ids, fingerprint=fp),
    }


def embed_fingerprint(profile, cfg: EmbedConfig, questions: Sequence[str] | None = None) -> str:
    """Hash of everything that decides the stored tensors: settings, models, dtype, the MLLM's conversation
    template and image mode, and the question pool's content (``questions``: the loaded ``cfg.questions``)."""
    import hashlib

    base = fingerprint(cfg, exclude=EmbedConfig.RUN_KNOBS + EmbedConfig.CONTENT_KEYS)
    models = profile.model_ids()
    if profile.tiny:  # tiny models are built in code: their build (version + recipe hash) is their identity
        models = {**models, "tiny_build": tiny_dir(profile.tiny).name}
    blob = json.dumps({"cfg": base, "profile": profile.name, "models": models,
                       "dtype": profile.tensor_dtype, "mllm_template": profile.mllm_template,
                       "mllm_image": profile.mllm_image, "questions": questions_id(questions)}, sort_keys=True)
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
            feats.delete("pair_id IN (" + ", ".join("'" + p.replace("'", "''") + "'" for p in chunk) + ")")
    return pairs | quarantined, len(orphans)


def check_reservations(cfg: EmbedConfig) -> None:
    """Refuse a plan whose actors reserve more CPUs/GPUs than the cluster has (it would stall, not fail)."""
    pools = [cfg.ip, cfg.mllm] + ([cfg.text] if cfg.text_guidance else [])
    check_cluster_fits("embed", pools, 2 * cfg.decode_cpus, f"decode/writer 2 x {cfg.decode_cpus:g}",
                       "[ip]/[mllm]/[text]")


def build_dataset(units: list[dict], lake: str, profile_name: str, cfg: EmbedConfig, schemas: dict[str, pa.Schema],
                  questions: Sequence[str] | None = None, mllm_adapter: str | None = None,
                  mllm_adapter_id: str = ""):
    """The Ray Data plan: read -> decode -> model actor pools -> fragment writers."""
    import ray

    # One unit (<= read_rows rows) per block and per read task: every later stage then takes and emits
    # blocks of one unit, so results stream to the committer unit by unit instead of in one final block.
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(read_and_decode, batch_size=1, num_cpus=cfg.decode_cpus,
                        fn_kwargs={"min_side": cfg.min_side, "max_pixels": cfg.max_pixels,
                                   "question_seed": cfg.question_seed, "questions": questions})
    stages = [(IPTokens, cfg.ip), (Guidance, cfg.mllm)] + ([(TextGuidance, cfg.text)] if cfg.text_guidance else [])
    for stage, pool in stages:
        threads = max(1, int(round(pool.num_cpus)))
        ds = ds.map_batches(stage, fn_constructor_args=(profile_name, "auto", threads, mllm_adapter, mllm_adapter_id),
                            batch_size=pool.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
                            num_gpus=pool.num_gpus or None, num_cpus=pool.num_cpus)
    ds = ds.map_batches(WriteFragments, fn_constructor_args=(lake, schemas, cfg.storage_options),
                        batch_size=cfg.rows_per_fragment, num_cpus=cfg.decode_cpus,
                        compute=ray.data.ActorPoolStrategy(size=1))
    return ds


def _abs_lake(lake: str) -> str:
    return os.path.abspath(lake) if lake_mod.is_local(lake) else lake


def _disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def run_embed(source: str, lake: str, profile_name: str, cfg: EmbedConfig, new_table: bool = False,
              progress: bool = True, break_lock: bool = False,
              mllm_adapter: str | os.PathLike | None = None) -> EmbedSummary:
    """Embed every not-yet-done decisive pair of ``source`` into ``lake``; see the module docstring.

    The whole run (table creation, reconcile, planning, every commit) holds the lake's writer lock
    (``img.lake.lock``): a second writer waits for it. ``break_lock`` takes an object-store lease from a stuck holder.
    ``mllm_adapter``: a fine-tuned MLLM adapter folder (else the profile's, if it names one); its id is part of
    the fingerprint, so guidance with and without it never mix in one table.
    """
    t_start = time.perf_counter()
    # everything a user can get wrong, before the lake is touched
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"`limit` must be >= 1, got {cfg.limit}. Omit it to embed everything.")
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
                             t_start)


def _embed_locked(lake, shards, profile, cfg, schemas, fp, questions, new_table, progress, lock,
                  t_start) -> EmbedSummary:
    """run_embed's work once the lake's writer lock is held."""
    so = cfg.storage_options or None
    if lake_mod.is_local(lake):
        os.makedirs(lake, exist_ok=True)
    for name, schema in schemas.items():
        lake_mod.ensure_table(lake, name, schema, new_table=new_table, storage_options=so)
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
    tensor_bytes = 0
    if todo:
        init_ray()
        check_reservations(cfg)
        ds = build_dataset(units, lake, profile.name, cfg, schemas, questions, profile.mllm_adapter,
                           profile.mllm_adapter_id)
        with JobProgress(todo, enabled=progress) as bar:
            for row in ds.iter_rows():
                lock.check()  # an object-store lease taken over or not renewed: stop before committing
                for name in ("features", "pairs", "quarantine"):  # pairs is the commit marker
                    lake_mod.commit_fragments(lake, name, json.loads(row[name]), so)
                summary.written += int(row["n_good"])
                summary.quarantined += int(row["n_bad"])
                summary.unreadable += int(row["n_unreadable"])
                tensor_bytes += int(row["tensor_bytes"])
                for t in TIMERS:
                    timers[t] += float(row[t])
                bar.advance(int(row["n_good"]) + int(row["n_bad"]))
                if not summary.first_commit_seconds:
                    summary.first_commit_seconds = time.perf_counter() - t_start
                    summary.first_commit_pairs = summary.written
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


def summary_json(summary: EmbedSummary) -> str:
    return json.dumps(asdict(summary))
