"""Test helpers for the lake's writers: another process holding the writer lock, `img` as a process, row counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")

HOLDER = r"""
import sys
from img.lake.lock import LockLost, writer_lock
kind, lake, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
with writer_lock(lake, job="holder", kind=kind, ttl=ttl) as lock:
    print("locked", flush=True)
    sys.stdin.readline()  # hold until told (or killed)
    try:
        lock.check()
        print("still mine", flush=True)
    except LockLost as e:
        print("lost:", e, flush=True)
"""


class Holder:
    """Another process holding the lake's writer lock until ``release()`` (or SIGKILL)."""

    def __init__(self, lake, kind="file", ttl=60.0):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(lake), str(ttl)], env=ENV, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", line + self.proc.stderr.read()
        self.pid = self.proc.pid

    def release(self) -> str:
        out, err = self.proc.communicate("go\n", timeout=60)
        assert self.proc.returncode == 0, err
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def img_cmd(*args: str) -> list[str]:
    """The ``img`` command line as a fresh process (run with ``env=ENV``)."""
    return [sys.executable, "-m", "img.cli", *args]


def lake_counts(lake: str) -> dict[str, int]:
    """Rows and distinct pair ids of pairs (p, pd), features (f, fd) and quarantine (q, qd), through `img sql`."""
    q = ("select (select count(*) from pairs) p, (select count(distinct pair_id) from pairs) pd, "
         "(select count(*) from features) f, (select count(distinct pair_id) from features) fd, "
         "(select count(*) from quarantine) q, (select count(distinct pair_id) from quarantine) qd")
    r = subprocess.run(img_cmd("sql", "--lake", lake, "--json", q), env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]
