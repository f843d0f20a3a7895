"""The bundled Pick-a-Pic-format sample: shapes-world pairs written as parquet shards.

    img data sample --out data/sample --pairs 2000 --seed 0 --corrupt 0.02
    img data sample --out data/pp --pairs 2000 --format pickapic   # only the published columns

    from img.data.sample import write_sample, read_sample, expected_counts
    print(write_sample("data/sample", pairs=200, seed=0, corrupt=0.05))
    table = read_sample("data/sample")          # one pyarrow Table, shards in order

Two formats. ``sample`` (the default): every row has exactly the Pick-a-Pic v2
columns and types (``schemas.pickapic.SCHEMA``) plus ``broken``, the schema
carries ``img.*`` provenance metadata, one row group per shard, shards named
``train-00000-of-00004.parquet``. ``pickapic``: only the published columns, no
schema metadata, row groups of 100 rows (what HF datasets writes for binary
columns) and HF's shard names with a content hash,
``train-00000-of-00004-<16 hex>.parquet`` - the form the published shards have.
The rows (bytes included) are the same in both formats:

* decisive rows: one image draws the caption faithfully (the winner), the
  other breaks exactly one element; ``broken`` says which ("colour", "shape",
  "count" or "relation"). They share the background but are drawn separately,
  each with its own layout jitter, like two generations for one prompt. The winner's side is random; label_0/label_1 are
  1.0/0.0 or 0.0/1.0 and ``best_image_uid`` is the winner's uid.
* ties (``round(pairs * ties)`` rows): both images draw the caption
  faithfully (independent jitter); label_0 = label_1 = 0.5 and ``broken`` is
  null. ``best_image_uid`` holds one of the two uids, picked at random: we could
  not confirm what the published data stores for ties, and the published tools
  (PickScore's evaluation script) recognise a tie by ``label_0 == 0.5``, never
  by ``best_image_uid`` - so readers must do the same.
* corrupt rows (``expected_counts(...)["corrupt"]`` rows, all decisive):
  jpg_0, jpg_1 or both hold bytes that fail a full decode - a JPEG cut in half,
  random bytes, or empty bytes, in equal shares. Nothing in the row says so;
  the embed job has to find out.

Rounding is half-up: ``floor(pairs * fraction + 0.5)``; corrupt rows are
capped at the rows left after ties. The same seed gives byte-identical files
(every row draws from its own generator seeded by ``(seed, row)``, so rows do
not depend on ``shard_rows`` either); no clock is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from img.data import shapes_world as sw
from img.errors import UserError
from img.paths import check_writable_folder
from schemas import pickapic
from schemas.meta import with_provenance

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JPEG_QUALITY = 90
SHARD_RE = re.compile(r"^train-(\d{5})-of-(\d{5})(-[0-9a-f]{16})?\.parquet$")
FORMATS = ("sample", "pickapic")
HF_ROW_GROUP_ROWS = 100  # HF datasets' parquet row group size for datasets with binary columns
CORRUPTIONS = ("truncated", "garbage", "empty")
# The plan holds ~420 bytes per row in memory (0.42 GB per million rows, measured) and the shards take ~4.7 kB
# per row on disk; 2M rows is twice Pick-a-Pic v2's 959K training rows and hours of drawing on a CPU.
MAX_PAIRS = 2_000_000
DISK_BYTES_PER_PAIR = 5_000
# Names are drawn independently of the label, so they carry no signal.
MODELS = (
    "shapes-world/painter-a",
    "shapes-world/painter-b",
    "shapes-world/painter-c",
    "shapes-world/painter-d",
)
_EPOCH = np.datetime64("2023-05-01T00:00:00", "ns")
_PLAN_STREAM, _ROW_STREAM = 0, 1


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def expected_counts(pairs: int, corrupt: float = 0.0, ties: float = 0.1) -> dict[str, int]:
    """Exact row counts ``write_sample`` produces: ties, corrupt (all decisive) and decisive rows."""
    n_ties = _round_half_up(pairs * ties)
    n_corrupt = min(_round_half_up(pairs * corrupt), pairs - n_ties)
    return {"pairs": pairs, "ties": n_ties, "decisive": pairs - n_ties, "corrupt": n_corrupt}


def shard_name(index: int, count: int, tag: str = "") -> str:
    """``train-00000-of-00004.parquet``; with ``tag`` (16 hex digits) HF's ``train-00000-of-00004-<tag>.parquet``."""
    return f"train-{index:05d}-of-{count:05d}" + (f"-{tag}" if tag else "") + ".parquet"


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The shard files of a sample folder, in order."""
    folder = Path(path)
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name)) if folder.is_dir() else []


def read_sample(path: str | os.PathLike) -> pa.Table:
    """Read every shard of a sample folder into one table (rows in written order)."""
    paths = shard_paths(path)
    if not paths:
        raise UserError(f"no sample shards (train-*-of-*.parquet) in {path}. "
                        f"Write some with `img data sample --out {path}`.")
    return pa.concat_tables([pq.read_table(p) for p in paths])


# ---------------------------------------------------------------- validation
def _validate(out: Path, pairs: int, seed: int, corrupt: float, ties: float, shard_rows: int,
              fmt: str = "sample", row_group_rows: int | None = None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"`fmt` must be one of {', '.join(FORMATS)}, got {fmt!r}. "
                        "`fmt` \"pickapic\" writes exactly the published columns.")
    if row_group_rows is not None and (isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int)
                                       or row_group_rows < 1):
        raise UserError(f"`row_group_rows` must be an integer >= 1, got {row_group_rows!r}. Pass e.g. 100.")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise UserError(f"`pairs` must be an integer >= 1, got {pairs!r}. Pass e.g. 2000.")
    if pairs > MAX_PAIRS:
        raise UserError(f"`pairs` {pairs} is more than the sample supports ({MAX_PAIRS:,}, twice Pick-a-Pic v2's "
                        "size). Pass a smaller `pairs`; for real data point `img jobs embed --source` at the shards.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"`seed` must be an integer >= 0, got {seed!r}. Pass e.g. 0.")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise UserError(f"`shard_rows` must be an integer >= 1, got {shard_rows!r}. Pass e.g. 500.")
    if not (0.0 <= corrupt <= 1.0):
        raise UserError(f"`corrupt` must be a fraction between 0 and 1, got {corrupt!r}. Pass e.g. 0.02.")
    if not (0.0 <= ties <= 1.0):
        raise UserError(f"`ties` must be a fraction between 0 and 1, got {ties!r}. Pass e.g. 0.1.")
    if corrupt + ties > 1.0:
        raise UserError(f"`corrupt` + `ties` must be <= 1 (corrupt rows are decisive rows), got "
                        f"{corrupt!r} + {ties!r} = {corrupt + ties!r}. Lower one of them.")
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {out} is an existing file, not a folder. Pass a new or empty folder.")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not SHARD_RE.match(p.name))
        if others:
            raise UserError(f"`out` {out} already holds {len(others)} file(s) that are not sample shards "
                            f"(e.g. {others[0]!r}). Pass a new or empty folder, or one holding only a "
                            f"previous sample.")
    parent = out.parent
    # real write probes (they leave nothing): os.access says "writable" to root even for an immutable folder
    check_writable_folder(parent, f"the parent folder of `out` {str(out)!r},")
    if out.is_dir():
        check_writable_folder(out, "`out`")
    need = pairs * DISK_BYTES_PER_PAIR
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise UserError(f"`pairs` {pairs} needs about {need / 1e9:.1f} GB in {parent}, which has {free / 1e9:.1f} GB "
                        "free. Pass a smaller `pairs` or another `out`.")
    parent.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- rows
def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No EXIF/ICC and no optimisation passes: the bytes depend on the pixels only.
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def decodes(data: bytes) -> bool:
    """True if ``data`` is an image that fully decodes (header and every pixel)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "does not decode"
        return False


