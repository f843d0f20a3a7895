"""``img bench embed``: the embed job against a bare in-process loop, in one run.

    img bench embed --pairs 1024 --profile bench --json
    img bench embed --pairs 1024 --format pickapic   # the sample in the published form (no `broken`)
    img bench embed --row-size real --pairs 200 --json                # rows of real size (6.8 MB per pair)
    img bench embed --row-size real --pairs 800 --guidance-dtype fp8 --json

Both sides embed the same generated sample. The job is the full Ray Data +
Lance pipeline (``run_embed``: Ray start, actors, model loading, writers,
commits); the bare loop runs the same stages on the same batches in one
plain process (spawned, so its memory is not the driver's), once with 1 torch
thread and once with all cores before the job, and with the faster setting
again after it: the baseline is the mean of the two rates, as the load of a
shared machine drifts. ``ratio`` = job / bare over the whole run (Ray's start
included), ``ratio_steady`` = after the job's first commit, ``bytes_ratio`` =
bytes on disk per pair / raw fp16 tensor bytes per pair. ``startup`` splits the
job's start-up: Ray, imports and model loading per actor process, first batch.
With ``RAY_ADDRESS`` set the job joins that (already running) cluster instead of
starting Ray; ``ray`` in the JSON says which ("started" or "RAY_ADDRESS").

``--row-size real`` measures the pipeline at the real system's row size: a
cheap stand-in stage produces the real profile's tensors (IP tokens 2 x 16 x
2048, guidance 650 x 5120; ``stand_in`` in the JSON says so) instead of the
models, and the bare loop then also writes and commits the same Lance
fragments, so the ratio is the cost of Ray. It adds MB/s written, peak RSS of
the driver and of every Ray worker, object-store use and spill, and the
fragment sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from img.config import load_config, project_file
from img.data.sample import FORMATS, write_sample
from img.errors import UserError
from img.lake import tables as lake_mod
from img.models.profiles import get_profile
from pipelines.common import check_ray_address, init_ray
from pipelines.embed import (
    Decode,
    FusedModels,
    Guidance,
    IPTokens,
    WriteFragments,
    _unpadded,
    embed_fingerprint,
    read_units,
    run_embed,
    table_schemas,
)
from pipelines.embed_config import EmbedConfig
from pipelines.source import list_shards, plan_units

REAL_PROFILE = "sdxl"  # the real system's dims: IP tokens 16 x 2048, guidance width 5120
REAL_GUIDANCE_LEN = 650  # LLaVA-1.5 guidance: 576 image tokens + the conversation (~650 in all)
STAND_IN = ("stand-in stages replace the models: each good pair gets the real profile's tensors (IP tokens "
            "2 x 16 x 2048 fp16, guidance 650 x 5120 with LLaMA-like outlier channels, stored as the config says) "
            "from a block computed once per actor; the pipeline around them is the real one")


# ----------------------------------------------------------------------------- stand-in model stages
class StandInIPTokens(IPTokens):
    """Real-size IP tokens without a model (``--row-size real``)."""

    def load(self):
        import torch

        return torch.randn(2, self.profile.dims.ip_tokens * self.profile.dims.ip_dim,
                           generator=torch.Generator().manual_seed(0))

    def compute(self, batch, good):
        from pipelines.embed import _to_storage

        n, width = len(good), self.encoder.shape[1]
        tokens = _to_storage(self.encoder, self.profile.tensor_dtype)
        win, lose = np.zeros((n, width), np.float16), np.zeros((n, width), np.float16)
        win[good], lose[good] = tokens[0], tokens[1]
        return {"winner_tokens": win, "loser_tokens": lose}


class StandInGuidance(Guidance):
    """Real-size guidance (650 x E) without a model, converted and stored exactly as the real stage's output."""

    def load(self):
        from img import fp8

        return fp8.llama_like(REAL_GUIDANCE_LEN, self.profile.dims.mllm_hidden, seed=0)

    def compute(self, batch, good):
        idx = np.flatnonzero(good)
        return _unpadded("guidance", [self.encoder] * len(idx), idx, len(good), self.profile.tensor_dtype,
                         self.guidance_dtype)


class StandInFused(FusedModels):
    def __init__(self, profile_name: str, device: str = "auto", threads: int = 0, guidance_dtype: str = "fp16",
                 mllm_batch_size: int = 0):
        self.stages = [StandInIPTokens(profile_name, device, threads),
                       StandInGuidance(profile_name, device, threads, guidance_dtype, mllm_batch_size)]


