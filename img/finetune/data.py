"""Fine-tuning input: InstructPix2Pix-layout shards, validated once, read by a rank-sharded loader.

    shards = list_edit_shards("data/edits")               # *.parquet and *.jsonl under a folder (or one file)
    plan = plan_shards(shards)                            # every record checked; bad ones -> plan.quarantine
    loader = EditLoader(plan, batch_size=16, seed=0, heldout_fraction=0.05)
    batch = next(iter(loader))                            # [EditRecord(record_id, image, caption, instruction), ...]
    loader.state_dict()                                   # {"epoch": 0, "position": 1, ...}: part of a checkpoint

A record is used for training as (input image, *edited* caption, instruction):
``original_image``, ``edited_prompt`` and ``edit_prompt``. Its id is
``<shard file name>#<row>``. Images may be binary, ``{"bytes": ..., "path": ...}``
structs (how the published parquet stores ``datasets.Image``), base64 text (JSONL),
or a ``path`` relative to a local shard's folder.

Planning reads the three columns once and fully decodes every input image with the
embed job's decoder; a record with an empty instruction or caption, or an input
image that is empty, does not decode or has an impossible size, goes to
``plan.quarantine`` with the reason. The held-out split is a hash of the record id
(``is_heldout``: a hash of the record id), so it does not depend on shard order or world size.

The loader shuffles at two levels so that it reads each parquet row group (or block of
JSONL lines) once per epoch: the order of blocks is permuted per epoch (seeded),
blocks are dealt to ranks round-robin, and records are permuted within windows of
``shuffle_blocks`` blocks. Every rank yields the same number of batches per epoch.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from img.data.shard_files import list_shard_files
from img.errors import UserError
from pipelines.embed import Decode
from pipelines.source import SourceShard
from schemas.instructpix2pix import REQUIRED

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
JSONL_BLOCK_ROWS = 64  # lines per block of a JSONL shard
MIN_SIDE, MAX_PIXELS = 16, 60_000_000  # as the embed job (jobs/embed.toml)


@dataclass(frozen=True)
class EditShard:
    """One input file: where it is, its format, and what it looked like when planned."""

    uri: str
    name: str
    format: str  # "parquet" | "jsonl"
    size: int
    mtime_ns: int

    def open(self):
        return SourceShard(uri=self.uri, name=self.name).open()


@dataclass
class EditRecord:
    record_id: str
    image: Any  # PIL RGB image
    caption: str  # the edited caption (edited_prompt)
    instruction: str  # the edit instruction (edit_prompt)


@dataclass
class EditPlan:
    """Every usable record, by block; JSON-serialisable (``run_dir/data_plan.json``)."""

    shards: list[EditShard]
    blocks: list[list[int]]  # [shard index, row group (parquet) or byte offset (jsonl), rows, first row]
    good: list[list[int]]  # [block index, row in block] of every usable record
    rows: int = 0  # records read
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # rows of the finetune_quarantine table

    def record_id(self, ref: tuple[int, int] | list[int]) -> str:
        b, r = ref
        shard, _, _, first = self.blocks[b]
        return f"{self.shards[shard].name}#{first + r}"

    def to_json(self) -> str:
        return json.dumps({"shards": [asdict(s) for s in self.shards], "blocks": self.blocks, "good": self.good,
                           "rows": self.rows, "quarantined": len(self.quarantine)})

    @classmethod
    def from_json(cls, text: str) -> "EditPlan":
        d = json.loads(text)
        return cls(shards=[EditShard(**s) for s in d["shards"]], blocks=d["blocks"], good=d["good"], rows=d["rows"])


# ----------------------------------------------------------------------------- listing
def list_edit_shards(data: str | os.PathLike) -> list[EditShard]:
    """All ``*.parquet`` / ``*.jsonl`` files under ``data`` (a folder, a file, or a URI), sorted by path."""
    files = list_shard_files(data, "`data`", tuple(FORMATS),
                             "a folder of InstructPix2Pix parquet or JSONL shards (original_prompt, original_image, "
                             "edit_prompt, edited_prompt, edited_image), e.g. one written by "
                             "`img data sample --kind edits --out DIR`")
    return [EditShard(uri=f.uri, name=f.name, format=FORMATS[os.path.splitext(f.name)[1]], size=f.size,
                      mtime_ns=f.mtime_ns) for f in files]


# ----------------------------------------------------------------------------- reading
def _parquet_blocks(shard: EditShard) -> tuple[list[tuple[int, int]], Any]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.open())
    missing = [c for c in REQUIRED if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"data shard {shard.uri!r} lacks InstructPix2Pix column(s) {missing}. Pass shards with "
                        "original_image, edited_prompt and edit_prompt (see `img data sample --kind edits`).")
    return [(rg, pf.metadata.row_group(rg).num_rows) for rg in range(pf.num_row_groups)], pf


def is_heldout(record_id: str, fraction: float) -> bool:
    """Deterministic split: blake2b(record_id) as a number in [0, 1) below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction



