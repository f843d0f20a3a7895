"""Test helper: another process that holds a lake's writer lock until told to let go (or is killed)."""
from __future__ import annotations

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