STAND_INS = {"ip": StandInIPTokens, "mllm": StandInGuidance, "fused": StandInFused}


# ----------------------------------------------------------------------------- memory
class MemorySampler:
    """Peak RSS of this process and of every process under this Ray node's raylet, and what Ray spilled from
    its object store to disk (the spill folder's files), sampled every ``every`` s."""

    def __init__(self, every: float = 0.25):
        import psutil  # a dependency of ray and deepspeed

        self.psutil, self.every = psutil, every
        self.driver_peak = 0
        self.workers: dict[int, dict[str, Any]] = {}
        self.spill_files: dict[str, int] = {}  # every spill file seen, with its largest size
        self.spill_peak = 0
        self._spill_dir = spill_dir()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._raylet: Any = None

    def _sample(self) -> None:
        ps = self.psutil
        try:
            self.driver_peak = max(self.driver_peak, ps.Process().memory_info().rss)
            if self._raylet is None:
                self._raylet = _raylet_process(ps)
            procs = self._raylet.children(recursive=True) if self._raylet is not None else []
        except (ps.Error, OSError):
            return
        for p in procs:
            try:
                mi, name = p.memory_info(), " ".join(p.cmdline()[:1])
            except (ps.Error, OSError):
                continue
            w = self.workers.setdefault(p.pid, {"pid": p.pid, "name": name, "peak_rss": 0, "peak_private": 0})
            if mi.rss > w["peak_rss"]:
                w["peak_rss"], w["name"] = mi.rss, name  # Ray renames a worker when it takes a task or actor
            w["peak_private"] = max(w["peak_private"], mi.rss - getattr(mi, "shared", 0))

    def _spill(self) -> None:
        if not self._spill_dir or not os.path.isdir(self._spill_dir):
            return
        total = 0
        for entry in os.scandir(self._spill_dir):
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            total += size
            self.spill_files[entry.name] = max(size, self.spill_files.get(entry.name, 0))
        self.spill_peak = max(self.spill_peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()
            self._spill()

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="img-bench-mem")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def report(self) -> dict[str, Any]:
        gb = 2.0**30
        named = [w for w in self.workers.values() if w["name"].startswith("ray::")]
        return {
            "driver_peak_rss_gb": round(self.driver_peak / gb, 3),
            "workers_peak_rss_gb": sorted(({"name": w["name"], "pid": w["pid"], "rss": round(w["peak_rss"] / gb, 3),
                                            "rss_minus_shared": round(w["peak_private"] / gb, 3)} for w in named),
                                          key=lambda w: -w["rss"]),
            "worker_peak_rss_gb": round(max((w["peak_rss"] for w in named), default=0) / gb, 3),
            "worker_peak_rss_minus_shared_gb": round(max((w["peak_private"] for w in named), default=0) / gb, 3),
            "note": "RSS counts the object-store pages a worker maps; rss_minus_shared leaves shared pages out",
        }

    def spill_report(self) -> dict[str, Any]:
        import ray

        gb = 2.0**30
        return {"object_store_capacity_gb": round(ray.cluster_resources().get("object_store_memory", 0) / gb, 2),
                "spilled_gb": round(sum(self.spill_files.values()) / gb, 3), "spill_files": len(self.spill_files),
                "spill_on_disk_peak_gb": round(self.spill_peak / gb, 3), "spill_dir": self._spill_dir}


def _raylet_process(psutil: Any) -> Any:
    import ray

    node = ray._private.worker._global_node  # this driver's Ray node (None when connected to a cluster)
    info = node.all_processes.get("raylet") if node is not None else None
    return psutil.Process(info[0].process.pid) if info else None


def spill_dir() -> str:
    """Where this Ray node spills objects (its filesystem spilling config), or "" when unknown."""
    import ray

    node = ray._private.worker._global_node
    try:
        conf = json.loads(node._object_spilling_config) if node is not None else {}
        path = conf["params"]["directory_path"]
        path = path[0] if isinstance(path, list) else path
        return os.path.join(path, f"ray_spilled_objects_{node.node_id}")
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return ""


