"""The training loader: cached tensors from ``<lake>/features.lance``, sharded, shuffled, prefetched.

    loader = TrainLoader("lake", rank=0, world_size=1, batch_size=8, seed=0)
    for batch in loader:             # endless; epochs follow each other
        batch.loser, batch.winner    # (B, N, D) torch tensors in the lake dtype (fp16/bf16)
        batch.guidance, batch.mask   # (B, L_max, E) padded per batch, (B, L_max) bool True = valid
        batch.to("cuda", torch.bfloat16)  # the training dtype on the device
        batch.release()              # (or `with batch:`) its padded buffer goes back to the loader
        state = loader.state_dict()  # {epoch, position, ...}: the next batch to be yielded
    loader.load_state_dict(state)    # continue the data order exactly (``--resume``)

Design:
- The MLLM guidance is a Lance *blob* column. A local lake written by the embed
  job (Lance format 2.1) keeps each blob inside its fragment's data file, at the
  ``position`` its blob description gives: the loader memory-maps the data files
  and copies (fp8: dequantises) each row straight into the padded batch, and
  reads the token columns with Lance's file reader on the same files (several
  times cheaper per row than a dataset ``take``). Positions and lengths are read
  once when the loader starts; the first blob of every mapped file is compared
  with Lance's own read of it. Other lakes (object stores, format 2.2, which puts
  each large blob in a file of its own) are read with ``take`` and ``take_blobs``
  (``blob_api``). Measured in ``img bench loader``.
- The versions of ``features`` and ``pairs`` are pinned when the loader starts
  (and saved in its state), so an embed job appending to the lake never changes
  the order of a running or resumed training run.
- Only pairs committed to ``pairs.lance`` (the embed job's commit marker) are used,
  each once: duplicate ``pair_id`` rows are dropped (first kept) and counted in the start-up log.
- Held-out split, a fixed number of pairs (``heldout_pairs``): the pairs with the
  smallest blake2b hash of their ``pair_id``, or, with ``heldout_split`` (e.g.
  "validation"), every pair whose source shard name starts with it (the Pick-a-Pic
  validation split embedded into the same lake). Either way it depends on the
  pair ids only, never on the table's row order.
- Training pairs are put in ``pair_id`` order before shuffling, so the same seed
  gives the same pairs in the same order on any lake holding the same pairs,
  whatever order the embed job committed its fragments in.
- Each epoch is a permutation of the training pairs drawn from (seed, epoch),
  truncated to a multiple of world_size * batch_size so all ranks step together,
  and dealt round-robin to ranks: shards are disjoint within an epoch.
- The padded (B, L_max, E) guidance is written by the reader threads into a
  recycled buffer (see ``BufferPool``), in ``pad_dtype`` (default: the lake's
  16-bit dtype; fp8 lakes are dequantised into it; ``"stored"`` pads the values as
  stored, so fp8 stays e4m3 bytes + scales for ``Batch.to`` to dequantise on the device).
  The batch owns that buffer and gives it back to the pool when released
  (``batch.release()``, ``with batch:``) or when its padded tensor is garbage-collected,
  never earlier; per-row blob reads go back to the pool as soon as they are copied.
- Prefetching uses threads (Lance releases the GIL while reading and is not
  fork-safe): one thread assembles up to ``prefetch`` batches ahead and
  ``num_workers`` threads read the blob rows of a batch in parallel
  (``num_workers = 0``: everything in the caller's thread). Memory is bounded by
  about (prefetch + 2) batches of buffers.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch

from img import fp8
from img.errors import UserError
from img.lake import tables as lake_mod
from schemas import features as features_schema
from schemas.meta import read_provenance

log = logging.getLogger(__name__)

GuidanceSource = Literal["mllm", "text", "none"]
MAX_MAPPED_FILES = 16384  # open files for memory maps and file readers (half each); 851K pairs in 128-row fragments: 6,650
GUIDANCE_COLUMNS = {"mllm": "guidance", "text": "text_guidance"}


@dataclass(frozen=True)
class LakeDims:
    """Tensor shapes of a features table, from its schema metadata."""

    ip_tokens: int  # N
    ip_dim: int  # D
    guidance_dim: int  # E (MLLM hidden size)
    text_guidance_dim: int | None  # width of the text-only guidance, when stored
    dtype: str  # "float16" | "bfloat16" (bf16 stored bit-cast in 2-byte words)
    profile: str | None = None  # profile that wrote the table, when recorded
    guidance_dtype: str | None = None  # "float8_e4m3fn" for fp8 guidance (+ per-token scales); None = ``dtype``


class Batch:
    """One training batch; the guidance comes padded, as the loader's threads wrote it.

    ``batch.guidance`` / ``batch.mask`` give the padded (B, L_max, E) tensor and its (B, L_max)
    mask (True = valid). ``batch.to(device, dtype)`` converts (a no-op when the loader already padded
    into that dtype on that device; the returned batch then owns the buffer, and releasing it, not
    this one, gives the buffer back). A batch of fp8 guidance kept as read (``pad_dtype="stored"``) holds the e4m3 bytes and
    (B, L_max) scales and is dequantised on the target device by ``to``.

    The padded guidance lies in a buffer the batch owns (from the loader's ``BufferPool``).
    ``release()`` gives it back for the next reads (``with batch:`` does it on exit); without it the
    buffer goes back when the padded tensor (and every view of it) is garbage-collected. After
    ``release()`` the guidance is gone; copy what you keep (``batch.to``) before.
    """

    def __init__(self, pair_ids: list[str], winner: torch.Tensor, loser: torch.Tensor,
                 guidance_rows: list[np.ndarray] | None, lengths: torch.Tensor, guidance_dim: int,
                 storage_dtype: torch.dtype = torch.float16, padded: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, give_back: "weakref.finalize | None" = None) -> None:
        self.pair_ids = pair_ids
        self.winner = winner  # (B, N, D)
        self.loser = loser  # (B, N, D)
        self.guidance_rows = guidance_rows  # unpadded rows (len_i, E) of storage_dtype bits, or None
        self.lengths = lengths  # (B,) int64 on CPU
        self.guidance_dim = guidance_dim
        self.storage_dtype = storage_dtype  # float16 or bfloat16: what fp8 guidance is dequantised to by default
        self._padded = padded  # (B, L_max, E): values, or uint8 e4m3 bits when ``scale`` is set
        self._scale = scale  # (B, L_max) float32 per-token scales of fp8 guidance kept as read
        self._released = False
        # gives ``padded``'s pool buffer back: once, on release() or when the buffer's last array is collected
        self._give_back = give_back

    def release(self) -> None:
        """Give the padded guidance buffer back to the loader; the guidance is gone afterwards (idempotent)."""
        if self._give_back is not None:
            self._padded, self._scale, self.guidance_rows, self._released = None, None, None, True
            self._give_back()
            self._give_back = None

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def _pad_into(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        if self._released:
            raise RuntimeError("this batch was released: its padded guidance went back to the loader; "
                               "copy it (batch.to) before release()")
        if self._scale is not None:  # fp8 as read: dequantise every (token, channel) on the target device
            b, length, e = self._padded.shape
            out = torch.empty(b, length, e, dtype=dtype, device=device)
            fp8.dequantize_into(out.view(b * length, e), self._padded.reshape(b * length, e),
                                self._scale.reshape(b * length))
            return out
        out = torch.zeros(len(self), self.max_len, self.guidance_dim, dtype=dtype, device=device)
        with warnings.catch_warnings():
            # the rows wrap the immutable bytes Lance returned (no copy); they are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for j, row in enumerate(self.guidance_rows or []):
                out[j, : row.shape[0]].copy_(torch.from_numpy(row).view(self.storage_dtype))
        return out

    @property
    def guidance(self) -> torch.Tensor:
        """(B, L_max, E), zero-padded; L_max = 0 for guidance source "none"."""
        if self._padded is None or self._scale is not None:
            self._padded, self._scale = self._pad_into(self.winner.device, self.storage_dtype), None
        return self._padded

    @property
    def mask(self) -> torch.Tensor:
        """(B, L_max) bool, True = valid guidance position."""
        m = torch.arange(self.max_len)[None, :] < self.lengths[:, None]
        return m.to(self._padded.device) if self._padded is not None else m

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Batch":
        if self._padded is not None and self._scale is None:
            g = self._padded.to(device, dtype)
        else:
            g = self._pad_into(device, dtype)
        give_back = None
        if g is self._padded:  # already that dtype on that device: no copy; the new batch owns the buffer now
            give_back, self._give_back = self._give_back, None
        return Batch(self.pair_ids, self.winner.to(device, dtype), self.loser.to(device, dtype), None,
                     self.lengths, self.guidance_dim, self.storage_dtype, padded=g, give_back=give_back)


def lake_dims(ds: Any, uri: str = "features") -> LakeDims:
    """Read (N, D, E, dtype) from the features table's provenance metadata."""
    extra = read_provenance(ds.schema)["extra"]
    missing = [k for k in ("ip_tokens", "ip_dim", "guidance_dim") if k not in extra]
    if missing:
        raise UserError(
            f"{uri} has no {missing} in its schema metadata (img.extra). It was not written by `img jobs embed`; "
            "re-run the embed job into a fresh `lake`."
        )
    dtype = str(extra.get("dtype", "float16"))
    if dtype not in ("float16", "bfloat16"):
        raise UserError(f"{uri} stores tensors as {dtype!r}; the loader reads float16 or bfloat16.")
    gdtype = extra.get("guidance_dtype")
    if gdtype not in (None, dtype, features_schema.FP8):
        raise UserError(f"{uri} stores guidance as {gdtype!r}; the loader reads {dtype} or {features_schema.FP8}.")
    tg = extra.get("text_guidance_dim")
    return LakeDims(int(extra["ip_tokens"]), int(extra["ip_dim"]), int(extra["guidance_dim"]),
                    int(tg) if tg is not None else None, dtype, extra.get("profile"),
                    gdtype if gdtype == features_schema.FP8 else None)


def heldout_key(pair_id: str) -> int:
    """The split's hash of a pair id: the ``count`` smallest keys are held out."""
    return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "big")


