"""`img bench loader --small --json`: real figures from a real table and memmap file."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from img.cli import app


def test_bench_loader_small_prints_figures(tmp_path):
    result = CliRunner().invoke(app, ["bench", "loader", "--small", "--json", "--rows", "48",
                                      "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["loader_samples_per_s"] > 0 and out["raw_samples_per_s"] > 0
    assert abs(out["ratio"] - out["loader_samples_per_s"] / out["raw_samples_per_s"]) < 0.01
    assert out["samples_per_pass"] == 48 and out["batch_size"] == 8
    assert out["row_bytes"] == 64 * 512 * 2 + 2 * 16 * 256 * 2
    assert 0.95 < out["disk_bytes_ratio"] < 1.2  # blobs are stored raw, no padding
    assert set(out["variants"]) == {"take_blobs", "read_blobs_api", "workers0", "workers1", "workers4", "pad_fp32",
                                    "fp8", "fp8_pad_fp32", "fp8_kept"}
    assert out["blob_api"] == "mmap" and "np.memmap" in out["raw"]
    assert out["fp8_disk_bytes_ratio"] < 0.7 * out["disk_bytes_ratio"]  # 1 byte per guidance value + scales
    assert out["raw_into_samples_per_s"] > 0 and out["ratio_vs_memcpy"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary table is removed


def test_bench_loader_rejects_tiny_row_count():
    result = CliRunner().invoke(app, ["bench", "loader", "--rows", "3"])
    assert result.exit_code != 0 and "--rows must be >= 8" in str(result.exception)
