"""Benchmark: the training loader vs a raw read of the same bytes from a flat memmap file.

    img bench loader --json            # 160 rows: guidance 650 x 5120 fp16 (6.7 MB), tokens 2 x 16 x 2048
    img bench loader --small --json    # 160 rows of 64 x 512 guidance, 2 x 16 x 256 tokens (seconds)

Both sides read the same rows in the same shuffled order (the loader's epoch-0
order), in batches of 8, with the page cache warm (one untimed pass each
first). Timed passes alternate loader / raw and the median of each is reported,
because single passes are noisy on a shared machine. The raw baseline copies
each row's bytes out of an ``np.memmap``; the loader additionally pads the
guidance per batch, builds the mask and makes torch tensors, so a ratio near 1
means the Lance blob layout costs nothing over flat files.
"""
from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FULL = {"guidance_len": 650, "guidance_dim": 5120, "ip_tokens": 16, "ip_dim": 2048}
SMALL = {"guidance_len": 64, "guidance_dim": 512, "ip_tokens": 16, "ip_dim": 256}


def write_bench_lake(root: Path, rows: int, guidance_len: int, guidance_dim: int, ip_tokens: int, ip_dim: int,
                     seed: int = 0) -> tuple[Path, np.ndarray]:
    """A features table with the real schema + a flat file of the same bytes; returns (flat path, offsets)."""
    import lance
    import pyarrow as pa

    from schemas import features as features_schema
    from schemas.meta import with_provenance

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
                        schema=schema, max_rows_per_file=rows)
    mm.flush()
    del mm
    return flat, np.arange(rows, dtype=np.int64) * row_bytes


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _time_loader(loader, steps: int) -> float:
    loader.epoch, loader.position = 0, 0
    t = time.perf_counter()
    it = iter(loader)
    for _ in range(steps):
        next(it)
    dt = time.perf_counter() - t
    it.close()
    return dt


def _time_raw(flat: Path, offsets: np.ndarray, order: np.ndarray, row_bytes: int, batch: int,
              g_bytes: int, t_bytes: int) -> float:
    mm = np.memmap(flat, dtype=np.uint8, mode="r")
    t = time.perf_counter()
    for s in range(0, len(order), batch):
        for i in order[s : s + batch]:
            off = int(offsets[i])
            np.array(mm[off : off + g_bytes]).view(np.float16)
            np.array(mm[off + g_bytes : off + g_bytes + t_bytes]).view(np.float16)
            np.array(mm[off + g_bytes + t_bytes : off + row_bytes]).view(np.float16)
    dt = time.perf_counter() - t
    del mm
    return dt


def run_bench(rows: int = 160, small: bool = False, batch_size: int = 8, repeats: int = 5, num_workers: int = 1,
              prefetch: int = 4, workdir: str | None = None, keep: bool = False) -> dict[str, Any]:
    """Build the table and flat file, time both, return the figures (samples/s, ratio, sizes)."""
    from img.train_loader import TrainLoader

    shape = SMALL if small else FULL
    root = Path(tempfile.mkdtemp(prefix="img-bench-loader-", dir=workdir))
    try:
        t0 = time.perf_counter()
        flat, offsets = write_bench_lake(root, rows, **shape)
        write_s = time.perf_counter() - t0
        g_bytes = shape["guidance_len"] * shape["guidance_dim"] * 2
        t_bytes = shape["ip_tokens"] * shape["ip_dim"] * 2
        row_bytes = g_bytes + 2 * t_bytes
        variants: dict[str, dict[str, Any]] = {}
        main = TrainLoader(str(root), batch_size=batch_size, seed=0, heldout_fraction=0.0,
                           num_workers=num_workers, prefetch=prefetch)
        steps = main.steps_per_epoch
        order = main.epoch_order(0)
        n = steps * batch_size
        _time_loader(main, steps)  # warm the page cache and Lance's metadata caches
        _time_raw(flat, offsets, order, row_bytes, batch_size, g_bytes, t_bytes)
        lt, rt = [], []
        for _ in range(repeats):
            lt.append(_time_loader(main, steps))
            rt.append(_time_raw(flat, offsets, order, row_bytes, batch_size, g_bytes, t_bytes))
        loader_sps, raw_sps = n / statistics.median(lt), n / statistics.median(rt)
        for name, kw in {"workers0_take_blobs": {"num_workers": 0, "blob_api": "take_blobs"},
                         "workers0_read_blobs": {"num_workers": 0, "blob_api": "read_blobs"},
                         "workers2_take_blobs": {"num_workers": 2, "blob_api": "take_blobs"}}.items():
            ld = TrainLoader(str(root), batch_size=batch_size, seed=0, heldout_fraction=0.0, prefetch=prefetch, **kw)
            ts = [_time_loader(ld, steps) for _ in range(max(1, repeats // 2 + 1))]
            variants[name] = {"samples_per_s": round(n / statistics.median(ts), 1)}
        lance_bytes = _dir_bytes(root / "features.lance")
        return {
            "loader_samples_per_s": round(loader_sps, 1),
            "raw_samples_per_s": round(raw_sps, 1),
            "ratio": round(loader_sps / raw_sps, 3),
            "loader_MB_per_s": round(loader_sps * row_bytes / 1e6, 1),
            "raw_MB_per_s": round(raw_sps * row_bytes / 1e6, 1),
            "loader_runs_samples_per_s": [round(n / t, 1) for t in lt],
            "raw_runs_samples_per_s": [round(n / t, 1) for t in rt],
            "variants": variants,
            "rows": rows, "samples_per_pass": n, "batch_size": batch_size, "repeats": repeats,
            "num_workers": num_workers, "prefetch": prefetch, "blob_api": main.blob_api,
            **shape, "row_bytes": row_bytes,
            "disk_bytes_ratio": round(lance_bytes / (rows * row_bytes), 3),
            "write_seconds": round(write_s, 1),
            "page_cache": "warm (one untimed pass each)",
            "workdir": str(root) if keep else None,
        }
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