def split_heldout(pair_ids: list[str], count: int, split: str = "") -> tuple[list[int], list[int]]:
    """(train positions, held-out positions) into ``pair_ids``, both in ``pair_id`` order.

    ``split`` = "" holds out the ``count`` pairs with the smallest :func:`heldout_key`. A non-empty
    ``split`` holds out every pair whose shard name (the ``pair_id`` before ``#``) starts with it, none of
    which is trained on; ``count`` then caps only how many of them are evaluated (see ``heldout_batches``).
    Neither depends on the order of ``pair_ids``.
    """
    order = sorted(range(len(pair_ids)), key=lambda i: pair_ids[i])
    if split:
        held = {i for i in order if pair_ids[i].split("#", 1)[0].startswith(split)}
    else:
        held = set(sorted(order, key=lambda i: (heldout_key(pair_ids[i]), pair_ids[i]))[:max(0, count)])
    return [i for i in order if i not in held], [i for i in order if i in held]


def _two_byte_to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A uint16/float16 numpy array holding ``dtype`` values -> torch tensor of that dtype (no copy)."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a.view(np.float16))


def _raise_open_files_limit(want: int) -> int:
    """Raise this process's soft limit on open files towards ``want`` (never above the hard limit); the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return want if soft == resource.RLIM_INFINITY else max(int(soft), 1024 + 64)


def _blobs_inline(ds: Any, column: str) -> bool:
    """Whether ``column``'s blobs are described by (position, size) in their fragment's data file (format 2.0/2.1);
    format 2.2 keeps a large blob in a file of its own, whose name Lance does not expose."""
    import pyarrow as pa

    if ds.count_rows() == 0:
        return False
    t = ds.take([0], columns=[column]).schema.field(column).type
    return pa.types.is_struct(t) and sorted(t.field(i).name for i in range(t.num_fields)) == ["position", "size"]


def open_features(lake: str, version: int | None = None):
    """The pinned features dataset; UserError if the lake has none."""
    import lance

    ds = lake_mod.open_table(lake, "features")
    if ds is None:
        raise UserError(
            f"no features table at {lake_mod.table_uri(lake, 'features')}. "
            f"Run `img jobs embed --lake {lake} ...` first, or pass the `lake` that holds it."
        )
    if version is not None and version != ds.version:
        ds = lance.dataset(lake_mod.table_uri(lake, "features"), version=version)
    return ds


class BufferPool:
    """Reusable bytearrays for blob reads (``BlobFile.readinto`` needs a bytearray).

    A fresh bytearray costs a zero-fill as large as the read itself; recycling them removes that.
    Ownership is explicit: ``get`` hands a buffer out and the pool forgets it until ``give_back``
    returns it, so a buffer still in use (a batch being trained on, or kept by the caller) is never
    handed out twice. At most ``max_free`` idle buffers are kept.

        pool = BufferPool(max_free=4)
        buf = pool.get(1 << 20)   # at least 1 MiB, yours until you give it back
        pool.give_back([buf])     # the next get() of a similar size reuses it
    """

    def __init__(self, max_free: int = 64) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.RLock()  # RLock: a batch collected while get() holds it gives back safely
        self.max_free = max_free
        self.allocated = 0  # buffers created so far
        self.out = 0  # buffers handed out and not given back

    def get(self, size: int) -> bytearray:
        """An idle buffer of at least ``size`` bytes (at most about twice that), or a new one."""
        with self._lock:
            self.out += 1
            for i, b in enumerate(self._free):
                if size <= len(b) <= 2 * size + (1 << 20):
                    return self._free.pop(i)
            if len(self._free) >= self.max_free:  # bound memory: drop the oldest idle buffer (none fits)
                del self._free[0]
            self.allocated += 1
        return bytearray(max(size, 1))

    def give_back(self, buffers: list[bytearray]) -> None:
        """Return buffers from ``get``; the caller must not touch them (or views of them) afterwards."""
        with self._lock:
            self.out -= len(buffers)
            self._free.extend(buffers)
            del self._free[: max(0, len(self._free) - self.max_free)]  # keep the newest max_free

    def __len__(self) -> int:
        """Idle buffers held for reuse."""
        return len(self._free)


def _check_settings(guidance: str, heldout_pairs: Any, batch_size: int, rank: int, world_size: int) -> None:
    """The loader's arguments, before any table is opened."""
    if guidance not in ("mllm", "text", "none"):
        raise UserError(f"guidance source {guidance!r} must be 'mllm', 'text' or 'none'. "
                        "Set `guidance` in the train TOML.")
    if isinstance(heldout_pairs, bool) or not isinstance(heldout_pairs, int) or heldout_pairs < 0:
        raise UserError(f"heldout_pairs={heldout_pairs!r} must be an integer >= 0 (0 = no held-out pairs).")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"bad loader setting: batch_size={batch_size}, rank={rank}, world_size={world_size}.")


