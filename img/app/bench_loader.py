"""Benchmark: the training loader vs a raw read of the same bytes from a flat memmap file.

    img bench loader --json            # 160 rows: guidance 650 x 5120 fp16 (6.7 MB), tokens 2 x 16 x 2048
    img bench loader --small --json    # 160 rows of 64 x 512 guidance, 2 x 16 x 256 tokens (seconds)

Both sides read the same rows in the same shuffled order (the loader's epoch-0
order), in batches of 8, from files that were fsynced and then read once
untimed (page cache warm and clean). Timed passes alternate; medians are
reported (``*_best`` = fastest pass) because single passes are noisy on a
shared machine. The table is written as the embed job writes it (Lance file
format 2.1). Two raw baselines, described in the JSON's ``raw`` key so the
ratio means the same thing every run:

- ``raw``: each row's guidance, winner and loser bytes copied out of one flat
  ``np.memmap`` file into new numpy arrays (``np.array(mm[a:b])``), one thread,
  no padding, no dtype change.
- ``raw_into``: the same bytes copied into reused buffers: a pure memcpy, the
  upper bound for any reader of these bytes.

The loader does everything training gets: ``take`` of the token columns, each
guidance blob copied (rows in parallel on ``num_workers`` threads) into one
padded (B, L_max, E) fp16 tensor, sizes checked, torch tensors made. Its
default path memory-maps the fragments' data files at the positions Lance's
blob descriptions give; ``variants`` holds Lance's own blob API (``take_blobs``,
the path for object stores), other thread counts, padding into fp32, and an
fp8 copy of the table (dequantised while padding).
"""
from __future__ import annotations

import functools
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


RAW = ("per sample: the guidance, winner and loser bytes copied from one flat np.memmap file (page cache warm) "
       "into new numpy arrays with np.array(mm[a:b]); one thread, no padding, no dtype conversion")
RAW_INTO = "the same bytes copied into reused buffers (np.copyto): a pure memcpy"
RAW_BATCH = ("as raw, but the arrays of a batch's rows are kept until the batch is complete, as any loader's batch "
             "must be: 8 rows (53 MB) do not fit in the CPU cache, where raw's one recycled row (6.6 MB) can")


def write_bench_lake(root: Path, rows: int, guidance_len: int, guidance_dim: int, ip_tokens: int, ip_dim: int,
                     seed: int = 0, data_storage_version: str | None = features_schema.DATA_STORAGE_VERSION,
                     guidance_dtype: str = "fp16", flat: bool = True) -> tuple[Path | None, np.ndarray]:
    """A features table with the real schema + a flat file of the same bytes; returns (flat path, offsets).

    ``guidance_dtype="fp8"``: the guidance (random values with LLaMA-like outliers) is quantised as the
    embed job does; no flat file is written then.
    """
    import lance
    import pyarrow as pa
    import torch

    from img import fp8

    n = ip_tokens * ip_dim
    g_bytes, t_bytes = guidance_len * guidance_dim * 2, n * 2
    row_bytes = g_bytes + 2 * t_bytes
    extra = {"ip_tokens": ip_tokens, "ip_dim": ip_dim, "guidance_dim": guidance_dim, "dtype": "float16",
             "profile": "bench"}
    if guidance_dtype == "fp8":
        extra["guidance_dtype"] = features_schema.FP8
        flat = False
        h = fp8.llama_like(guidance_len, guidance_dim, seed)
    schema = with_provenance(features_schema.schema(ip_tokens, ip_dim, guidance_dtype=guidance_dtype),
                             table="features", version=features_schema.VERSION, fingerprint="bench", extra=extra)
    path = root / "flat.bin"
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(rows * row_bytes,)) if flat else None
    rng = np.random.default_rng(seed)

    def batches():
        for s in range(0, rows, 8):
            m = min(8, rows - s)
            w = rng.integers(0, 0x3C00, size=(m, n), dtype=np.uint16)
            lo = rng.integers(0, 0x3C00, size=(m, n), dtype=np.uint16)
            cols = {
                "pair_id": pa.array([f"bench#{s + j}" for j in range(m)]),
                "winner_tokens": pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1).view(np.float16)), n),
                "loser_tokens": pa.FixedSizeListArray.from_arrays(pa.array(lo.reshape(-1).view(np.float16)), n),
                "guidance_len": pa.array([guidance_len] * m, pa.int32()),
            }
            if guidance_dtype == "fp8":
                q = [fp8.quantize(torch.roll(h, s + j, 0)) for j in range(m)]
                cols["guidance"] = pa.array([b.numpy().tobytes() for b, _ in q], pa.large_binary())
                cols["guidance_scale"] = pa.array([sc.numpy() for _, sc in q], pa.list_(pa.float32()))
            else:
                # finite fp16 values in [0, 1): the bytes only need to be realistic in size
                g = rng.integers(0, 0x3C00, size=(m, guidance_len * guidance_dim), dtype=np.uint16)
                cols["guidance"] = pa.array([g[j].tobytes() for j in range(m)], pa.large_binary())
            if mm is not None:
                _write_flat(mm, s, g, w, lo, row_bytes)
            yield pa.record_batch(cols, schema=schema)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(root / "features.lance"),
                        schema=schema, max_rows_per_file=rows, data_storage_version=data_storage_version)
    if mm is not None:
        mm.flush()
        del mm
    return (path if flat else None), np.arange(rows, dtype=np.int64) * row_bytes


