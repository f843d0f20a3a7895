"""One writer per lake: an exclusive lock held by every job that writes to a lake.

    with writer_lock("lake", job="embed") as lock:   # waits while another job holds it
        ...                                          # reconcile, plan, write fragments
        lock.check()                                 # before each commit: raises LockLost if the lease was lost
        ...

A second writer **waits**: it prints one line naming the holder (job, host,
pid, start time) to stderr, then blocks until the lock is free and goes on.
The lock is re-entrant within a process (an eval job that calls infer on the
same lake takes it once).

- **Local lake** (a path or ``file://``): ``fcntl.flock`` on ``<lake>/.img-writer.lock``.
  The kernel releases it when the holding process dies, so a SIGKILL cannot
  leave the lake locked and nothing needs breaking. The holder's info is
  written into the file for the waiting message.
- **Object store** (``s3://``, ``gs://``, ``az://``, ...): a *lease*, a tiny
  Lance dataset ``<lake>/_img_writer_lease`` whose schema metadata holds the
  owner, host, pid, job, start time, heartbeat and expiry. Every change is a
  Lance commit of an ``Overwrite`` with ``read_version`` = the version just
  read, which Lance refuses when another commit landed in between: a
  compare-and-swap, as atomic as Lance's own commits on that store (conditional
  put / put-if-absent on S3, GCS and Azure; atomic rename locally; an
  S3-compatible store without ``If-None-Match`` support needs Lance's
  ``s3+ddb://`` commit store, for the lease as for the tables). A background
  thread renews the lease every ``ttl / 4``; a waiter takes it over when it is
  released, when its version has not changed for ``ttl`` seconds of the
  waiter's own clock, or when it expired more than ``ttl`` ago by the wall
  clock (clock skew up to ``ttl`` is tolerated). ``break_lock=True``
  (``--break-lock``) takes it at once, for a holder that is alive but stuck.
  The holder stops trusting its lease once ``ttl / 2`` passed without a
  successful renewal; ``check()`` (before each commit) also reads the lease
  and raises ``LockLost`` if it changed hands. The remaining race is a lease
  taken over between ``check()`` and the end of the commit that follows it.

``IMG_LAKE_LOCK=lease`` forces the lease on a local path (shared file systems
whose ``flock`` does not work across hosts, and tests); ``IMG_LAKE_LEASE_TTL``
sets the lease's ttl in seconds (default 60).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

from img.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".img-writer.lock"
LEASE_DIR = "_img_writer_lease"
LEASE_KEY = b"img_writer_lease"
DEFAULT_TTL = 60.0


class LakeLocked(UserError):
    """Another job holds the lake's writer lock and this one may not wait for it (timeout, local --break-lock)."""


class LockLost(UserError):
    """The lease was taken over (``--break-lock``) or could not be renewed; the job stopped before committing."""

    exit_code = 1


def _now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _holder_text(info: dict | None) -> str:
    if not info:
        return "another job (holder unknown)"
    return (f"{info.get('job', '?')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"started {info.get('started', '?')})")