def _corrupt(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        bad = data[: len(data) // 2]
        if decodes(bad):  # never seen; guard the promise the tests rely on
            raise RuntimeError("a JPEG cut in half still decoded")
        return bad
    while True:  # garbage; redraw in the (astronomically unlikely) case it parses as an image
        bad = rng.bytes(int(rng.integers(64, 4096)))
        if not decodes(bad):
            return bad


def _row_rng(seed: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, _ROW_STREAM, row])


def _row_scene(seed: int, row: int, kind: str | None) -> tuple[sw.Scene, np.random.Generator]:
    rng = _row_rng(seed, row)
    return sw.sample_scene(rng, groups=2 if kind == "relation" else None), rng


class _Plan:
    """Everything decided across rows: ties, corruption, breaks, sides, ids, times."""

    def __init__(self, pairs: int, seed: int, corrupt: float, ties: float) -> None:
        counts = expected_counts(pairs, corrupt, ties)
        rng = np.random.default_rng([seed, _PLAN_STREAM])
        perm = rng.permutation(pairs)
        self.tie = np.zeros(pairs, bool)
        self.tie[perm[: counts["ties"]]] = True
        corrupt_rows = perm[counts["ties"]: counts["ties"] + counts["corrupt"]]
        # Balanced breaks over decisive rows, shuffled.
        kinds = np.resize(np.arange(len(sw.BROKEN_KINDS)), counts["decisive"])
        rng.shuffle(kinds)
        self.broken: list[str | None] = [None] * pairs
        for row, k in zip(np.flatnonzero(~self.tie), kinds):
            self.broken[row] = sw.BROKEN_KINDS[int(k)]
        # Corruption: balanced kinds, random side (0, 1 or both).
        ckinds = np.resize(np.arange(len(CORRUPTIONS)), len(corrupt_rows))
        rng.shuffle(ckinds)
        csides = rng.integers(0, 3, size=len(corrupt_rows))
        self.corrupt: dict[int, tuple[str, int]] = {
            int(r): (CORRUPTIONS[int(k)], int(s)) for r, k, s in zip(corrupt_rows, ckinds, csides)
        }
        self.winner = rng.integers(0, 2, size=pairs)  # for ties: the side best_image_uid names
        raw = rng.bytes(16 * 2 * pairs)
        self.uids = [str(uuid.UUID(bytes=raw[16 * k: 16 * k + 16], version=4)) for k in range(2 * pairs)]
        gaps = rng.integers(1_000_000_000, 90_000_000_000, size=pairs)  # 1-90 s apart, in ns
        self.created_at = _EPOCH + np.cumsum(gaps).astype("timedelta64[ns]")
        users = rng.integers(100_000, 2_000_000, size=max(1, pairs // 8))
        self.user_id = users[rng.integers(0, len(users), size=pairs)]
        self.ranking_id = int(rng.integers(1_000_000, 9_000_000)) + np.arange(pairs, dtype=np.int64)
        self.models = rng.integers(0, len(MODELS), size=(pairs, 2))


def _make_row(seed: int, row: int, plan: _Plan, per_prompt: Counter) -> dict:
    kind = plan.broken[row]
    scene, rng = _row_scene(seed, row, kind)
    bg = sw.sample_background(rng)
    layout = int(rng.integers(2**63))
    good = _jpeg(sw.render(scene, np.random.default_rng(layout), background=bg))
    # Winner and loser are two separate drawings, each with its own layout jitter (same background), as
    # real pairs are two generations; a tie draws the caption twice.
    drawn = scene if kind is None else sw.break_scene(scene, kind, rng)
    bad = _jpeg(sw.render(drawn, np.random.default_rng(int(rng.integers(2**63))), background=bg))
    w = int(plan.winner[row])
    jpgs = [good, bad] if w == 0 else [bad, good]
    if row in plan.corrupt:
        ckind, side = plan.corrupt[row]
        for s in ((0, 1) if side == 2 else (side,)):
            jpgs[s] = _corrupt(jpgs[s], ckind, rng)
    uid0, uid1 = plan.uids[2 * row], plan.uids[2 * row + 1]
    if kind is None:
        labels = (0.5, 0.5)
    else:
        labels = (1.0, 0.0) if w == 0 else (0.0, 1.0)
    caption = scene.caption()
    return {
        "are_different": True,
        "best_image_uid": uid0 if w == 0 else uid1,
        "caption": caption,
        "created_at": plan.created_at[row],
        "has_label": True,
        "image_0_uid": uid0,
        "image_0_url": f"https://example.invalid/{uid0}.jpg",
        "image_1_uid": uid1,
        "image_1_url": f"https://example.invalid/{uid1}.jpg",
        "jpg_0": jpgs[0],
        "jpg_1": jpgs[1],
        "label_0": labels[0],
        "label_1": labels[1],
        "model_0": MODELS[int(plan.models[row, 0])],
        "model_1": MODELS[int(plan.models[row, 1])],
        "ranking_id": int(plan.ranking_id[row]),
        "user_id": int(plan.user_id[row]),
        "num_example_per_prompt": per_prompt[caption],
        "broken": kind,
    }


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The rows as a table of ``schema``'s columns (others, such as ``broken`` for the published form, dropped)."""
    cols = {name: [r[name] for r in rows] for name in schema.names}
    cols["created_at"] = pa.array(np.array(cols["created_at"], dtype="datetime64[ns]"), pa.timestamp("ns"))
    return pa.Table.from_pydict(cols, schema=schema)


# ---------------------------------------------------------------- writing
def _install(tmp: Path, out: Path) -> None:
    """Move finished shards from ``tmp`` into ``out``; every file appears by an atomic rename."""
    if not out.exists():
        os.rename(tmp, out)  # the whole set appears at once
        return
    new = {p.name for p in tmp.iterdir()}
    for p in sorted(tmp.iterdir()):
        os.replace(p, out / p.name)
    for p in out.iterdir():  # shards of a previous sample that the new one does not overwrite
        if SHARD_RE.match(p.name) and p.name not in new:
            p.unlink()
    tmp.rmdir()


def _shard_layout(fmt: str, params: dict, params_hash: str, shard_rows: int,
                  row_group_rows: int | None) -> tuple[pa.Schema, int]:
    """(schema, rows per row group) of a shard: the published schema and HF's row groups for ``pickapic``,
    else the sample schema with its provenance and one row group per shard."""
    if fmt == "pickapic":
        return pickapic.SCHEMA.remove_metadata(), row_group_rows or HF_ROW_GROUP_ROWS
    schema = with_provenance(pickapic.SAMPLE_SCHEMA, table="pickapic_sample", version=SCHEMA_VERSION,
                             fingerprint=params_hash[:16], extra=params)
    return schema, row_group_rows or shard_rows


def write_sample(
    out: str | os.PathLike,
    *,
    pairs: int = 2000,
    seed: int = 0,
    corrupt: float = 0.0,
    ties: float = 0.1,
    shard_rows: int = 500,
    fmt: str = "sample",
    row_group_rows: int | None = None,
) -> str:
    """Write ``pairs`` shapes-world rows as Pick-a-Pic v2 parquet shards into ``out``.

    ``fmt`` is ``"sample"`` (published columns + ``broken`` + provenance) or
    ``"pickapic"`` (exactly the published columns, nothing else);
    ``row_group_rows`` defaults to ``shard_rows`` for ``sample`` and 100 for
    ``pickapic``. ``out`` must be new, empty, or hold only shards of a previous
    sample (they are replaced). Returns a one-line summary.
    """
    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    _validate(out, pairs, seed, corrupt, ties, shard_rows, fmt, row_group_rows)
    counts = expected_counts(pairs, corrupt, ties)
    plan = _Plan(pairs, seed, corrupt, ties)
    per_prompt = Counter(_row_scene(seed, r, plan.broken[r])[0].caption() for r in range(pairs))
    params = {"pairs": pairs, "seed": seed, "corrupt": corrupt, "ties": ties, "generator": "img.data.sample",
              "image_size": sw.SIZE, "jpeg_quality": JPEG_QUALITY}
    params_hash = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    schema, group_rows = _shard_layout(fmt, params, params_hash, shard_rows, row_group_rows)
    n_shards = math.ceil(pairs / shard_rows)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the sample is an ordinary folder
    nbytes = 0
    try:
        for s in range(n_shards):
            lo, hi = s * shard_rows, min(pairs, (s + 1) * shard_rows)
            table = _table([_make_row(seed, r, plan, per_prompt) for r in range(lo, hi)], schema)
            tag = hashlib.sha256(f"{params_hash}:{s}".encode()).hexdigest()[:16] if fmt == "pickapic" else ""
            path = tmp / shard_name(s, n_shards, tag)
            pq.write_table(table, path, row_group_size=group_rows, compression="snappy")
            nbytes += path.stat().st_size
            logger.info("wrote %s (%d rows)", path.name, hi - lo)
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    kinds = Counter(k for k in plan.broken if k is not None)
    dt = time.perf_counter() - t0
    return (
        f"wrote {pairs} pairs to {out} in {n_shards} shard(s) ({fmt} format), {nbytes / 1e6:.1f} MB, {dt:.1f}s: "
        f"{counts['decisive']} decisive (broken " + ", ".join(f"{k} {kinds[k]}" for k in sw.BROKEN_KINDS)
        + f"), {counts['ties']} ties, {counts['corrupt']} corrupt rows"
    )