def _write_flat(mm: np.ndarray, first: int, g: np.ndarray, w: np.ndarray, lo: np.ndarray, row_bytes: int) -> None:
    """Copy rows ``first``, ``first + 1``, ... (guidance, winner, loser bytes, back to back) into the flat file."""
    g_bytes, t_bytes = g.shape[1] * 2, w.shape[1] * 2
    for j in range(len(g)):
        off = (first + j) * row_bytes
        mm[off : off + g_bytes] = g[j].view(np.uint8)
        mm[off + g_bytes : off + g_bytes + t_bytes] = w[j].view(np.uint8)
        mm[off + g_bytes + t_bytes : off + row_bytes] = lo[j].view(np.uint8)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


CPU: dict[str, list[float]] = {}  # process CPU seconds (all threads) of each timed pass, by kind


def _time_loader(loader, steps: int, kind: str = "") -> float:
    loader.epoch, loader.position = 0, 0
    t, c = time.perf_counter(), time.process_time()
    it = iter(loader)
    for _ in range(steps):
        with next(it):  # padded guidance, tokens: what training gets; its buffer goes back at the end of the step
            pass
    it.close()
    dt = time.perf_counter() - t
    if kind:
        CPU.setdefault(kind, []).append(time.process_time() - c)
    return dt


def _time_raw(mm: np.ndarray, offsets: np.ndarray, order: np.ndarray, row_bytes: int, g_bytes: int, t_bytes: int,
              into: np.ndarray | None = None, kind: str = "", batch: int = 0) -> float:
    """Copy each row's guidance, winner and loser bytes out of the memmap (into ``into`` rows if given;
    ``batch`` > 0: keep the arrays of each ``batch`` rows until the batch is complete)."""
    t, c = time.perf_counter(), time.process_time()
    kept: list[np.ndarray] = []
    for k, i in enumerate(order):
        off = int(offsets[i])
        parts = (mm[off : off + g_bytes], mm[off + g_bytes : off + g_bytes + t_bytes],
                 mm[off + g_bytes + t_bytes : off + row_bytes])
        if into is None:
            rows = [np.array(p).view(np.float16) for p in parts]
            if batch:
                kept = (kept if k % batch else []) + rows
        else:
            dst = into[k % len(into)]
            np.copyto(dst[:g_bytes], parts[0])
            np.copyto(dst[g_bytes : g_bytes + t_bytes], parts[1])
            np.copyto(dst[g_bytes + t_bytes :], parts[2])
    if kind:
        CPU.setdefault(kind, []).append(time.process_time() - c)
    return time.perf_counter() - t


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (table, TrainLoader settings)
    "take_blobs": ("fp16", {"blob_api": "take_blobs"}),  # Lance's blob API: the path for object stores
    "read_blobs_api": ("fp16", {"blob_api": "read_blobs"}),
    "workers0": ("fp16", {"num_workers": 0}),
    "workers1": ("fp16", {"num_workers": 1}),
    "workers4": ("fp16", {"num_workers": 4}),
    "pad_fp32": ("fp16", {"pad_dtype": "float32"}),  # CPU training: fp16 -> fp32 while padding
    "fp8": ("fp8", {}),  # fp8 table, dequantised into fp16 while padding
    "fp8_pad_fp32": ("fp8", {"pad_dtype": "float32"}),
    "fp8_kept": ("fp8", {"pad_dtype": "stored"}),  # e4m3 bytes + scales padded; dequantised later, on the device
}