def _say(line: str) -> None:
    """One line on stderr (the waiting notice), independent of logging configuration."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _is_local(lake: str) -> bool:
    return "://" not in str(lake) or str(lake).startswith("file://")


def _local_path(lake: str) -> str:
    return os.path.abspath(os.path.expanduser(str(lake).removeprefix("file://")))


# ----------------------------------------------------------------------------- local: flock
_held_fds: set[int] = set()


def _close_in_child() -> None:
    # A child forked without exec shares the lock's open file; closing its copy keeps
    # the lock tied to the parent's lifetime (LOCK_UN here would release the parent's lock).
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()
    _registry.clear()


class FileLock:
    """``fcntl.flock`` on ``<lake>/.img-writer.lock``; released by the kernel when the process dies."""

    kind = "file"

    def __init__(self, lake: str, job: str) -> None:
        self.lake, self.job = _local_path(lake), job
        self.path = os.path.join(self.lake, LOCK_FILE)
        self.fd: int | None = None
        self.holder: dict | None = None

    def _open(self) -> int:
        try:
            os.makedirs(self.lake, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        except OSError as e:
            raise UserError(f"cannot create the lake's writer lock {self.path!r} ({e.strerror}). "
                            "Pass a `lake` folder you can write to.") from None

    def _read_holder(self, fd: int) -> dict | None:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw.decode()) if raw.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self, *, break_lock: bool, timeout: float | None, on_wait: Callable[[str], None]) -> None:
        fd = self._open()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            announced = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                info = self._read_holder(fd)
                for _ in range(10):  # the holder may have locked but not yet written its info
                    if info is not None:
                        break
                    time.sleep(0.05)
                    info = self._read_holder(fd)
                holder = _holder_text(info)
                if break_lock:
                    raise LakeLocked(
                        f"lake {self.lake} is locked by {holder}. `break_lock` does not apply to a local lake: its "
                        "lock is released as soon as the holder process exits. Wait for it, or stop that process.")
                if deadline is not None and time.monotonic() >= deadline:
                    raise LakeLocked(f"lake {self.lake} is locked by {holder}; it was not released within "
                                     f"{timeout:g}s. Wait for that job to finish, then run this again.")
                if not announced:
                    on_wait(f"lake {self.lake} is locked by {holder}; waiting for it to finish")
                    announced = True
                time.sleep(0.2)
        except BaseException:
            os.close(fd)
            raise
        self.holder = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(), "started": _now_iso(),
                       "lake": self.lake}
        data = (json.dumps(self.holder) + "\n").encode()
        os.pwrite(fd, data, 0)  # write, then cut: a reader never sees an empty file while we hold it
        os.ftruncate(fd, len(data))
        self.fd = fd
        _held_fds.add(fd)

    def check(self) -> None:
        """A flock cannot be lost while the process lives."""

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _held_fds.discard(fd)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # never unlink: a waiter may hold an open handle to this inode
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------- object store: lease
def lease_uri(lake: str) -> str:
    return f"{str(lake).rstrip('/')}/{LEASE_DIR}"


class LeaseLock:
    """A lease in a one-version-at-a-time Lance dataset, changed only by compare-and-swap commits."""

    kind = "lease"

    def __init__(self, lake: str, job: str, storage_options: dict[str, str] | None = None,
                 ttl: float | None = None) -> None:
        self.lake, self.job, self.storage_options = str(lake), job, storage_options or None
        self.uri = lease_uri(self.lake)
        raw = ttl if ttl is not None else os.environ.get("IMG_LAKE_LEASE_TTL", DEFAULT_TTL)
        try:
            self.ttl = float(raw)
        except ValueError:
            self.ttl = -1.0
        if not self.ttl > 0:
            raise UserError(f"lease ttl must be a number of seconds > 0, got {raw!r}. "
                            "Set IMG_LAKE_LEASE_TTL to a positive number.")
        self.owner = uuid.uuid4().hex
        self.version: int | None = None
        self.holder: dict | None = None
        self.renewals = 0
        self._last_ok = 0.0  # monotonic time of the last successful claim or renewal
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the register
    def _schema(self, record: dict):
        import pyarrow as pa

        return pa.schema([pa.field("lease", pa.int8())], metadata={LEASE_KEY: json.dumps(record).encode()})

    def read(self) -> tuple[int | None, dict | None]:
        """(version, record) of the lease, or (None, None) when it was never created."""
        import lance

        if _is_local(self.uri) and not os.path.isdir(_local_path(self.uri)):
            return None, None
        try:
            ds = lance.dataset(self.uri, storage_options=self.storage_options)
        except (ValueError, OSError) as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower():
                return None, None
            raise
        raw = (ds.schema.metadata or {}).get(LEASE_KEY)
        return ds.version, (json.loads(raw) if raw else None)

    def _create(self) -> None:
        import lance

        free = {"owner": "", "released": True, "heartbeat": time.time(), "expires": 0.0, "ttl": self.ttl}
        try:
            lance.write_dataset(self._schema(free).empty_table(), self.uri, mode="create",
                                storage_options=self.storage_options)
        except OSError as e:  # another process created it first: fine, everyone then swaps from a read version
            if "already exists" not in str(e).lower():
                raise

    def _swap(self, read_version: int, record: dict) -> int:
        """Commit ``record`` iff the lease is still at ``read_version``; CommitConflictError otherwise."""
        import lance

        ds = lance.LanceDataset.commit(self.uri, lance.LanceOperation.Overwrite(self._schema(record), []),
                                       read_version=read_version, max_retries=0,
                                       storage_options=self.storage_options)
        return ds.version

    def _record(self, *, released: bool = False) -> dict:
        now = time.time()
        return {**(self.holder or {}), "owner": self.owner, "heartbeat": now,
                "expires": 0.0 if released else now + self.ttl, "ttl": self.ttl, "released": released}

    def _stale(self, rec: dict, version: int, seen: dict[int, float]) -> bool:
        if rec.get("released") or not rec.get("owner"):
            return True
        ttl = float(rec.get("ttl", self.ttl))
        first = seen.setdefault(version, time.monotonic())
        return time.monotonic() - first >= ttl or time.time() > float(rec.get("expires", 0)) + ttl

    # -- acquire / renew / release
    def acquire(self, *, break_lock: bool, timeout: float | None, on_wait: Callable[[str], None]) -> None:
        from lance.commit import CommitConflictError

        deadline = None if timeout is None else time.monotonic() + timeout
        self.holder = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(), "started": _now_iso(),
                       "lake": self.lake}
        seen: dict[int, float] = {}
        announced = False
        while True:
            version, rec = self.read()
            if version is None:
                self._create()
                continue
            rec = rec or {}
            if break_lock or self._stale(rec, version, seen):
                if break_lock and not self._stale(rec, version, seen):
                    _say(f"breaking the writer lease on {self.lake} held by {_holder_text(rec)} (--break-lock)")
                try:
                    self.version = self._swap(version, self._record())
                except CommitConflictError:
                    continue  # someone else changed the lease in between: look again
                self._last_ok = time.monotonic()
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise LakeLocked(f"lake {self.lake} is locked by {_holder_text(rec)}; it was not released within "
                                 f"{timeout:g}s. Wait for that job to finish, or pass `break_lock` if it is stuck.")
            if not announced:
                on_wait(f"lake {self.lake} is locked by {_holder_text(rec)}; waiting for it to finish "
                        f"(lease ttl {float(rec.get('ttl', self.ttl)):g}s)")
                announced = True
            time.sleep(min(2.0, self.ttl / 8))
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="img-lake-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """One renewal; False (and the lease marked lost) when another process changed it."""
        from lance.commit import CommitConflictError

        with self._mutex:
            if self._lost is not None or self.version is None:
                return False
            try:
                self.version = self._swap(self.version, self._record())
            except CommitConflictError:
                _, rec = self.read()
                self._lost = f"the writer lease on {self.lake} was taken over by {_holder_text(rec)}"
                return False
            except Exception as e:  # noqa: BLE001 - a store hiccup: retry at the next beat, expire if it persists
                log.warning("could not renew the writer lease on %s: %s", self.lake, e)
                return True
            self._last_ok = time.monotonic()
            self.renewals += 1
        if self.renewals % 100 == 0:
            self._prune()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if not self.renew():
                return

    def _prune(self) -> None:
        """Drop lease versions older than the ttl (each renewal is a version)."""
        import lance

        try:
            lance.dataset(self.uri, storage_options=self.storage_options).cleanup_old_versions(
                older_than=timedelta(seconds=self.ttl), delete_unverified=True, error_if_tagged_old_versions=False)
        except Exception as e:  # noqa: BLE001 - housekeeping only
            log.debug("lease cleanup failed: %s", e)

    def check(self) -> None:
        """Raise LockLost unless the lease is still ours: renewed within ttl/2, and unchanged in the store."""
        with self._mutex:
            if self._lost is None and time.monotonic() - self._last_ok > self.ttl / 2:
                self._lost = (f"the writer lease on {self.lake} was not renewed for "
                              f"{time.monotonic() - self._last_ok:.0f}s (ttl {self.ttl:g}s)")
            if self._lost is None:
                try:
                    version, rec = self.read()
                except Exception as e:  # noqa: BLE001 - the store is unreachable: the ttl/2 rule above decides
                    log.warning("could not read the writer lease on %s: %s", self.lake, e)
                else:
                    if version != self.version:
                        self._lost = f"the writer lease on {self.lake} was taken over by {_holder_text(rec)}"
        if self._lost is not None:
            raise LockLost(f"{self._lost}; this {self.job} job stopped before its next commit. "
                           "Run the same command again to continue.")

    def release(self) -> None:
        from lance.commit import CommitConflictError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._lost is None and self.version is not None:
                try:
                    self.version = self._swap(self.version, self._record(released=True))
                except CommitConflictError:
                    pass  # taken over in the meantime: it is not ours to release
                except Exception as e:  # noqa: BLE001 - the lease then expires after its ttl
                    log.warning("could not release the writer lease on %s (%s); it expires in %gs", self.lake, e,
                                self.ttl)
            self.version = None
        self._prune()


# ----------------------------------------------------------------------------- the entry point
_registry: dict[str, list] = {}  # lake key -> [lock, depth]
_registry_mutex = threading.Lock()
os.register_at_fork(after_in_child=_close_in_child)


def lock_kind(lake: str) -> str:
    """'file' for a local lake, 'lease' for an object store; ``IMG_LAKE_LOCK=file|lease`` overrides."""
    forced = os.environ.get("IMG_LAKE_LOCK", "auto")
    if forced not in ("auto", "file", "lease"):
        raise UserError(f"IMG_LAKE_LOCK={forced!r} must be auto, file or lease. Unset it or pick one.")
    if forced != "auto":
        if forced == "file" and not _is_local(lake):
            raise UserError(f"IMG_LAKE_LOCK=file needs a local lake, got {lake!r}. Unset IMG_LAKE_LOCK.")
        return forced
    return "file" if _is_local(lake) else "lease"


@contextlib.contextmanager
def writer_lock(lake: str, job: str, *, break_lock: bool = False, storage_options: dict[str, str] | None = None,
                timeout: float | None = None, kind: str | None = None, ttl: float | None = None,
                on_wait: Callable[[str], None] = _say) -> Iterator[FileLock | LeaseLock]:
    """Hold the exclusive writer lock of ``lake`` for the block; waits (one line on stderr) while another job has it.

    ``timeout`` (seconds) raises ``LakeLocked`` instead of waiting longer; ``break_lock`` takes an object-store
    lease from a stuck holder. ``kind`` ('file' | 'lease') overrides the choice made from the URI.
    """
    kind = kind or lock_kind(lake)
    key = f"{kind}:{_local_path(lake) if _is_local(lake) else str(lake).rstrip('/')}"
    with _registry_mutex:
        entry = _registry.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:  # re-entrant within the process
        try:
            yield entry[0]
        finally:
            with _registry_mutex:
                entry[1] -= 1
        return
    lock: FileLock | LeaseLock = FileLock(lake, job) if kind == "file" else LeaseLock(lake, job, storage_options, ttl)
    lock.acquire(break_lock=break_lock, timeout=timeout, on_wait=on_wait)
    with _registry_mutex:
        _registry[key] = entry = [lock, 1]
    log.debug("holding the writer lock of %s (%s)", lake, lock.kind)
    try:
        yield lock
    finally:
        with _registry_mutex:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                _registry.pop(key, None)
        if last:
            lock.release()
