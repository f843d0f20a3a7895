"""The tiny world is not blind: the tiny profile's IP tokens (and LLaVA's vision tower) see every kind of break.

For pairs drawn like the sample's (winner and loser each with its own layout jitter), the tokens of a faithful
image and a broken one must be further apart than two drawings of the same scene, for colour, shape, count and
relation alike. The random encoders the project used before failed this for relation (ratio about 1.1).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from img.data import shapes_world as sw
from img.features import IPTokenEncoder
from img.models.tiny import tiny_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def _pairs(kind: str, n: int = 24):
    good, bad, again = [], [], []
    for i in range(n):
        rng = np.random.default_rng([2024, sw.BROKEN_KINDS.index(kind), i])
        scene = sw.sample_scene(rng, groups=2 if kind == "relation" else None)
        broken = sw.break_scene(scene, kind, rng)
        bg = sw.sample_background(rng)
        good.append(sw.render(scene, np.random.default_rng([1, i]), background=bg))
        again.append(sw.render(scene, np.random.default_rng([2, i]), background=bg))
        bad.append(sw.render(broken, np.random.default_rng([3, i]), background=bg))
    return good, bad, again


def test_tokens_respond_to_every_kind_of_break():
    enc = IPTokenEncoder("tiny")
    for kind in sw.BROKEN_KINDS:
        good, bad, again = (enc(x) for x in _pairs(kind))
        d_break = (good - bad).pow(2).sum((1, 2)).mean().item()
        d_jitter = (good - again).pow(2).sum((1, 2)).mean().item()
        assert d_break > 2.0 * d_jitter, (kind, d_break, d_jitter)


def test_build_reports_pretraining_and_llava_shares_the_trained_tower():
    root = tiny_root("tiny")
    info = json.loads((root / "BUILD.json").read_text())
    report = info["pretrain"]
    assert report["method"] == "supervised scene reading" and report["seconds"] > 0 and info["build_seconds"] > 0
    acc = report["heldout_accuracy"]["tokens"]
    assert acc["a_colour"] > 0.95 and acc["relation"] > 0.95 and acc["a_count"] > 0.8 and acc["a_shape"] > 0.4, acc
    from safetensors.torch import load_file

    ip = load_file(str(root / "ip_adapter" / "models" / "image_encoder" / "model.safetensors"))
    llava = load_file(str(root / "llava" / "model.safetensors"))
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    mine = [k for k in llava if k.endswith(key.split("vision_model.", 1)[1]) and "vision_tower" in k]
    assert len(mine) == 1 and torch.equal(llava[mine[0]], ip[key])