def run_bench(rows: int = 160, small: bool = False, batch_size: int = 8, repeats: int = 5, num_workers: int = 2,
              prefetch: int = 4, workdir: str | None = None, keep: bool = False) -> dict[str, Any]:
    """Build the tables and flat file, time the loader and both raw reads, return the figures."""
    shape = SMALL if small else FULL
    root = Path(tempfile.mkdtemp(prefix="img-bench-loader-", dir=workdir))
    try:
        t0 = time.perf_counter()
        flat, offsets = write_bench_lake(root, rows, **shape)
        write_bench_lake(root / "fp8", rows, **shape, guidance_dtype="fp8")
        _fsync_tree(root)  # no writeback of dirty pages during the timed passes
        write_s = time.perf_counter() - t0
        lakes = {"fp16": str(root), "fp8": str(root / "fp8")}
        main = TrainLoader(lakes["fp16"], batch_size=batch_size, seed=0, heldout_pairs=0,
                           num_workers=num_workers, prefetch=prefetch)
        raws = _raw_reads(flat, offsets, main.epoch_order(0), shape, batch_size)
        times = _time_passes(main, raws, repeats)
        variants = _time_variants(lakes, main.steps_per_epoch, raws["raw"], batch_size, num_workers, prefetch,
                                  repeats)
        settings = {"rows": rows, "batch_size": batch_size, "repeats": repeats, "num_workers": num_workers,
                    "prefetch": prefetch}
        return _report(main, times, variants, root, shape, settings, write_s, keep)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _row_bytes(shape: dict[str, int]) -> tuple[int, int, int]:
    """(guidance, token, row) bytes of one fp16 row of ``shape``."""
    g_bytes = shape["guidance_len"] * shape["guidance_dim"] * 2
    t_bytes = shape["ip_tokens"] * shape["ip_dim"] * 2
    return g_bytes, t_bytes, g_bytes + 2 * t_bytes


def _raw_reads(flat: Path, offsets: np.ndarray, order: np.ndarray, shape: dict[str, int],
               batch_size: int) -> dict[str, Any]:
    """The raw baselines over the flat file, in the loader's order: name -> ``time(kind)`` (seconds per pass)."""
    g_bytes, t_bytes, row_bytes = _row_bytes(shape)
    into = np.empty((batch_size, row_bytes), np.uint8)
    mm = np.memmap(flat, dtype=np.uint8, mode="r")  # kept open, as the loader keeps its maps
    read = functools.partial(_time_raw, mm, offsets, order, row_bytes, g_bytes, t_bytes)
    return {"raw": lambda kind="": read(kind=kind),
            "raw_into": lambda kind="raw_into": read(into, kind),
            "raw_batch": lambda kind="raw_batch": read(None, kind, batch_size)}


