"""The training loader: cached tensors from ``<lake>/features.lance``, sharded, shuffled, prefetched.

    loader = TrainLoader("lake", rank=0, world_size=1, batch_size=8, seed=0)
    for batch in loader:             # endless; epochs follow each other
        batch.loser, batch.winner    # (B, N, D) torch tensors in the lake dtype (fp16/bf16)
        batch.guidance, batch.mask   # (B, L_max, E) padded per batch, (B, L_max) bool True = valid
        batch.to("cuda", torch.bfloat16)  # pads each row straight into the device tensor
        batch.release()              # (or `with batch:`) its read buffers go back to the loader
        state = loader.state_dict()  # {epoch, position, ...}: the next batch to be yielded
    loader.load_state_dict(state)    # continue the data order exactly (``--resume``)

Design:
- The MLLM guidance is a Lance *blob* column; it is read with the blob API
  (``take_blobs``, or ``read_blobs``) whole into a buffer, then ``np.frombuffer``
  (no padding on disk; see docs/architecture.md, "Storage layout"). The small image
  tokens are FixedSizeList columns read with ``take``.
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
- Each blob is read whole (``take_blobs`` + ``readinto``) into a recycled buffer
  (see ``BufferPool``) and wrapped without a copy; padding happens once, fused
  with the dtype/device copy in ``Batch.to``. The batch owns its buffers and gives
  them back to the pool when released (``batch.release()``, ``with batch:``) or
  garbage-collected, never earlier.
- Prefetching uses threads (Lance releases the GIL while reading and is not
  fork-safe): one thread assembles up to ``prefetch`` batches ahead and
  ``num_workers`` threads read the blob rows of a batch in parallel
  (``num_workers = 0``: everything in the caller's thread). Memory is bounded by
  about (prefetch + 2) batches of buffers.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch

from img.errors import UserError
from img.lake import tables as lake_mod
from schemas.meta import read_provenance

log = logging.getLogger(__name__)

GuidanceSource = Literal["mllm", "text", "none"]
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


class Batch:
    """One training batch. The guidance rows stay as read (no copy) until they are padded.

    ``batch.guidance`` / ``batch.mask`` give the padded (B, L_max, E) tensor and its (B, L_max)
    mask (True = valid). ``batch.to(device, dtype)`` pads each row straight into a new tensor of
    the target dtype on the target device, so padding costs no copy beyond the dtype/device copy
    that training needs anyway.

    The guidance rows are views of buffers the batch owns (from the loader's ``BufferPool``).
    ``release()`` gives them back for the next reads (``with batch:`` does it on exit); a batch
    dropped without it gives them back when it is garbage-collected. After ``release()`` only what
    was already padded (or copied by ``to``) stays usable.
    """

    def __init__(self, pair_ids: list[str], winner: torch.Tensor, loser: torch.Tensor,
                 guidance_rows: list[np.ndarray] | None, lengths: torch.Tensor, guidance_dim: int,
                 storage_dtype: torch.dtype = torch.float16, padded: torch.Tensor | None = None,
                 buffers: list[bytearray] | None = None, pool: "BufferPool | None" = None) -> None:
        self.pair_ids = pair_ids
        self.winner = winner  # (B, N, D)
        self.loser = loser  # (B, N, D)
        self.guidance_rows = guidance_rows  # B read-only uint16 arrays (len_i, E) of storage_dtype bits, or None
        self.lengths = lengths  # (B,) int64 on CPU
        self.guidance_dim = guidance_dim
        self.storage_dtype = storage_dtype  # float16 or bfloat16
        self._padded = padded
        self._released = False
        # the callback holds the buffers, not the batch: it runs once, on release() or when the batch is collected
        self._give_back = weakref.finalize(self, pool.give_back, buffers) if pool is not None and buffers else None

    def release(self) -> None:
        """Give the read buffers back to the loader; the guidance rows are gone afterwards (idempotent)."""
        self._released, self.guidance_rows = True, None
        if self._give_back is not None:
            self._give_back()

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
            raise RuntimeError("this batch was released: its guidance rows went back to the loader; "
                               "pad (batch.guidance) or copy (batch.to) before release()")
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
        if self._padded is None:
            self._padded = self._pad_into(self.winner.device, self.storage_dtype)
        return self._padded

    @property
    def mask(self) -> torch.Tensor:
        """(B, L_max) bool, True = valid guidance position."""
        m = torch.arange(self.max_len)[None, :] < self.lengths[:, None]
        return m.to(self._padded.device) if self._padded is not None else m

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Batch":
        g = self._padded.to(device, dtype) if self._padded is not None else self._pad_into(device, dtype)
        return Batch(self.pair_ids, self.winner.to(device, dtype), self.loser.to(device, dtype), None,
                     self.lengths, self.guidance_dim, self.storage_dtype, padded=g)


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
    tg = extra.get("text_guidance_dim")
    return LakeDims(int(extra["ip_tokens"]), int(extra["ip_dim"]), int(extra["guidance_dim"]),
                    int(tg) if tg is not None else None, dtype, extra.get("profile"))


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
        blob_api: Literal["read_blobs", "take_blobs"] = "take_blobs",
    ) -> None:
        if guidance not in ("mllm", "text", "none"):
            raise UserError(f"guidance source {guidance!r} must be 'mllm', 'text' or 'none'. "
                            "Set `guidance` in the train TOML.")
        if isinstance(heldout_pairs, bool) or not isinstance(heldout_pairs, int) or heldout_pairs < 0:
            raise UserError(f"heldout_pairs={heldout_pairs!r} must be an integer >= 0 (0 = no held-out pairs).")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad loader setting: batch_size={batch_size}, rank={rank}, world_size={world_size}.")
        self.lake, self.rank, self.world_size, self.batch_size = lake, rank, world_size, batch_size
        self.seed, self.heldout_pairs, self.heldout_split, self.guidance = seed, heldout_pairs, heldout_split, guidance
        self.num_workers, self.prefetch, self.blob_api = max(0, num_workers), max(1, prefetch), blob_api
        self.ds = open_features(lake, version)
        self.version = self.ds.version
        self.dims = lake_dims(self.ds, lake_mod.table_uri(lake, "features"))
        col = GUIDANCE_COLUMNS.get(guidance)
        if col is not None and col not in self.ds.schema.names:
            raise UserError(
                f"guidance source {guidance!r} needs column {col!r}, which {lake_mod.table_uri(lake, 'features')} "
                f"lacks. Re-embed with text_guidance = true in jobs/embed.toml, or set guidance = 'mllm'."
            )
        self.guidance_column = col
        self.guidance_dim = (self.dims.text_guidance_dim if guidance == "text" else self.dims.guidance_dim) or 0
        self._storage_dtype = self.dims.dtype
        self._torch_dtype = torch.bfloat16 if self.dims.dtype == "bfloat16" else torch.float16

        pair_ids = self.ds.to_table(columns=["pair_id"]).column("pair_id").to_pylist()
        committed = None
        pairs = lake_mod.open_table(lake, "pairs")
        self.pairs_version = None
        if pairs is not None:
            if pairs_version is not None and pairs_version != pairs.version:
                import lance

                pairs = lance.dataset(lake_mod.table_uri(lake, "pairs"), version=pairs_version)
            self.pairs_version = pairs.version
            committed = set(lake_mod.column_values(pairs, "pair_id"))
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
        skipped = len(pair_ids) - len(usable) - duplicates
        self.uncommitted, self.duplicates = skipped, duplicates
        train_pos, held_pos = split_heldout([pair_ids[i] for i in usable], heldout_pairs, heldout_split)
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
        self.steps_per_epoch = len(self.train_indices) // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{lake_mod.table_uri(lake, 'features')} has {len(self.train_indices)} training pairs "
                f"(after holding out {len(self.heldout_indices)}), fewer than one global batch of "
                f"{world_size} ranks x {batch_size}. Embed more pairs, or lower batch_size or heldout_pairs."
            )
        self.epoch, self.position = 0, 0
        self._buffers = BufferPool(max_free=max(16, (self.prefetch + 2) * batch_size))

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
    def read(self, indices: np.ndarray | list[int], io: ThreadPoolExecutor | None = None) -> Batch:
        """Read the rows at ``indices`` (dataset offsets) into a batch, in that order."""
        idx = [int(i) for i in indices]
        n, d = self.dims.ip_tokens, self.dims.ip_dim
        cols = ["pair_id", "winner_tokens", "loser_tokens"]
        if self.guidance_column:
            cols.append(f"{self.guidance_column}_len")
        tbl = self.ds.take(idx, columns=cols)
        pids = tbl.column("pair_id").to_pylist()
        if pids != [self.pair_ids[i] for i in idx]:  # take must keep the requested order
            raise RuntimeError("Lance take returned rows out of order")
        tok = {}
        for c in ("winner_tokens", "loser_tokens"):
            flat = tbl.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            flat = flat if flat.flags.writeable and flat.flags.c_contiguous else flat.copy()
            tok[c] = _two_byte_to_torch(flat.reshape(len(idx), n, d), self._storage_dtype)
        e = self.guidance_dim
        if self.guidance_column is None:
            return Batch(pids, tok["winner_tokens"], tok["loser_tokens"], [], torch.zeros(len(idx), dtype=torch.int64),
                         e, self._torch_dtype)
        lens = tbl.column(f"{self.guidance_column}_len").to_numpy().astype(np.int64)
        read = self._read_blobs(self.guidance_column, idx, io)
        buffers = [buf for _, buf in read if buf is not None]
        batch = Batch(pids, tok["winner_tokens"], tok["loser_tokens"], [], torch.from_numpy(lens), e,
                      self._torch_dtype, buffers=buffers, pool=self._buffers)  # owns the buffers from here on
        for j, ((raw, _), ln) in enumerate(zip(read, lens)):
            if raw.nbytes != int(ln) * e * 2:
                batch.release()
                raise UserError(
                    f"pair {pids[j]!r}: {self.guidance_column} blob has {raw.nbytes} bytes, expected "
                    f"{self.guidance_column}_len {ln} x {e} x 2. The lake is corrupt; re-embed this pair."
                )
            batch.guidance_rows.append(raw.reshape(int(ln), e))
        return batch

    def _read_one(self, f: Any) -> tuple[np.ndarray, bytearray | None]:
        """One blob as a uint16 array over a pool buffer, and that buffer (None for an empty blob)."""
        size = f.size() if f is not None else 0
        if size == 0:
            return np.zeros(0, np.uint16), None
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
        return np.frombuffer(buf, dtype=np.uint16, count=size // 2), buf

    def _read_blobs(self, column: str, idx: list[int],
                    io: ThreadPoolExecutor | None = None) -> list[tuple[np.ndarray, bytearray | None]]:
        """Each row's blob as a uint16 array (with its pool buffer, if any), read whole; rows in parallel on ``io``."""
        if self.blob_api == "take_blobs":
            handles = self.ds.take_blobs(column, indices=idx, buffer_size=0)
            return list(io.map(self._read_one, handles)) if io is not None else [self._read_one(f) for f in handles]
        return [(np.frombuffer(b or b"", dtype=np.uint16), None) for _, b in
                self.ds.read_blobs(column, indices=idx, preserve_order=True)]

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