def fragment_sizes(lake: str) -> dict[str, Any]:
    """Sizes of the features table's fragments (their data files)."""
    ds = lake_mod.open_table(lake, "features")
    sizes = sorted(sum(f.file_size_bytes or 0 for f in frag.data_files()) for frag in ds.get_fragments()) if ds else []
    rows = sorted(frag.count_rows() for frag in ds.get_fragments()) if ds else []
    mb = [s / 1e6 for s in sizes]
    return {"count": len(sizes), "rows_min": rows[0] if rows else 0, "rows_max": rows[-1] if rows else 0,
            "mb_min": round(mb[0], 1) if mb else 0, "mb_median": round(float(np.median(mb)), 1) if mb else 0,
            "mb_max": round(mb[-1], 1) if mb else 0}


# ----------------------------------------------------------------------------- the bare loop
def _bare_loop(data: str, profile_name: str, cfg: EmbedConfig, real: bool, lake: str | None = None) -> dict[str, Any]:
    """Decode + IP tokens + guidance over every decisive pair, in process, no Ray.

    ``real``: the stand-in stages, and every ``rows_per_fragment`` rows are written and committed to ``lake`` as
    the job's writer and driver do (the work that decides cost at real row size); otherwise nothing is written.
    """
    units, _, _ = plan_units(list_shards(data), set(), None, unit_rows=cfg.read_rows)
    batch = {k: np.array([u[k] for u in units], dtype=object) for k in units[0]}
    classes = STAND_INS if real else {"ip": IPTokens, "mllm": Guidance}
    ip, mllm = classes["ip"](profile_name, "cpu"), classes["mllm"](profile_name, "cpu", 0, cfg.guidance_dtype)
    decode = Decode(cfg.min_side, cfg.max_pixels, cfg.question_seed)
    writer = None
    if real:
        profile = get_profile(profile_name)
        schemas = table_schemas(profile, cfg, embed_fingerprint(profile, cfg))
        for name, schema in schemas.items():
            lake_mod.ensure_table(lake, name, schema, data_storage_version="2.1" if name == "features" else None)
        writer = WriteFragments(lake, schemas, {})
    warm = {k: v[: cfg.mllm.batch_size] for k, v in read_units({k: v[:1] for k, v in batch.items()}).items()}
    mllm(ip(decode(warm)))  # first calls allocate and pick kernels; the job's actors pay this in start-up
    t0 = time.perf_counter()
    rows = read_units(batch)
    n = len(rows["pair_id"])
    raw_bytes = good = 0
    pending: list[dict] = []

    def flush() -> None:
        if not pending:
            return
        part = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        out = writer(part)
        for name in ("features", "pairs", "quarantine"):
            lake_mod.commit_fragments(lake, name, json.loads(out[name][0]))
        pending.clear()

    for start in range(0, n, cfg.ip.batch_size):
        part = {k: v[start: start + cfg.ip.batch_size] for k, v in rows.items()}
        part = decode(part)
        part = ip(part)
        for s2 in range(0, len(part["pair_id"]), cfg.mllm.batch_size):
            sub = {k: v[s2: s2 + cfg.mllm.batch_size] for k, v in part.items()}
            sub = mllm(sub)
            ok = np.array([e == "" for e in sub["error"]])
            good += int(ok.sum())
            e = get_profile(profile_name).dims.mllm_hidden
            raw_bytes += int(sub["winner_tokens"][ok].nbytes + sub["loser_tokens"][ok].nbytes)
            raw_bytes += sum(int(sub["guidance_len"][i]) * e * 2 for i in np.flatnonzero(ok))  # as fp16
            if writer is not None:
                pending.append({k: v for k, v in sub.items() if k not in ("winner_image", "loser_image")})
                if sum(len(p["pair_id"]) for p in pending) >= cfg.rows_per_fragment:
                    flush()
    if writer is not None:
        flush()
    seconds = time.perf_counter() - t0
    return {"pairs": good, "seconds": seconds, "raw_bytes_per_pair": raw_bytes / max(good, 1)}


