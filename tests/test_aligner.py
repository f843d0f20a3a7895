"""Implicit Aligner: released key layout, parameter counts, identity at init, masking, persistence."""
from __future__ import annotations

import re

import pytest
import torch

from img.aligner import AlignerConfig, ImplicitAligner, load_official_checkpoint, param_count
from img.errors import UserError

TINY = AlignerConfig(dim=32, depth=2, dim_head=8, heads=4, guidance_dim=24, output_dim=32, ff_mult=4)


def _random_model(cfg: AlignerConfig = TINY, seed: int = 0) -> ImplicitAligner:
    torch.manual_seed(seed)
    m = ImplicitAligner(cfg)
    with torch.no_grad():
        for p in m.parameters():  # make the head non-zero so the network is not the identity
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_param_counts_on_meta_device():
    with torch.device("meta"):
        sdxl = ImplicitAligner(AlignerConfig())
        flux = ImplicitAligner(AlignerConfig(dim=4096, output_dim=4096, guidance_dim=5120))
    assert param_count(sdxl) == 195_094_528
    assert param_count(flux) == 675_401_728


def test_key_layout_matches_release():
    with torch.device("meta"):
        keys = set(ImplicitAligner(AlignerConfig()).state_dict())
    expected = {f"{m}.{p}" for m in ("proj_in", "proj_out", "norm_out", "zero_linear") for p in ("weight", "bias")}
    for i in range(4):
        expected |= {f"layers.{i}.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
        expected |= {f"layers.{i}.0.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
        expected |= {f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias",
                     f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"}
    assert keys == expected
    with torch.device("meta"):
        sd = ImplicitAligner(AlignerConfig()).state_dict()
    assert tuple(sd["layers.0.0.to_kv.weight"].shape) == (2560, 2048)
    assert tuple(sd["layers.0.0.to_out.weight"].shape) == (2048, 1280)
    assert tuple(sd["proj_in.weight"].shape) == (2048, 5120)


def test_identity_at_init_for_any_number_of_passes():
    torch.manual_seed(0)
    m = ImplicitAligner(TINY)
    assert torch.count_nonzero(m.zero_linear.weight) == 0 and torch.count_nonzero(m.zero_linear.bias) == 0
    h, c = torch.randn(3, 7, 24), torch.randn(3, 5, 32)
    assert torch.equal(m(h, c), c)
    assert torch.equal(m.align(h, c, passes=3), c)
    assert m.align(h, c, passes=0) is c


def test_align_applies_forward_repeatedly():
    m = _random_model()
    h, c = torch.randn(2, 6, 24), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(m.align(h, c, passes=2), m(h, m(h, c)))
        assert not torch.allclose(m(h, c), c)


def test_padded_batch_equals_per_sample_forward():
    m = _random_model()
    torch.manual_seed(1)
    lens = [7, 3, 5, 1]
    gs = [torch.randn(n, 24) for n in lens]
    c = torch.randn(len(lens), 5, 32)
    L = max(lens)
    padded = torch.full((len(lens), L, 24), 123.0)  # garbage in the padding must not leak
    mask = torch.zeros(len(lens), L, dtype=torch.bool)
    for i, g in enumerate(gs):
        padded[i, : len(g)] = g
        mask[i, : len(g)] = True
    with torch.no_grad():
        batched = m.align(padded, c, passes=3, guidance_mask=mask)
        for i, g in enumerate(gs):
            single = m.align(g[None], c[i : i + 1], passes=3)
            assert torch.allclose(batched[i], single[0], atol=1e-5, rtol=0), i
        unmasked = m(padded, c)
    assert not torch.allclose(unmasked, batched, atol=1e-3)


def test_empty_guidance_runs():
    m = _random_model()
    c = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = m(torch.zeros(2, 0, 24), c, torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == c.shape and torch.isfinite(out).all()


def test_softmax_in_fp32_keeps_bf16_close():
    m = _random_model()
    h, c = torch.randn(2, 6, 24), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = m(h, c)
        out = m.to(torch.bfloat16)(h.bfloat16(), c.bfloat16()).float()
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("fmt", ["dict", ".pth", ".safetensors"])
def test_load_official_checkpoint(tmp_path, prefix, fmt):
    from safetensors.torch import save_file

    src = _random_model(seed=3)
    sd = {prefix + k: v.clone() for k, v in src.state_dict().items()}
    if fmt == "dict":
        arg = sd
    elif fmt == ".pth":
        arg = tmp_path / "aligner.pth"
        torch.save(sd, arg)
    else:
        arg = tmp_path / "aligner.safetensors"
        save_file(sd, str(arg))
    loaded = load_official_checkpoint(arg, TINY)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_official_checkpoint_errors_name_keys():
    sd = _random_model().state_dict()
    bad = dict(sd)
    del bad["layers.1.0.to_q.weight"]
    bad["layers.9.0.to_q.weight"] = torch.zeros(1)
    bad["proj_in.weight"] = torch.zeros(32, 25)
    with pytest.raises(UserError) as e:
        load_official_checkpoint(bad, TINY)
    msg = str(e.value)
    assert "missing keys: layers.1.0.to_q.weight" in msg
    assert "unexpected keys: layers.9.0.to_q.weight" in msg
    assert re.search(r"proj_in.weight: checkpoint \(32, 25\) vs model \(32, 24\)", msg)
    with pytest.raises(UserError, match="does not exist"):
        load_official_checkpoint("/nonexistent/x.pth", TINY)


def test_save_pretrained_round_trip(tmp_path):
    src = _random_model(seed=5)
    out = src.save_pretrained(tmp_path / "aligner")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    back = ImplicitAligner.from_pretrained(out)
    assert back.config == TINY
    h, c = torch.randn(2, 4, 24), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(back(h, c), src(h, c))
    with pytest.raises(UserError, match="not an aligner folder"):
        ImplicitAligner.from_pretrained(tmp_path)
