"""The embed job's stages that need no model: read and decode the source rows, write Lance fragments.

    out = read_and_decode(units_batch, min_side=16, max_pixels=60_000_000, question_seed=0)
    meta = WriteFragments(lake, schemas, storage_options={})(model_stage_output)

They live apart from ``pipelines/embed.py`` so that the Ray workers running
them import numpy, pyarrow, Pillow and Lance, never torch or transformers
(a torch import costs seconds of start-up per worker process).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from img.lake import tables as lake_mod
from img.questions import question_for
from pipelines import IMPORT_STARTED_AT
from pipelines.source import READ_ERRORS, SourceShard, describe_error
from schemas.pickapic import REQUIRED
from schemas.pickapic import SCHEMA as PUBLISHED

log = logging.getLogger(__name__)
IMPORTED_AT = time.time()  # this module finished importing: the start-up split (no torch here)

TIMERS = ("t_read", "t_decode", "t_ip", "t_mllm", "t_text", "t_write", "cpu_write")  # cpu_: CPU seconds


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


def _process_start() -> float:
    """Wall-clock time this process started (for the start-up split)."""
    import psutil  # a dependency of ray and deepspeed

    return psutil.Process().create_time()


def startup_record(stage: str, imported: float, init_start: float) -> dict[str, Any]:
    """One actor's start-up times, taken at the end of its ``__init__``: process start, when its imports began
    (``pipelines.IMPORT_STARTED_AT``) and ended (``imported``), ``__init__``'s start, and now (ready)."""
    return {"stage": stage, "pid": os.getpid(), "process_start": _process_start(), "import_start": IMPORT_STARTED_AT,
            "imported": imported, "init_start": init_start, "ready": time.time()}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out



BLOB_COLUMNS = ("guidance", "text_guidance")


class WriteFragments:
    """Write one batch as uncommitted fragments of features / pairs / quarantine; return their metadata.

    Takes the batch as an Arrow table (Ray's ``batch_format="pyarrow"``, as the job passes it) or as a dict
    of numpy arrays. From Arrow the guidance blobs go to Lance without a copy: at 6.6 MB per pair every
    copy of a fragment's rows costs ``rows_per_fragment`` x 6.6 MB of writer memory.
    """

    def __init__(self, lake: str, schemas: dict[str, pa.Schema], storage_options: dict[str, str]):
        t_init = time.time()
        self.lake, self.schemas, self.storage_options = lake, schemas, storage_options or None
        self.startup: dict | None = startup_record("WriteFragments", IMPORTED_AT, t_init)

    def __call__(self, batch: "pa.Table | dict[str, np.ndarray]") -> dict[str, np.ndarray]:
        t0, c0 = time.perf_counter(), time.process_time()
        blobs, columns = _split_blobs(batch)
        good = np.array([e == "" for e in columns["error"]], dtype=bool)
        gi, bi = np.flatnonzero(good), np.flatnonzero(~good)
        feat, nbytes = self._feature_columns(columns, blobs, gi, len(good))
        pairs = {k: [columns[k][i] for i in gi] for k in ("pair_id", "caption", "question", "winner_uid",
                                                          "loser_uid", "source", "row")}
        pairs["broken"] = [columns["broken"][i] or None for i in gi]  # "" stands for null between stages
        quarantine = {
            "pair_id": [columns["pair_id"][i] for i in bi], "source": [columns["source"][i] for i in bi],
            "row": [int(columns["row"][i]) for i in bi], "reason": [columns["error"][i] for i in bi],
            "caption": [columns["caption"][i] for i in bi],
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
        out["n_unreadable"] = np.array([sum(1 for e in columns.get("read_error", ()) if e)])
        out["tensor_bytes"] = np.array([nbytes])
        for t in TIMERS:
            out[t] = np.array([float(np.sum(columns[t])) if t in columns else 0.0])
        out["t_write"] = np.array([t_write])
        out["cpu_write"] = np.array([time.process_time() - c0])  # this writer process, Lance's threads included
        out["written_at"] = np.array([time.time()])  # wall clock, to measure write -> commit lag
        startup = [e for v in columns.get("startup", ()) if v for e in json.loads(v)]
        if self.startup is not None:
            startup.append(self.startup)
            self.startup = None
        out["startup"] = np.array([json.dumps(startup) if startup else ""], dtype=object)
        return out

    def _feature_columns(self, columns: dict[str, Any], blobs: dict[str, Any], gi: np.ndarray,
                         n: int) -> tuple[dict[str, Any], int]:
        """The ``features`` columns of the good rows ``gi`` (of ``n``), and the tensor bytes they hold."""
        fs = self.schemas["features"]
        feat = {"pair_id": [columns["pair_id"][i] for i in gi]}
        nbytes = 0
        for col in ("winner_tokens", "loser_tokens"):
            tokens = np.asarray(columns[col])
            tokens = np.stack(list(tokens)) if tokens.dtype == object else tokens  # ragged-typed by Ray: rows
            arr = np.ascontiguousarray(tokens[gi]).reshape(-1) if len(gi) else np.zeros(0, np.float16)
            width = fs.field(col).type.list_size
            feat[col] = pa.FixedSizeListArray.from_arrays(pa.array(arr, pa.float16()), width)
            nbytes += arr.nbytes
        for col in BLOB_COLUMNS:
            if col in fs.names:
                feat[col] = _blob_values(blobs[col], gi, n)
                feat[f"{col}_len"] = pa.array([int(columns[f"{col}_len"][i]) for i in gi], pa.int32())
                nbytes += int(pc.sum(pc.binary_length(feat[col])).as_py() or 0)
                if f"{col}_scale" in fs.names:  # fp8: one float32 scale per token
                    scales = [np.asarray(columns[f"{col}_scale"][i], np.float32) for i in gi]
                    offsets = np.concatenate([[0], np.cumsum([len(x) for x in scales])]).astype(np.int32)
                    values = np.concatenate(scales) if scales else np.zeros(0, np.float32)
                    feat[f"{col}_scale"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
                    nbytes += values.nbytes
        return feat, nbytes


def _split_blobs(batch: "pa.Table | dict[str, np.ndarray]") -> tuple[dict[str, Any], dict[str, Any]]:
    """(blob columns as they came, every other column as numpy): Arrow blobs are never copied into numpy."""
    if isinstance(batch, pa.Table):
        from ray.data.block import BlockAccessor  # the worker runs under Ray already

        blobs = {c: batch.column(c) for c in BLOB_COLUMNS if c in batch.column_names}
        small = [c for c in batch.column_names if c not in blobs]
        return blobs, BlockAccessor.for_block(batch.select(small)).to_numpy(small)
    return {c: batch[c] for c in BLOB_COLUMNS if c in batch}, batch


def _blob_values(values: Any, keep: np.ndarray, n: int) -> "pa.ChunkedArray | pa.Array":
    """The rows ``keep`` of a blob column as large_binary: Arrow input without a copy when every row is kept."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.cast(pa.large_binary())  # binary -> large_binary widens the offsets only
        return arr if len(keep) == n else arr.take(pa.array(keep, pa.int64()))
    return pa.array([bytes(values[i]) for i in keep], pa.large_binary())