def _time_passes(main: TrainLoader, raws: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """One untimed pass of each (page cache, Lance metadata, buffers, maps), then ``repeats`` alternating timed
    passes of the loader and each raw read; seconds per pass by name (CPU seconds go to ``CPU``)."""
    steps = main.steps_per_epoch
    _time_loader(main, steps)  # warm: page cache, Lance metadata, recycled buffers, memory maps
    raws["raw"](), raws["raw_into"](), raws["raw_batch"]()
    times: dict[str, list[float]] = {"loader": [], "raw": [], "raw_into": [], "raw_batch": []}
    CPU.clear()
    for _ in range(repeats):
        times["loader"].append(_time_loader(main, steps, "loader"))
        times["raw"].append(raws["raw"]("raw"))
        times["raw_into"].append(raws["raw_into"]())
        times["raw_batch"].append(raws["raw_batch"]())
    return times


def _time_variants(lakes: dict[str, str], steps: int, raw: Any, batch_size: int, num_workers: int, prefetch: int,
                   repeats: int) -> dict[str, dict[str, Any]]:
    """Each of ``VARIANTS``: samples/s, and its ratio to a raw pass timed right after each of its passes."""
    import torch

    n = steps * batch_size
    variants: dict[str, dict[str, Any]] = {}
    for name, (table, kw) in VARIANTS.items():
        kw = {"num_workers": num_workers, **kw}
        if kw.get("pad_dtype") == "float32":
            kw["pad_dtype"] = torch.float32
        ld = TrainLoader(lakes[table], batch_size=batch_size, seed=0, heldout_pairs=0, prefetch=prefetch,
                         **kw)
        _time_loader(ld, steps)
        ts, rs = [], []
        for _ in range(max(2, repeats // 2 + 1)):
            ts.append(_time_loader(ld, steps))
            rs.append(raw())
        variants[name] = {"samples_per_s": round(n / statistics.median(ts), 1),
                          "ratio_vs_raw": round(statistics.median(r / t for t, r in zip(ts, rs)), 3),
                          "blob_api": ld.blob_api, "table": table,
                          **{k: str(v).removeprefix("torch.") for k, v in kw.items()}}
    return variants


def _report(main: TrainLoader, times: dict[str, list[float]], variants: dict[str, dict[str, Any]], root: Path,
            shape: dict[str, int], settings: dict[str, int], write_s: float, keep: bool) -> dict[str, Any]:
    """The figures: medians and ratios (per pass, of medians, of CPU time), variants, sizes, the machine's load."""
    rows, batch_size, num_workers, prefetch = (settings[k] for k in ("rows", "batch_size", "num_workers", "prefetch"))
    row_bytes = _row_bytes(shape)[2]
    n = main.steps_per_epoch * batch_size
    cpu_ms = {k: 1e3 * statistics.median(v) / n for k, v in CPU.items()}
    sps = {k: n / statistics.median(v) for k, v in times.items()}
    best = {k: n / min(v) for k, v in times.items()}
    # load changes while the passes run: each loader pass is compared with the raw pass right after it
    ratio = statistics.median(r / lo for lo, r in zip(times["loader"], times["raw"]))
    lance_bytes = _dir_bytes(root / "features.lance")
    fp8_bytes = _dir_bytes(root / "fp8" / "features.lance")
    return {
        "loader_samples_per_s": round(sps["loader"], 1),
        "raw_samples_per_s": round(sps["raw"], 1),
        "ratio": round(ratio, 3),
        "raw": RAW,
        "loader": (f"TrainLoader defaults ({main.blob_api} read path, {num_workers} reader threads, prefetch "
                   f"{prefetch}): tokens via Lance take, guidance copied into one padded (B, L_max, E) fp16 "
                   "tensor per batch"),
        "ratio_of_medians": round(sps["loader"] / sps["raw"], 3),
        # CPU time per sample (all threads of the process): what each side costs, whatever the machine's load
        "cpu_ms_per_sample": {k: round(v, 3) for k, v in cpu_ms.items()},
        "ratio_cpu": round(cpu_ms["raw"] / cpu_ms["loader"], 3),
        "raw_into_samples_per_s": round(sps["raw_into"], 1),
        "raw_into": RAW_INTO,
        "ratio_vs_memcpy": round(sps["loader"] / sps["raw_into"], 3),
        "raw_batch_samples_per_s": round(sps["raw_batch"], 1),
        "raw_batch": RAW_BATCH,
        "ratio_vs_raw_batch": round(statistics.median(r / lo for lo, r in zip(times["loader"], times["raw_batch"])), 3),
        "loader_best_samples_per_s": round(best["loader"], 1),
        "raw_best_samples_per_s": round(best["raw"], 1),
        "raw_into_best_samples_per_s": round(best["raw_into"], 1),
        "loader_MB_per_s": round(sps["loader"] * row_bytes / 1e6, 1),
        "runs_samples_per_s": {k: [round(n / t, 1) for t in v] for k, v in times.items()},
        "variants": variants,
        "rows": rows, "samples_per_pass": n, "batch_size": batch_size, "repeats": settings["repeats"],
        "num_workers": num_workers, "prefetch": prefetch, "blob_api": main.blob_api,
        **shape, "row_bytes": row_bytes,
        "disk_bytes_ratio": round(lance_bytes / (rows * row_bytes), 3),
        "fp8_disk_bytes_ratio": round(fp8_bytes / (rows * row_bytes), 3),
        "write_seconds": round(write_s, 1),
        "page_cache": "warm and clean (fsync, then one untimed pass each)",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "workdir": str(root) if keep else None,
    }
