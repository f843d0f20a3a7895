"""`img bench train`: the analytic FLOP count matches torch's counter on a real step; the CLI's figures."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from img.aligner import AlignerConfig, ImplicitAligner
from img.app.bench_train import aligner_flops
from img.cli import app
from img.objective import iupo_loss, make_reference


def test_analytic_flops_match_torchs_counter_for_a_training_step():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = AlignerConfig(dim=64, depth=2, dim_head=8, heads=4, guidance_dim=96, output_dim=64, ff_mult=4)
    model, ref = ImplicitAligner(cfg), make_reference(cfg, seed=1)
    b, length, n = 3, 11, 5
    g = torch.randn(b, length, 96)
    w, lo = torch.randn(b, n, 64), torch.randn(b, n, 64)
    with FlopCounterMode(display=False) as counter:
        pred = model(g, lo)
        with torch.no_grad():
            ref_pred = ref(g, lo)
        loss, _ = iupo_loss(pred, ref_pred, w, lo)
        loss.backward()
    assert counter.get_total_flops() == b * aligner_flops(cfg, length, n)["total"]


def test_bench_train_rejects_bad_sizes():
    result = CliRunner().invoke(app, ["bench", "train", "--rows", "1"])
    assert result.exit_code != 0 and "--rows (1) must be at least one batch" in str(result.exception)


@pytest.mark.slow
def test_bench_train_runs_the_sdxl_aligner_at_real_size(tmp_path):
    result = CliRunner().invoke(app, ["bench", "train", "--json", "--steps", "1", "--warmup", "1", "--rows", "2",
                                      "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["aligner_params"] == 195_094_528 and (out["guidance_len"], out["guidance_dim"]) == (650, 5120)
    assert out["samples_per_s"] > 0 and 3 < out["peak_rss_gb"] < 12
    assert out["flops_per_sample"] == out["flops_per_sample_analytic"]
    assert abs(out["bytes_per_sample"] - 6_787_072) / 6_787_072 < 0.01
    assert list(tmp_path.iterdir()) == []
