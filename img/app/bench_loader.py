"""Benchmark: the training loader vs a raw read of the same bytes from a flat memmap file.

    img bench loader --json            # 160 rows: guidance 650 x 5120 fp16 (6.7 MB), tokens 2 x 16 x 2048
    img bench loader --small --json    # 160 rows of 64 x 512 guidance, 2 x 16 x 256 tokens (seconds)

Both sides read the same rows in the same shuffled order (the loader's epoch-0
order), in batches of 8, from files that were fsynced and then read once
untimed (page cache warm and clean). Timed passes alternate; medians are
reported (``*_best`` = fastest pass) because single passes are noisy on a
shared machine. Two raw baselines:

- ``raw``: each row's bytes copied out of an ``np.memmap`` into a new array
  (``np.array(mm[a:b])``), the plainest way to read a row. Its speed
  depends on whether the allocator hands back already-mapped memory, so it
  varies between processes.
- ``raw_into``: the same bytes copied into reused buffers: a pure memcpy, the
  upper bound for any reader of these bytes.

The loader reads the token columns with ``take``, each guidance blob with the
Lance blob API into a recycled buffer (rows in parallel on ``num_workers``
threads), checks sizes and makes torch tensors. Its guidance rows are not padded
here: padding is fused into ``Batch.to(device, dtype)``, the copy training makes
anyway; the ``padded_fp16`` variant pads inside the timed loop, for comparison.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from img.training.loader import TrainLoader
from schemas import features as features_schema
from schemas.meta import with_provenance

FULL = {"guidance_len": 650, "guidance_dim": 5120, "ip_tokens": 16, "ip_dim": 2048}
SMALL = {"guidance_len": 64, "guidance_dim": 512, "ip_tokens": 16, "ip_dim": 256}


def write_bench_lake(root: Path, rows: int, guidance_len: int, guidance_dim: int, ip_tokens: int, ip_dim: int,
                     seed: int = 0, data_storage_version: str | None = None) -> tuple[Path, np.ndarray]:
    """A features table with the real schema + a flat file of the same bytes; returns (flat path, offsets)."""
    import lance
    import pyarrow as pa


    n = ip_tokens * ip_dim
    g_bytes, t_bytes = guidance_len * guidance_dim * 2, n * 2
    row_bytes = g_bytes + 2 * t_bytes
    schema = with_provenance(features_schema.schema(ip_tokens, ip_dim), table="features",
                             version=features_schema.VERSION, fingerprint="bench",
                             extra={"ip_tokens": ip_tokens, "ip_dim": ip_dim, "guidance_dim": guidance_dim,
                                    "dtype": "float16", "profile": "bench"})
    flat = root / "flat.bin"
    mm = np.memmap(flat, dtype=np.uint8, mode="w+", shape=(rows * row_bytes,))
    rng = np.random.default_rng(seed)

    def batches():
        for s in range(0, rows, 8):
            m = min(8, rows - s)
            # finite fp16 values in [0, 1): the bytes only need to be realistic in size
            g = rng.integers(0, 0x3C00, size=(m, guidance_len * guidance_dim), dtype=np.uint16)
            w = rng.integers(0, 0x3C00, size=(m, n), dtype=np.uint16)
            lo = rng.integers(0, 0x3C00, size=(m, n), dtype=np.uint16)
            for j in range(m):
                off = (s + j) * row_bytes
                mm[off : off + g_bytes] = g[j].view(np.uint8)
                mm[off + g_bytes : off + g_bytes + t_bytes] = w[j].view(np.uint8)
                mm[off + g_bytes + t_bytes : off + row_bytes] = lo[j].view(np.uint8)
            yield pa.record_batch({
                "pair_id": pa.array([f"bench#{s + j}" for j in range(m)]),
                "winner_tokens": pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1).view(np.float16)), n),
                "loser_tokens": pa.FixedSizeListArray.from_arrays(pa.array(lo.reshape(-1).view(np.float16)), n),
                "guidance": pa.array([g[j].tobytes() for j in range(m)], pa.large_binary()),
                "guidance_len": pa.array([guidance_len] * m, pa.int32()),
            }, schema=schema)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(root / "features.lance"),
                        schema=schema, max_rows_per_file=rows, data_storage_version=data_storage_version)
    mm.flush()
    del mm
    return flat, np.arange(rows, dtype=np.int64) * row_bytes


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _time_loader(loader, steps: int, pad: bool = False) -> float:
    loader.epoch, loader.position = 0, 0
    t = time.perf_counter()
    it = iter(loader)
    for _ in range(steps):
        with next(it) as batch:  # its read buffers go back to the loader at the end of the step
            if pad:
                batch.guidance  # materialise the padded (B, L_max, E) tensor in the storage dtype
    dt = time.perf_counter() - t
    it.close()
    return dt


def _time_raw(flat: Path, offsets: np.ndarray, order: np.ndarray, row_bytes: int, g_bytes: int, t_bytes: int,
              into: np.ndarray | None = None) -> float:
    """Copy each row's guidance, winner and loser bytes out of the memmap (into ``into`` rows if given)."""
    mm = np.memmap(flat, dtype=np.uint8, mode="r")
    t = time.perf_counter()
    for k, i in enumerate(order):
        off = int(offsets[i])
        parts = (mm[off : off + g_bytes], mm[off + g_bytes : off + g_bytes + t_bytes],
                 mm[off + g_bytes + t_bytes : off + row_bytes])
        if into is None:
            for p in parts:
                np.array(p).view(np.float16)
        else:
            dst = into[k % len(into)]
            np.copyto(dst[:g_bytes], parts[0])
            np.copyto(dst[g_bytes : g_bytes + t_bytes], parts[1])
            np.copyto(dst[g_bytes + t_bytes :], parts[2])
    dt = time.perf_counter() - t
    del mm
    return dt


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def run_bench(rows: int = 160, small: bool = False, batch_size: int = 8, repeats: int = 5, num_workers: int = 2,
              prefetch: int = 4, workdir: str | None = None, keep: bool = False) -> dict[str, Any]:
    """Build the table and flat file, time the loader and both raw reads, return the figures."""

    shape = SMALL if small else FULL
    root = Path(tempfile.mkdtemp(prefix="img-bench-loader-", dir=workdir))
    try:
        t0 = time.perf_counter()
        flat, offsets = write_bench_lake(root, rows, **shape)
        _fsync_tree(root)  # no writeback of dirty pages during the timed passes
        write_s = time.perf_counter() - t0
        g_bytes = shape["guidance_len"] * shape["guidance_dim"] * 2
        t_bytes = shape["ip_tokens"] * shape["ip_dim"] * 2
        row_bytes = g_bytes + 2 * t_bytes
        main = TrainLoader(str(root), batch_size=batch_size, seed=0, heldout_pairs=0,
                           num_workers=num_workers, prefetch=prefetch)
        steps = main.steps_per_epoch
        order = main.epoch_order(0)
        n = steps * batch_size
        into = np.empty((batch_size, row_bytes), np.uint8)
        raw = lambda: _time_raw(flat, offsets, order, row_bytes, g_bytes, t_bytes)  # noqa: E731
        raw_into = lambda: _time_raw(flat, offsets, order, row_bytes, g_bytes, t_bytes, into)  # noqa: E731
        _time_loader(main, steps)  # warm: page cache, Lance metadata, recycled buffers
        raw(), raw_into()
        times: dict[str, list[float]] = {"loader": [], "raw": [], "raw_into": [], "padded_fp16": []}
        for _ in range(repeats):
            times["loader"].append(_time_loader(main, steps))
            times["raw"].append(raw())
            times["raw_into"].append(raw_into())
            times["padded_fp16"].append(_time_loader(main, steps, pad=True))
        sps = {k: n / statistics.median(v) for k, v in times.items()}
        best = {k: n / min(v) for k, v in times.items()}
        variants: dict[str, dict[str, Any]] = {
            "padded_fp16": {"samples_per_s": round(sps["padded_fp16"], 1),
                            "note": "batch.guidance materialised inside the timed loop (an extra copy)"},
        }
        for name, kw in {"workers0": {"num_workers": 0}, "workers1": {"num_workers": 1},
                         "workers4": {"num_workers": 4}, "read_blobs_api": {"blob_api": "read_blobs"}}.items():
            kw = {"num_workers": num_workers, **kw}
            ld = TrainLoader(str(root), batch_size=batch_size, seed=0, heldout_pairs=0, prefetch=prefetch, **kw)
            _time_loader(ld, steps)
            ts = [_time_loader(ld, steps) for _ in range(max(2, repeats // 2 + 1))]
            variants[name] = {"samples_per_s": round(n / statistics.median(ts), 1), **kw}
        lance_bytes = _dir_bytes(root / "features.lance")
        return {
            "loader_samples_per_s": round(sps["loader"], 1),
            "raw_samples_per_s": round(sps["raw"], 1),
            "ratio": round(sps["loader"] / sps["raw"], 3),
            "raw_into_samples_per_s": round(sps["raw_into"], 1),
            "ratio_vs_memcpy": round(sps["loader"] / sps["raw_into"], 3),
            "loader_best_samples_per_s": round(best["loader"], 1),
            "raw_best_samples_per_s": round(best["raw"], 1),
            "raw_into_best_samples_per_s": round(best["raw_into"], 1),
            "loader_MB_per_s": round(sps["loader"] * row_bytes / 1e6, 1),
            "runs_samples_per_s": {k: [round(n / t, 1) for t in v] for k, v in times.items()},
            "variants": variants,
            "rows": rows, "samples_per_pass": n, "batch_size": batch_size, "repeats": repeats,
            "num_workers": num_workers, "prefetch": prefetch, "blob_api": main.blob_api,
            **shape, "row_bytes": row_bytes,
            "disk_bytes_ratio": round(lance_bytes / (rows * row_bytes), 3),
            "write_seconds": round(write_s, 1),
            "page_cache": "warm and clean (fsync, then one untimed pass each)",
            "workdir": str(root) if keep else None,
        }
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