def _bare_worker(data: str, profile_name: str, cfg: EmbedConfig, real: bool, lake: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    try:
        return _bare_loop(data, profile_name, cfg, real, lake)
    finally:
        shutil.rmtree(lake, ignore_errors=True)


def bare_loop(data: str, profile_name: str, cfg: EmbedConfig, real: bool, lake: str, threads: int) -> dict:
    """``_bare_loop`` in a fresh process (spawned), so its memory never counts as the job driver's."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_bare_worker, data, profile_name, cfg, real, lake, threads).result()


# ----------------------------------------------------------------------------- the benchmark
def bench_config(row_size: str, config: str | None, guidance_dtype: str, rows_per_fragment: int | None = None
                 ) -> EmbedConfig:
    """The job's settings: ``config`` (default jobs/embed.toml); at real row size the fragment, read-unit
    and writer settings come from jobs/embed_gpu.toml (the real-size defaults) unless ``config`` is given."""
    cfg = load_config(EmbedConfig, config if config else project_file("embed.toml"))
    if row_size == "real" and not config:
        gpu = load_config(EmbedConfig, project_file("embed_gpu.toml"))
        # the stand-ins need no model threads: their pools reserve a quarter CPU each, and the writers take
        # what the machine has left (up to the GPU file's count)
        pools = {"num_cpus": 0.25, "num_gpus": 0.0, "concurrency": 1, "calls": 1}
        ip, mllm = replace(cfg.ip, **pools), replace(cfg.mllm, **pools)
        free = (os.cpu_count() or 1) - ip.num_cpus - mllm.num_cpus - cfg.decode_cpus
        writers = max(1, min(gpu.writers, int(free / cfg.decode_cpus + 1e-9)))
        cfg = replace(cfg, rows_per_fragment=gpu.rows_per_fragment, read_rows=gpu.read_rows, writers=writers,
                      fuse_models=gpu.fuse_models, ip=ip, mllm=mllm)  # one stand-in per pool, as on a GPU cluster
    cfg = replace(cfg, guidance_dtype=guidance_dtype)
    return replace(cfg, rows_per_fragment=rows_per_fragment, read_rows=rows_per_fragment) if rows_per_fragment else cfg


def run_bench(pairs: int = 1024, profile_name: str = "bench", seed: int = 0, workdir: str | None = None,
              fmt: str = "sample", row_size: str = "bench", guidance_dtype: str = "fp16",
              config: str | None = None, rows_per_fragment: int | None = None) -> dict[str, Any]:
    """Generate a sample (``fmt`` as in ``img data sample --format``), run the job and the bare loop on it."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}. Pass --format pickapic "
                        "for exactly the published columns.")
    if row_size not in ("bench", "real"):
        raise UserError(f"--row-size must be 'bench' or 'real', got {row_size!r}.")
    if guidance_dtype not in ("fp16", "fp8"):
        raise UserError(f"--guidance-dtype must be fp16 or fp8, got {guidance_dtype!r}.")
    real = row_size == "real"
    if real:
        profile_name = REAL_PROFILE
    if rows_per_fragment is not None and rows_per_fragment < 1:
        raise UserError(f"--rows-per-fragment must be >= 1, got {rows_per_fragment}.")
    cfg = bench_config(row_size, config, guidance_dtype, rows_per_fragment)
    check_ray_address()  # before minutes of bare loops
    root = tempfile.mkdtemp(prefix="img-bench-embed-", dir=workdir)
    try:
        return _run(root, pairs, profile_name, seed, fmt, real, cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # real-size lakes are GBs


def _run(root: str, pairs: int, profile_name: str, seed: int, fmt: str, real: bool, cfg: EmbedConfig) -> dict:
    import psutil

    data, lake = os.path.join(root, "data"), os.path.join(root, "lake")
    write_sample(data, pairs=pairs, seed=seed, corrupt=0.0, ties=0.0, fmt=fmt)
    bare_runs, best = _bare_before(data, profile_name, cfg, real, root)
    bare = bare_runs[best]
    load_before = os.getloadavg()
    driver_rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    ray_s = init_ray()  # inside the timed run: Ray's start-up is part of the job's cost
    with MemorySampler() as mem:
        summary = run_embed(data, lake, profile_name, cfg, progress=False, classes=STAND_INS if real else None)
    job_s = time.perf_counter() - t0
    load_after = os.getloadavg()
    frags = fragment_sizes(lake)
    shutil.rmtree(lake, ignore_errors=True)  # GBs at real row size
    # the machine's load drifts (it is shared): the bare loop runs again after the job, and the baseline is the
    # mean of its rates before and after
    after = bare_loop(data, profile_name, cfg, real, os.path.join(root, "bare-after"), best)
    job_rate = summary.written / job_s
    bare_rate = (bare["pairs"] / bare["seconds"] + after["pairs"] / after["seconds"]) / 2
    steady = (summary.written - summary.first_commit_pairs) / max(summary.seconds - summary.first_commit_seconds, 1e-9)
    startup = {**summary.startup, "ray_init_s": round(ray_s, 2)}
    ray_mode = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS", "").strip() not in ("", "local") else "started"
    out = {
        "profile": profile_name,
        "row_size": "real" if real else "bench",
        "format": fmt,
        "guidance_dtype": cfg.guidance_dtype,
        "pairs": summary.written,
        "job_pairs_per_s": round(job_rate, 3),
        "bare_pairs_per_s": round(bare_rate, 3),
        "ratio": round(job_rate / bare_rate, 3),
        # after the first commit: actors are up and models loaded (what a long job sees)
        "job_steady_pairs_per_s": round(steady, 3),
        "ratio_steady": round(steady / bare_rate, 3),
        "job_startup_s": round(summary.first_commit_seconds + ray_s, 2),
        "startup": startup,
        "ray": ray_mode,
        "job_seconds": round(job_s, 2),
        "bare_seconds": round(bare["pairs"] / bare_rate, 2),
        "bare_threads": best,
        "bare_pairs_per_s_by_threads": {t: round(r["pairs"] / r["seconds"], 3) for t, r in bare_runs.items()},
        "bare_pairs_per_s_after_job": round(after["pairs"] / after["seconds"], 3),
        "bytes_per_pair_on_disk": round(summary.bytes_per_pair, 1),
        "raw_tensor_bytes_per_pair": round(bare["raw_bytes_per_pair"], 1),
        "bytes_ratio": round(summary.bytes_per_pair / bare["raw_bytes_per_pair"], 4),
        "job_time_split_s": {k: round(v, 2) for k, v in summary.time_split.items()},
        "config": {k: getattr(cfg, k) for k in ("rows_per_fragment", "read_rows", "writers", "fuse_models",
                                                 "decode_cpus")} | {"ip": vars(cfg.ip), "mllm": vars(cfg.mllm)},
        "cpus": os.cpu_count(),
        "load_average": {"before_job": [round(x, 1) for x in load_before],
                         "after_job": [round(x, 1) for x in load_after]},
    }
    if real:
        out.update(_real_size_figures(summary, job_s, steady, bare_rate, driver_rss, mem, frags))
    return out


def _bare_before(data: str, profile_name: str, cfg: EmbedConfig, real: bool, root: str) -> tuple[dict[int, dict], int]:
    """The bare loop before the job, with 1 torch thread and with all cores: (runs by threads, the faster count)."""
    # The bare loop gets its best thread setting (1 thread, or all cores): the ratio is against the faster one.
    bare_runs = {}
    for threads in sorted({1, os.cpu_count() or 1}) if not real else [1]:  # stand-ins do not use torch threads
        bare_runs[threads] = bare_loop(data, profile_name, cfg, real, os.path.join(root, f"bare-{threads}"), threads)
    return bare_runs, max(bare_runs, key=lambda t: bare_runs[t]["pairs"] / bare_runs[t]["seconds"])


def _real_size_figures(summary: Any, job_s: float, steady: float, bare_rate: float, driver_rss: int,
                       mem: MemorySampler, frags: dict[str, Any]) -> dict[str, Any]:
    """What ``--row-size real`` adds: MB/s written (whole run, steady, per writer CPU second, bare), memory,
    object-store spill and fragment sizes."""
    disk_mb = summary.bytes_per_pair * summary.written / 1e6
    return {
        "stand_in": STAND_IN,
        "MB_per_s_written": round(disk_mb / job_s, 1),
        "MB_per_s_written_steady": round(steady * summary.bytes_per_pair / 1e6, 1),
        # CPU seconds the writer processes spent (Lance's threads included) per MB written: cores per GB/s
        "writer_MB_per_cpu_s": round(disk_mb / max(summary.time_split.get("cpu_write", 0.0), 1e-9), 1),
        "bare_MB_per_s_written": round(bare_rate * summary.bytes_per_pair / 1e6, 1),
        "memory": {"driver_rss_at_start_gb": round(driver_rss / 2**30, 3), **mem.report()},
        "object_store": mem.spill_report(),
        "fragments": frags,
    }