def _lines(f: Any, offset: int = 0, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every non-empty line of a seekable binary file, from ``offset`` on."""
    f.seek(offset)
    buf, pos = b"", offset
    while True:
        data = f.read(chunk)
        if data:
            buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if buf[start:end].strip():
                yield pos + start, buf[start:end]
            start = end + 1
        buf, pos = buf[start:], pos + start
        if not data:
            if buf.strip():
                yield pos, buf
            return


def _jsonl_blocks(shard: EditShard) -> list[tuple[int, int]]:
    """(byte offset, lines) of every block of ``JSONL_BLOCK_ROWS`` non-empty lines."""
    blocks, start, n = [], 0, 0
    with shard.open() as f:
        for offset, _ in _lines(f):
            if n == 0:
                start = offset
            n += 1
            if n == JSONL_BLOCK_ROWS:
                blocks.append((start, n))
                n = 0
    if n:
        blocks.append((start, n))
    return blocks


def read_block(shard: EditShard, locator: int, rows: int, parquet_file: Any = None) -> list[dict[str, Any]]:
    """The records of one block as dicts of the required columns (images not yet decoded)."""
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        pf = parquet_file or pq.ParquetFile(shard.open())
        return pf.read_row_group(locator, columns=list(REQUIRED)).to_pylist()
    out = []
    with shard.open() as f:
        for _, line in _lines(f, locator, chunk=1 << 16):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = {"__error__": f"not a JSON object ({e.msg})"}
            if not isinstance(rec, dict):
                rec = {"__error__": "not a JSON object"}
            out.append(rec)
            if len(out) == rows:
                break
    return out


def image_bytes(value: Any, shard: EditShard) -> tuple[bytes | None, str | None]:
    """The encoded image of a cell: binary, ``{"bytes", "path"}``, base64 text, or a path beside a local shard."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            if "://" in shard.uri:
                return None, f"image stored by path {path!r}, not in the shard"
            local = path if os.path.isabs(path) else os.path.join(os.path.dirname(shard.uri), path)
            try:
                with open(local, "rb") as fh:
                    return fh.read(), None
            except OSError as e:
                return None, f"image file {path!r} cannot be read ({e.strerror})"
        value = data
    if value is None:
        return None, None
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True), None
        except (binascii.Error, ValueError):
            return None, "image text is not base64"
    return bytes(value), None


_DECODER = Decode(MIN_SIDE, MAX_PIXELS, question_seed=0)  # the embed job's checks ("as in embed")


def check_record(rec: dict[str, Any], shard: EditShard) -> tuple[np.ndarray | None, str | None]:
    """(decoded input image, None) for a usable record, else (None, the reason it is quarantined)."""
    if "__error__" in rec:
        return None, rec["__error__"]
    missing = [c for c in REQUIRED if c not in rec]
    if missing:
        return None, f"missing field(s) {missing}"
    if not str(rec["edit_prompt"] or "").strip():
        return None, "empty instruction (edit_prompt)"
    if not str(rec["edited_prompt"] or "").strip():
        return None, "empty edited caption (edited_prompt)"
    data, err = image_bytes(rec["original_image"], shard)
    if err:
        return None, f"original_image: {err}"
    return _DECODER._decode(data, "original_image")


def plan_shards(shards: list[EditShard], rank: int = 0, world_size: int = 1) -> EditPlan:
    """Check every record of ``shards[rank::world_size]``; see ``gather_plans`` to combine the ranks' parts."""
    blocks, good, quarantine, rows = [], [], [], 0
    for si, shard in enumerate(shards):
        if si % world_size != rank:
            continue
        pf = None
        if shard.format == "parquet":
            layout, pf = _parquet_blocks(shard)
        else:
            layout = _jsonl_blocks(shard)
        first = 0
        for locator, n in layout:
            b = len(blocks)
            blocks.append([si, locator, n, first])
            for r, rec in enumerate(read_block(shard, locator, n, pf)):
                _, reason = check_record(rec, shard)
                if reason is None:
                    good.append([b, r])
                else:
                    caption = rec.get("edited_prompt") if isinstance(rec, dict) else None
                    quarantine.append({"pair_id": f"{shard.name}#{first + r}", "source": shard.uri,
                                       "row": first + r, "reason": reason, "caption": str(caption or "")})
            rows += n
            first += n
    return EditPlan(shards=shards, blocks=blocks, good=good, rows=rows, quarantine=quarantine)


def gather_plans(parts: list[EditPlan]) -> EditPlan:
    """One plan from the ranks' parts (blocks renumbered in shard order)."""
    shards = parts[0].shards
    order = sorted(((p, b) for p in range(len(parts)) for b in range(len(parts[p].blocks))),
                   key=lambda pb: tuple(parts[pb[0]].blocks[pb[1]][i] for i in (0, 3)))
    new_index = {pb: i for i, pb in enumerate(order)}
    blocks = [parts[p].blocks[b] for p, b in order]
    good = sorted([new_index[(p, g[0])], g[1]] for p in range(len(parts)) for g in parts[p].good)
    quarantine = sorted((q for p in parts for q in p.quarantine), key=lambda q: (q["source"], q["row"]))
    return EditPlan(shards=shards, blocks=blocks, good=good, rows=sum(p.rows for p in parts), quarantine=quarantine)


