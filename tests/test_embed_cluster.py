"""The embed job on a separate Ray cluster reached through RAY_ADDRESS (the scale-out path, at small size)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import pytest

from img.data.sample import expected_counts, write_sample
from img.lake import tables as lake_mod
from img.net import free_port

pytestmark = pytest.mark.slow  # a Ray cluster started with `ray start --head`


def test_embed_through_ray_address(tmp_path):
    data, lake = str(tmp_path / "data"), str(tmp_path / "lake")
    write_sample(data, pairs=120, seed=3, corrupt=0.05, ties=0.1)
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    # A local test cluster without token auth; a production cluster propagates its token instead.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen([ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for the head's GCS port
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.5)
        time.sleep(2)
        r = subprocess.run([sys.executable, "-m", "img.cli", "jobs", "embed", "--dataset", "pickapic",
                            "--source", data, "--profile", "tiny", "--lake", lake],
                           env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"connecting to Ray cluster at 127.0.0.1:{port}" in r.stderr
        exp = expected_counts(120, corrupt=0.05, ties=0.1)
        pairs = lance.dataset(lake_mod.table_uri(lake, "pairs")).count_rows()
        quarantined = lance.dataset(lake_mod.table_uri(lake, "quarantine")).count_rows()
        assert (pairs, quarantined) == (exp["decisive"] - exp["corrupt"], exp["corrupt"])
    finally:
        # `ray start --block` takes ~33 s to exit on SIGTERM; this throwaway cluster's processes all stop on
        # SIGKILL (its temp folder is removed below, and Ray's plasma file in /dev/shm is already unlinked)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