class TrainLoader:
    """Rank-sharded, per-epoch shuffled, prefetching iterator over training batches of a lake."""

    def __init__(
        self,
        lake: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        heldout_pairs: int = 0,
        heldout_split: str = "",
        guidance: GuidanceSource = "mllm",
        num_workers: int = 2,
        prefetch: int = 4,
        version: int | None = None,
        pairs_version: int | None = None,
        blob_api: Literal["auto", "mmap", "take_blobs", "read_blobs"] = "auto",
        pad_dtype: torch.dtype | Literal["stored"] | None = None,
    ) -> None:
        _check_settings(guidance, heldout_pairs, batch_size, rank, world_size)
        self.lake, self.rank, self.world_size, self.batch_size = lake, rank, world_size, batch_size
        self.seed, self.heldout_pairs, self.heldout_split, self.guidance = seed, heldout_pairs, heldout_split, guidance
        self.num_workers, self.prefetch = max(0, num_workers), max(1, prefetch)
        self.ds = open_features(lake, version)
        self.version = self.ds.version
        self.dims = lake_dims(self.ds, lake_mod.table_uri(lake, "features"))
        self._set_guidance(guidance, pad_dtype)
        self.blob_api = self._choose_blob_path(blob_api)  # the path taken: "mmap", "take_blobs" or "read_blobs"
        self._maps: dict[int, np.ndarray | None] = {}  # fragment id -> its data file, memory-mapped (None: not)
        self._maps_lock = threading.Lock()
        self._verified: set[int] = set()  # fragments whose blob positions were checked against Lance's own read
        self._max_open = _raise_open_files_limit(MAX_MAPPED_FILES + 1024) - 1024 if self.blob_api == "mmap" else 0
        pair_ids = self._index_rows()
        pairs = self._open_pairs(pairs_version)
        self._split(pair_ids, self._usable_rows(pair_ids, pairs), pairs)
        self.epoch, self.position = 0, 0
        self._buffers = BufferPool(max_free=max(16, (self.prefetch + 2) * batch_size))

    def _set_guidance(self, guidance: GuidanceSource, pad_dtype: torch.dtype | Literal["stored"] | None) -> None:
        """The guidance column and width, the stored and padded dtypes (fp8 stays e4m3 with ``"stored"``)."""
        col = GUIDANCE_COLUMNS.get(guidance)
        if col is not None and col not in self.ds.schema.names:
            raise UserError(
                f"guidance source {guidance!r} needs column {col!r}, which {lake_mod.table_uri(self.lake, 'features')} "
                f"lacks. Re-embed with text_guidance = true in jobs/embed.toml, or set guidance = 'mllm'."
            )
        self.guidance_column = col
        self.guidance_dim = (self.dims.text_guidance_dim if guidance == "text" else self.dims.guidance_dim) or 0
        self._storage_dtype = self.dims.dtype
        self._torch_dtype = torch.bfloat16 if self.dims.dtype == "bfloat16" else torch.float16
        # fp8 guidance: 1-byte e4m3 values + a float32 scale per token (the text guidance is always 16-bit)
        self.fp8 = col == "guidance" and self.dims.guidance_dtype == features_schema.FP8
        if pad_dtype is not None and pad_dtype != "stored" and not (isinstance(pad_dtype, torch.dtype)
                                                                    and pad_dtype.is_floating_point):
            raise UserError(f"pad_dtype={pad_dtype!r} must be None, 'stored' or a torch floating dtype.")
        # "stored": fp8 stays e4m3 bytes + scales (Batch.to dequantises on the device); 16-bit as the default
        self.pad_dtype = "fp8" if pad_dtype == "stored" and self.fp8 else \
            self._torch_dtype if pad_dtype in (None, "stored") else pad_dtype

    def _index_rows(self) -> list[str]:
        """Every row's pair id; "mmap" also caches each row's fragment, offset, length and blob position."""
        col = self.guidance_column
        if self.blob_api == "mmap":  # read once: each row's fragment, offset in it, length and blob position
            t = self.ds.to_table(columns=["pair_id", f"{col}_len", col], with_row_address=True)
            desc = t.column(col).combine_chunks()
            addr = t.column("_rowaddr").to_numpy()
            self._row_at = (addr >> 32, addr & 0xFFFFFFFF)
            self._blob_at = (desc.field("position").to_numpy(), desc.field("size").to_numpy())
            self._lens = t.column(f"{col}_len").to_numpy().astype(np.int64)
            self._files: dict[int, Any] = {}  # fragment id -> lance.file.LanceFileReader of its one data file
        else:
            t = self.ds.to_table(columns=["pair_id"])
        return t.column("pair_id").to_pylist()

    def _open_pairs(self, pairs_version: int | None) -> Any:
        """The ``pairs`` table (the commit marker) at ``pairs_version`` (default: now), or None; sets pairs_version."""
        pairs = lake_mod.open_table(self.lake, "pairs")
        self.pairs_version = None
        if pairs is not None:
            if pairs_version is not None and pairs_version != pairs.version:
                import lance

                pairs = lance.dataset(lake_mod.table_uri(self.lake, "pairs"), version=pairs_version)
            self.pairs_version = pairs.version
        return pairs

    def _usable_rows(self, pair_ids: list[str], pairs: Any) -> list[int]:
        """Rows whose pair is committed, the first of each ``pair_id``; counts the rows left out."""
        committed = set(lake_mod.column_values(pairs, "pair_id")) if pairs is not None else None
        usable: list[int] = []
        seen: set[str] = set()
        duplicates = 0
        for i, pid in enumerate(pair_ids):
            if committed is not None and pid not in committed:
                continue
            if pid in seen:  # defensive: exactly-once embedding should never produce one
                duplicates += 1
                continue
            seen.add(pid)
            usable.append(i)
        self.uncommitted, self.duplicates = len(pair_ids) - len(usable) - duplicates, duplicates
        return usable

    def _split(self, pair_ids: list[str], usable: list[int], pairs: Any) -> None:
        """Train and held-out rows (``split_heldout``), the broken kind per pair, and the epoch length."""
        lake, heldout_split, skipped, duplicates = self.lake, self.heldout_split, self.uncommitted, self.duplicates
        train_pos, held_pos = split_heldout([pair_ids[i] for i in usable], self.heldout_pairs, heldout_split)
        train, held = [usable[j] for j in train_pos], [usable[j] for j in held_pos]
        if heldout_split and not held:
            raise UserError(f"heldout_split={heldout_split!r}: no pair in {lake_mod.table_uri(lake, 'pairs')} comes "
                            f"from a shard whose name starts with it. Embed that split into the lake, or set "
                            f"heldout_split = \"\" to hold out heldout_pairs pairs by hash.")
        # broken kind per pair, when the pairs table records it (our shapes-world sample does; Pick-a-Pic does not)
        self.kinds: dict[str, str] = {}
        if pairs is not None and "broken" in pairs.schema.names:
            t = pairs.to_table(columns=["pair_id", "broken"])
            self.kinds = {p: k for p, k in zip(t.column("pair_id").to_pylist(), t.column("broken").to_pylist())
                          if k is not None}
        log.log(logging.WARNING if skipped or duplicates else logging.INFO,
                "loader: features v%d: %d rows -> %d train / %d held-out pairs; %d duplicate pair_id rows dropped, "
                "%d rows without a committed pair skipped%s", self.version, len(pair_ids), len(train), len(held),
                duplicates, skipped, " (embed still running?)" if skipped else "")
        self.pair_ids = pair_ids
        self.train_indices = np.asarray(train, dtype=np.int64)
        self.heldout_indices = np.asarray(held, dtype=np.int64)
        self.steps_per_epoch = len(self.train_indices) // (self.world_size * self.batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{lake_mod.table_uri(lake, 'features')} has {len(self.train_indices)} training pairs "
                f"(after holding out {len(self.heldout_indices)}), fewer than one global batch of "
                f"{self.world_size} ranks x {self.batch_size}. Embed more pairs, or lower batch_size or heldout_pairs."
            )

    # ------------------------------------------------------------------ order and state
    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices for ``epoch``, in batch order (length steps_per_epoch * batch_size)."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = self.train_indices[rng.permutation(len(self.train_indices))]
        perm = perm[: self.steps_per_epoch * self.world_size * self.batch_size]
        return perm[self.rank :: self.world_size]

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; identical on every rank."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "version": self.version,
                "pairs_version": self.pairs_version,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "heldout_pairs": self.heldout_pairs, "heldout_split": self.heldout_split, "guidance": self.guidance,
                "order": "pair_id"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("order") != "pair_id":
            raise UserError("cannot resume: the checkpoint was written by an older loader that shuffled row offsets "
                            "(now pair ids). Start a new run with a new --run-dir.")
        for key in ("seed", "version", "pairs_version", "world_size", "batch_size", "heldout_pairs", "heldout_split",
                    "guidance"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume: the checkpoint's loader {key} is {state[key]!r} but this run has "
                    f"{getattr(self, key)!r}. Resume with the same config and number of ranks."
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ------------------------------------------------------------------ reading
    def _choose_blob_path(self, blob_api: str) -> str:
        """How guidance bytes are read: "mmap" when each blob lies inside its fragment's data file on a local
        disk (Lance file format 2.0/2.1), else Lance's blob API ("take_blobs"; "read_blobs" on request)."""
        if blob_api not in ("auto", "mmap", "take_blobs", "read_blobs"):
            raise UserError(f"blob_api={blob_api!r} must be 'auto', 'mmap', 'take_blobs' or 'read_blobs'.")
        if self.guidance_column is None or blob_api in ("take_blobs", "read_blobs"):
            return "take_blobs" if blob_api == "auto" else blob_api
        inline = lake_mod.is_local(self.lake) and _blobs_inline(self.ds, self.guidance_column)
        if blob_api == "mmap" and not inline:
            raise UserError(f"blob_api='mmap' needs a local features table whose blobs live in its data files "
                            f"(Lance format {features_schema.DATA_STORAGE_VERSION}); {self.lake} has not. Use 'auto'.")
        return "mmap" if inline else "take_blobs"

    def read(self, indices: np.ndarray | list[int], io: ThreadPoolExecutor | None = None) -> Batch:
        """Read the rows at ``indices`` (dataset offsets) into a batch, in that order.

        The guidance rows are copied (fp8: dequantised) straight into one padded (B, L_max, E) tensor of
        ``pad_dtype``, rows in parallel on ``io``; "mmap" copies from the page cache with no copy before it.
        """
        idx = [int(i) for i in indices]
        tbl, pids, lens = self._read_columns(idx)
        winner, loser = (self._tokens(tbl, c, len(idx)) for c in ("winner_tokens", "loser_tokens"))
        e = self.guidance_dim
        if self.guidance_column is None:
            return Batch(pids, winner, loser, [], torch.zeros(len(idx), dtype=torch.int64), e, self._torch_dtype)
        out, scale_out, give_back = self._read_guidance(idx, tbl, pids, lens, io)
        return Batch(pids, winner, loser, None, torch.from_numpy(lens), e,
                     self._torch_dtype, padded=out, scale=scale_out, give_back=give_back)

    def _read_columns(self, idx: list[int]) -> tuple[Any, list[str], np.ndarray | None]:
        """(table of the token columns, and fp8 scales, for the rows ``idx``; their pair ids; guidance lengths)."""
        col = self.guidance_column
        if self.blob_api == "mmap":  # tokens (and fp8 scales) from the fragments' files; ids and lengths cached
            tbl = self._take_from_files(idx, ["winner_tokens", "loser_tokens"] + ([f"{col}_scale"] if self.fp8 else []))
            return tbl, [self.pair_ids[i] for i in idx], self._lens[idx]
        cols = ["pair_id", "winner_tokens", "loser_tokens"]
        if col:
            cols.append(f"{col}_len")
            if self.fp8:
                cols.append(f"{col}_scale")
        tbl = self.ds.take(idx, columns=cols)
        pids = tbl.column("pair_id").to_pylist()
        if pids != [self.pair_ids[i] for i in idx]:  # take must keep the requested order
            raise RuntimeError("Lance take returned rows out of order")
        return tbl, pids, tbl.column(f"{col}_len").to_numpy().astype(np.int64) if col else None

    def _tokens(self, tbl: Any, column: str, rows: int) -> torch.Tensor:
        """(rows, N, D) IP tokens of ``column`` in the lake's 16-bit dtype."""
        flat = tbl.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        flat = flat if flat.flags.writeable and flat.flags.c_contiguous else flat.copy()
        return _two_byte_to_torch(flat.reshape(rows, self.dims.ip_tokens, self.dims.ip_dim), self._storage_dtype)

    def _read_guidance(self, idx: list[int], tbl: Any, pids: list[str], lens: np.ndarray,
                       io: ThreadPoolExecutor | None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(padded guidance, its fp8 scales when kept as stored, the callback giving the buffer back)."""
        col, e = self.guidance_column, self.guidance_dim
        width = len(idx), int(lens.max()) if len(lens) else 0
        keep_fp8 = self.pad_dtype == "fp8"
        out, give_back = self._padded((*width, e), torch.uint8 if keep_fp8 else self.pad_dtype)
        scales: list[np.ndarray] = []
        scale_out = None
        if self.fp8:
            sc = tbl.column(f"{col}_scale").combine_chunks()
            values, offs = sc.values.to_numpy(zero_copy_only=False), sc.offsets.to_numpy()
            scales = [values[offs[j]: offs[j + 1]] for j in range(len(idx))]
            if keep_fp8:
                scale_out = torch.zeros(width, dtype=torch.float32)
        sources = self._sources(col, idx, tbl)

        def fill(j: int) -> None:
            ln = int(lens[j])
            raw, buf = sources(j)
            try:
                self._fill_row(out, j, ln, raw, pids[j], scales[j] if self.fp8 else None, scale_out)
            finally:
                if buf is not None:  # the row is copied: its read buffer goes back to the pool
                    self._buffers.give_back([buf])

        try:
            if io is not None and len(idx) > 1:
                futures = [io.submit(fill, j) for j in range(len(idx))]
                wait(futures)  # every row done (or failed) before the buffer can go back
                for fut in futures:
                    fut.result()
            else:
                for j in range(len(idx)):
                    fill(j)
        except BaseException:
            if give_back is not None:
                give_back()
            raise
        return out, scale_out, give_back

    def _fill_row(self, out: torch.Tensor, j: int, ln: int, raw: np.ndarray, pid: str, scale: np.ndarray | None,
                  scale_out: torch.Tensor | None) -> None:
        """Copy row ``j``'s ``ln`` guidance tokens into ``out[j]`` (as stored, dequantised or cast); zero the rest."""
        col, e = self.guidance_column, self.guidance_dim
        keep_fp8, value_bytes = self.pad_dtype == "fp8", 1 if self.fp8 else 2
        if raw.nbytes != ln * e * value_bytes or (self.fp8 and len(scale) != ln):
            raise UserError(
                f"pair {pid!r}: {col} blob has {raw.nbytes} bytes{f' and {len(scale)} scales' if self.fp8 else ''}"
                f", expected {col}_len {ln} x {e} x {value_bytes}. The lake is corrupt; re-embed this pair.")
        dst = out[j, :ln]
        if keep_fp8 or (not self.fp8 and dst.dtype == self._torch_dtype):  # the stored bytes as they are
            np.copyto(dst.view(torch.uint8).numpy().reshape(-1), raw, casting="no")
            if scale_out is not None:
                scale_out[j, :ln] = torch.from_numpy(scale)
        elif self.fp8:  # dequantise while padding
            fp8.dequantize_into(dst, raw.reshape(ln, e), scale)
        else:  # fp16/bf16 -> pad_dtype while padding
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                dst.copy_(torch.from_numpy(raw).view(self._torch_dtype).view(ln, e))
        if ln < out.shape[1]:
            out[j, ln:].zero_()

    def _padded(self, shape: tuple[int, int, int],
                dtype: torch.dtype) -> tuple[torch.Tensor, "weakref.finalize | None"]:
        """An uninitialised tensor on a recycled buffer (a fresh one costs a page fault per 4 KB), and the
        callback that gives the buffer back (on its first call, or when the tensor's memory is collected)."""
        count = shape[0] * shape[1] * shape[2] * dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype), None
        buf = self._buffers.get(count)
        mem = np.frombuffer(buf, dtype=np.uint8, count=count)  # the tensor (and its views) keep this array alive
        return torch.from_numpy(mem).view(dtype).view(shape), weakref.finalize(mem, self._buffers.give_back, [buf])

    def _sources(self, col: str, idx: list[int], tbl: Any) -> Any:
        """A function j -> (the j-th row's blob bytes as a uint8 array, the pool buffer under it or None).

        The caller gives a returned buffer back once the row is copied."""
        if self.blob_api == "mmap":
            fragment, (position, size) = self._row_at[0], self._blob_at

            def mapped(j: int) -> np.ndarray:
                i = idx[j]
                pos, n = int(position[i]), int(size[i])
                m = self._data_file(int(fragment[i]), i, pos, n)
                if m is None:  # this fragment cannot be mapped: Lance reads it
                    return self._read_one(self.ds.take_blobs(col, indices=[i], buffer_size=0)[0])
                return m[pos: pos + n], None

            return mapped
        if self.blob_api == "take_blobs":
            handles = self.ds.take_blobs(col, indices=idx, buffer_size=0)
            return lambda j: self._read_one(handles[j])
        blobs = [b or b"" for _, b in self.ds.read_blobs(col, indices=idx, preserve_order=True)]
        return lambda j: (np.frombuffer(blobs[j], dtype=np.uint8), None)

    def _take_from_files(self, idx: list[int], columns: list[str]) -> Any:
        """``columns`` of dataset rows ``idx``, in that order, read from their fragments' data files with Lance's
        file reader (several times cheaper per row than a dataset ``take``); a dataset ``take`` when a fragment
        has more than one data file."""
        import pyarrow as pa

        fragment, offset = self._row_at
        frags = fragment[idx]
        parts, where = [], np.empty(len(idx), np.int64)
        done = 0
        for f in np.unique(frags):
            reader = self._file_reader(int(f), columns)
            if reader is None:
                return self.ds.take(idx, columns=columns)
            mine = np.flatnonzero(frags == f)
            order = np.argsort(offset[np.asarray(idx)[mine]], kind="stable")
            rows = offset[np.asarray(idx)[mine[order]]]
            parts.append(reader.take_rows(rows.tolist()).to_table().select(columns))
            where[mine[order]] = np.arange(done, done + len(mine))
            done += len(mine)
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        return table.take(pa.array(where))

    def _file_reader(self, fragment_id: int, columns: list[str]) -> Any:
        with self._maps_lock:
            if fragment_id not in self._files:
                from lance.file import LanceFileReader

                frag = self.ds.get_fragment(fragment_id)
                files = frag.data_files() if frag is not None else []
                path = self._data_path(files[0].path) if len(files) == 1 else ""
                self._files[fragment_id] = LanceFileReader(path, columns=columns) if path else None
                while len(self._files) > self._max_open // 2:
                    del self._files[next(iter(self._files))]
            return self._files[fragment_id]

    def _data_path(self, name: str) -> str:
        path = os.path.join(lake_mod.table_uri(self.lake, "features").removeprefix("file://"), "data", name)
        return path if os.path.isfile(path) else ""

    def _data_file(self, fragment_id: int, row: int, position: int, size: int) -> np.ndarray | None:
        """Fragment ``fragment_id``'s data file as a read-only uint8 memory map, or None when it cannot be used.

        The first time a fragment is mapped, one blob's first and last bytes are compared with Lance's
        own read of them, so a change in what ``position`` means is caught, not trained on.
        """
        with self._maps_lock:
            if fragment_id in self._maps:
                self._maps[fragment_id] = m = self._maps.pop(fragment_id)  # most recently used last
                return m
            m = None
            frag = self.ds.get_fragment(fragment_id)
            files = frag.data_files() if frag is not None else []
            path = self._data_path(files[0].path) if len(files) == 1 else ""
            if path:
                m = np.memmap(path, dtype=np.uint8, mode="r")
                if fragment_id not in self._verified:
                    k = min(size, 4096)
                    blob = self.ds.take_blobs(self.guidance_column, indices=[row], buffer_size=0)[0]
                    if size and (position + size > len(m) or blob.size() != size
                                 or bytes(m[position: position + k]) != blob.read_range(0, k)
                                 or bytes(m[position + size - k: position + size]) != blob.read_range(size - k, k)):
                        log.warning("features fragment %d: blob positions do not match its data file; reading it "
                                    "through Lance's blob API instead", fragment_id)
                        m = None
                    else:
                        self._verified.add(fragment_id)
            self._maps[fragment_id] = m
            while len(self._maps) > self._max_open // 2:  # bound open files; a map in use lives until its last view
                del self._maps[next(iter(self._maps))]
            return m

    def _read_one(self, f: Any) -> tuple[np.ndarray, bytearray | None]:
        """One blob as a uint8 array over a pool buffer, and that buffer (None for an empty blob)."""
        size = f.size() if f is not None else 0
        if size == 0:
            return np.zeros(0, np.uint8), None
        buf = self._buffers.get(size)
        try:
            # BlobFile.readinto(bytearray) is one read_into of the Lance handle; calling that directly
            # skips the wrapper's refill path, which zero-fills a temporary for the buffer's slack.
            inner = getattr(f, "inner", None)
            n = inner.read_into(buf) if hasattr(inner, "read_into") else f.readinto(buf)
            if n != size:
                raise OSError(f"short read of a guidance blob: {n} of {size} bytes")
        except BaseException:
            self._buffers.give_back([buf])
            raise
        return np.frombuffer(buf, dtype=np.uint8, count=size), buf

    # ------------------------------------------------------------------ iteration
    def _batch_indices(self, epoch: int, position: int, order: np.ndarray) -> np.ndarray:
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def _plan(self) -> Iterator[tuple[int, int, np.ndarray]]:
        epoch, pos = self.epoch, self.position
        order = self.epoch_order(epoch)
        while True:
            if pos >= self.steps_per_epoch:
                epoch, pos = epoch + 1, 0
                order = self.epoch_order(epoch)
            yield epoch, pos, self._batch_indices(epoch, pos, order)
            pos += 1

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan()
        if self.num_workers == 0:
            for epoch, pos, idx in plan:
                batch = self.read(idx)
                self.epoch, self.position = (epoch, pos + 1) if pos + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield batch
            return
        # One thread assembles batches ahead (up to `prefetch`); `num_workers` threads read blob rows.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="img-loader")
        io = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="img-loader-io")
        inflight: deque[tuple[int, int, Future]] = deque()
        try:
            while True:
                while len(inflight) < self.prefetch:
                    epoch, pos, idx = next(plan)
                    inflight.append((epoch, pos, pool.submit(self.read, idx, io)))
                epoch, pos, fut = inflight.popleft()
                batch = fut.result()
                self.epoch, self.position = (epoch, pos + 1) if pos + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield batch
        finally:
            for _, _, fut in inflight:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            io.shutdown(wait=True, cancel_futures=True)

    def heldout_kinds(self) -> list[str]:
        """The broken kinds among the held-out pairs (sorted; empty when the lake does not record them)."""
        return sorted({self.kinds[self.pair_ids[i]] for i in self.heldout_indices if self.pair_ids[i] in self.kinds})

    def heldout_batches(self, batch_size: int | None = None, max_pairs: int = 0) -> Iterator[Batch]:
        """This rank's share of the held-out pairs (round-robin, ``pair_id`` order), in batches."""
        held = self.heldout_indices
        if max_pairs > 0:
            held = held[:max_pairs]
        mine = held[self.rank :: self.world_size]
        bs = batch_size or self.batch_size
        for s in range(0, len(mine), bs):
            yield self.read(mine[s : s + bs])