def shards_changed(plan: EditPlan, shards: list[EditShard]) -> list[str]:
    """Names of shards that differ (added, removed, resized, modified) from when ``plan`` was made."""
    old = {s.uri: s for s in plan.shards}
    new = {s.uri: s for s in shards}
    return sorted(os.path.basename(u) for u in set(old) | set(new) if old.get(u) != new.get(u))


# ----------------------------------------------------------------------------- the loader
class EditLoader:
    """Batches of ``EditRecord`` for one rank, forever (epoch after epoch), in a seeded order."""

    def __init__(self, plan: EditPlan, *, rank: int = 0, world_size: int = 1, batch_size: int = 16, seed: int = 0,
                 heldout_fraction: float = 0.05, shuffle_blocks: int = 8) -> None:
        if batch_size < 1 or shuffle_blocks < 1:
            raise UserError(f"batch_size ({batch_size}) and shuffle_blocks ({shuffle_blocks}) must be >= 1.")
        if not 0.0 <= heldout_fraction < 1.0:
            raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
        self.plan, self.rank, self.world = plan, rank, world_size
        self.batch_size, self.seed, self.shuffle_blocks = batch_size, seed, shuffle_blocks
        self.heldout_fraction = heldout_fraction
        held = [is_heldout(plan.record_id(g), heldout_fraction) for g in plan.good]
        self.train_refs = [tuple(g) for g, h in zip(plan.good, held) if not h]
        self.heldout_refs = [tuple(g) for g, h in zip(plan.good, held) if h]
        self.by_block: dict[int, list[int]] = {}
        for b, r in self.train_refs:
            self.by_block.setdefault(b, []).append(r)
        if self.steps_in_epoch(0) < 1:
            raise UserError(
                f"{len(self.train_refs)} training records ({len(plan.good)} usable, {len(self.heldout_refs)} held out) "
                f"do not fill one batch of {batch_size} on each of {world_size} rank(s). Add data or lower batch_size.")
        self.epoch, self.position = 0, 0
        self._cache: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._order_epoch, self._order = -1, []

    # ---- order
    def _rank_blocks(self, epoch: int) -> list[list[int]]:
        blocks = sorted(self.by_block)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(blocks))
        return [[blocks[i] for i in perm[r::self.world]] for r in range(self.world)]

    def steps_in_epoch(self, epoch: int) -> int:
        return min(sum(len(self.by_block[b]) for b in bl) for bl in self._rank_blocks(epoch)) // self.batch_size

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's (block, row) sequence for ``epoch``: block windows, records permuted within each."""
        mine = self._rank_blocks(epoch)[self.rank]
        rng = np.random.default_rng([self.seed, epoch, 1 + self.rank])
        order: list[tuple[int, int]] = []
        for w in range(0, len(mine), self.shuffle_blocks):
            window = [(b, r) for b in mine[w: w + self.shuffle_blocks] for r in self.by_block[b]]
            order += [window[i] for i in rng.permutation(len(window))]
        return order[: self.steps_in_epoch(epoch) * self.batch_size]

    # ---- reading
    def _block(self, b: int) -> list[dict[str, Any]]:
        if b not in self._cache:
            si, locator, n, _ = self.plan.blocks[b]
            self._cache[b] = read_block(self.plan.shards[si], locator, n)
            while len(self._cache) > self.shuffle_blocks:
                self._cache.popitem(last=False)
        self._cache.move_to_end(b)
        return self._cache[b]

    def records(self, refs: list[tuple[int, int]]) -> list[EditRecord]:
        """Read and decode the records ``refs`` (block, row)."""
        from PIL import Image

        out = []
        for b, r in refs:
            rec = self._block(b)[r]
            shard = self.plan.shards[self.plan.blocks[b][0]]
            data, err = image_bytes(rec["original_image"], shard)
            if err or data is None:
                raise UserError(f"record {self.plan.record_id((b, r))} changed since planning ({err or 'no image'}). "
                                "Start a new `run_dir` on the current data.")
            image = Image.open(io.BytesIO(data)).convert("RGB")
            out.append(EditRecord(self.plan.record_id((b, r)), image, str(rec["edited_prompt"]).strip(),
                                  str(rec["edit_prompt"]).strip()))
        return out

    def __iter__(self) -> Iterator[list[EditRecord]]:
        while True:
            if self._order_epoch != self.epoch:
                self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
            if self.position >= len(self._order) // self.batch_size:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            i = self.position * self.batch_size
            batch = self.records(self._order[i: i + self.batch_size])
            self.position += 1
            yield batch

    def heldout(self, max_records: int = 0) -> list[tuple[int, int]]:
        """This rank's share of the held-out records (the first ``max_records`` of all, 0 = all)."""
        refs = self.heldout_refs[: max_records or None]
        return refs[self.rank::self.world]

    # ---- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world, "records": len(self.train_refs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world,
                "records": len(self.train_refs)}
        diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if diff:
            raise UserError(f"the checkpoint's data order was made with {diff} (checkpoint, now); resume with the "
                            "same data, seed, batch_size and number of ranks.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
