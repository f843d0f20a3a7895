"""What the Ray Data jobs (embed, eval) share: starting Ray, checking the cluster fits, progress.

    check_ray_address()                                 # before a job touches its lake: RAY_ADDRESS answers
    init_ray()                                          # local Ray, or the cluster of RAY_ADDRESS
    check_cluster_fits("embed", [cfg.ip, cfg.mllm], 2.0, "decode/writer 2 x 1", "[ip]/[mllm]")
    with JobProgress(todo, label="embed", unit="pairs") as bar:
        bar.advance(8)                                  # a bar on a terminal, a log line every 10 s elsewhere
"""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from typing import Any, Sequence

from img.errors import UserError
from img.progress import progress_bars

log = logging.getLogger(__name__)


def check_ray_address() -> None:
    """``UserError`` when ``RAY_ADDRESS`` is not ``host:port`` (or ``ray://host:port``) or nothing answers there.

    Ray itself would retry a dead address for minutes. Unset, ``auto`` and ``local`` pass: Ray finds or starts
    a cluster on this machine.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise UserError(f"RAY_ADDRESS={address!r} is not host:port (such as 10.0.0.1:6379, or ray://10.0.0.1:10001 "
                        "for Ray Client). Fix it, or unset RAY_ADDRESS to start Ray on this machine.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"RAY_ADDRESS={address!r}: nothing answers at {host}:{port} ({e.strerror or e}). Start the "
                        "cluster (`ray start --head`), fix RAY_ADDRESS, or unset it to start Ray on this "
                        "machine.") from None


def init_ray() -> float:
    """Start Ray here, or join the cluster of ``RAY_ADDRESS``; quiet its logs and progress bars.

    Returns the seconds it took (0 when Ray is already up).
    """
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    # Ray starts its processes with fork+exec; no Lance handle is used in a forked child, so the warning is moot.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address()
        log.info("connecting to Ray cluster at %s", os.environ["RAY_ADDRESS"])
        try:
            ray.init(log_to_driver=False)
        except ConnectionError as e:  # e.g. a token-auth cluster this process has no token for
            raise UserError(f"Ray could not join the cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']!r}: {e}. "
                            "Check it with `ray status`, or unset RAY_ADDRESS to start Ray on this machine.") from None
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    for name in ("ray", "ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own (JobProgress)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one "Progress bars disabled" warning
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    return time.perf_counter() - t0


def check_cluster_fits(job: str, pools: Sequence[Any], fixed_cpus: float, fixed: str, sections: str) -> None:
    """``UserError`` if the actor ``pools`` (``num_cpus``/``num_gpus`` x ``concurrency`` each) plus ``fixed_cpus``
    (described by ``fixed``) reserve more than the Ray cluster has: such a plan would stall, not fail."""
    import ray

    res = ray.cluster_resources()
    cpus = fixed_cpus + sum(p.num_cpus * p.concurrency for p in pools)
    gpus = sum(p.num_gpus * p.concurrency for p in pools)
    if cpus > res.get("CPU", 0) + 1e-9:
        raise UserError(f"the {job} config reserves {cpus:g} CPUs ({fixed} + actor pools) but the Ray cluster has "
                        f"{res.get('CPU', 0):g}. Lower num_cpus or concurrency in the {sections} sections of the "
                        "`config` TOML.")
    if gpus > res.get("GPU", 0) + 1e-9:
        raise UserError(f"the {job} config reserves {gpus:g} GPUs but the Ray cluster has {res.get('GPU', 0):g}. "
                        "Set num_gpus = 0 (CPU) or lower concurrency in the `config` TOML.")


class JobProgress:
    """A live line with a rate and ETA on a terminal (``img.progress``); a log line every 10 s otherwise
    (``label``/``unit`` name them)."""

    def __init__(self, total: int, enabled: bool = True, label: str = "embed", unit: str = "pairs"):
        self.total, self.enabled, self.done = total, enabled, 0
        self.label, self.unit = label, unit
        self.t0 = self.last_log = time.perf_counter()
        self.bars = progress_bars(enabled, rate=unit, eta=True)

    def __enter__(self):
        self.bars.__enter__()
        self.task = self.bars.add_task(self.label, total=self.total, rate=0.0)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.t0, 1e-9)
        self.bars.update(self.task, advance=n, rate=rate)
        if not self.bars.shown and self.enabled and (now - self.last_log > 10 or self.done == self.total):
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s %d/%d %s, %.2f %s/s, ETA %.0fs", self.label, self.done, self.total, self.unit, rate,
                     self.unit, eta)
            self.last_log = now

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)
        return False
