"""Scorers: the open_clip -> transformers conversion against an independent open_clip forward, the tiny
scorers of the real classes, and offline resolution that fails fast naming the variable to set."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from img.eval import scorers as sc
from img.eval.scorers import (
    HPS_FILES,
    ScorerNotFound,
    load_scorer,
    open_clip_to_transformers,
    random_open_clip_state,
    resolve_scorers,
    tiny_scorer_root,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# open_clip's key names for a ViT CLIP with one block per tower (open_clip.model.CLIP, default text tower)
OPEN_CLIP_KEYS_ONE_LAYER = {
    "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
    "ln_final.bias", "visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
    "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
    *(f"{tower}transformer.resblocks.0.{k}" for tower in ("", "visual.") for k in (
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")),
}


def _config(layers=2, eos=2):
    text = dict(vocab_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                max_position_embeddings=12, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0,
                eos_token_id=eos, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


# ----------------------------------------------------------------------------- an independent open_clip forward
def _block(x, sd, p, heads, mask):
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], 1e-5).transpose(0, 1)
    a, _ = F.multi_head_attention_forward(h, h, h, w, heads, sd[f"{p}.attn.in_proj_weight"],
                                          sd[f"{p}.attn.in_proj_bias"], None, None, False, 0.0,
                                          sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"],
                                          training=False, need_weights=False, attn_mask=mask)
    x = x + a.transpose(0, 1)
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], 1e-5)
    return x + F.linear(F.gelu(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])),
                        sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])


def _oc_text(sd, ids, eot, heads, layers):
    """open_clip ``CLIP.encode_text``: causal transformer, ln_final, features at the eot token @ text_projection."""
    n = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu_(1)
    for i in range(layers):
        x = _block(x, sd, f"transformer.resblocks.{i}", heads, mask)
    x = F.layer_norm(x, (x.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(x.shape[0]), eot] @ sd["text_projection"]


def _oc_image(sd, pixels, patch, heads, layers):
    """open_clip ``VisionTransformer``: conv patches, class token, ln_pre, blocks, ln_post(CLS) @ proj."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (x.shape[-1],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(layers):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", heads, None)
    x = F.layer_norm(x[:, 0], (x.shape[-1],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return x @ sd["visual.proj"]


def test_random_state_has_open_clip_key_names():
    assert set(random_open_clip_state(_config(layers=1))) == OPEN_CLIP_KEYS_ONE_LAYER


def test_conversion_matches_open_clip_forward():
    cfg = _config()
    sd = random_open_clip_state(cfg, seed=3)
    model = CLIPModel(cfg).eval()
    ddp = {"module." + k: v for k, v in sd.items()}  # a DDP prefix is stripped
    model.load_state_dict(open_clip_to_transformers(ddp), strict=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 39, (3, 12), generator=g)
    eot = torch.tensor([5, 11, 2])
    for row, e in enumerate(eot):  # eot is the largest id (as in CLIP's BPE); zeros after it, as open_clip pads
        ids[row, e] = 39
        ids[row, e + 1:] = 0
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        want_t = _oc_text(sd, ids, eot, heads=4, layers=2)
        want_i = _oc_image(sd, pixels, patch=8, heads=4, layers=2)
        got_t = sc._features(model.get_text_features(input_ids=ids))
        got_i = sc._features(model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(got_t, want_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_i, want_i, rtol=1e-4, atol=1e-5)
    assert float(model.logit_scale.detach()) == pytest.approx(float(sd["logit_scale"]))


def test_conversion_rejects_other_layouts():
    sd = random_open_clip_state(_config(layers=1))
    with pytest.raises(KeyError, match="unexpected"):
        open_clip_to_transformers({**sd, "visual.attn_pool.query": torch.zeros(1)})
    del sd["visual.proj"]
    with pytest.raises(KeyError):
        open_clip_to_transformers(sd)


# ----------------------------------------------------------------------------- tiny scorers (real classes)
@pytest.fixture(scope="module")
def tiny_root():
    return tiny_scorer_root()


def _images(k=3):
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(k)]


def test_tiny_pickscore_is_logit_scale_times_cosine(tiny_root):
    spec = next(s for s in resolve_scorers(["tiny"]) if s.name == "pickscore")
    scorer = load_scorer(spec)
    assert type(scorer.model) is CLIPModel
    ims = _images()
    got = scorer.score(["a red circle"], [ims])[0]
    inputs = scorer.tokenizer(["a red circle"], padding=True, return_tensors="pt")
    pixels = scorer.image_processor(images=ims, return_tensors="pt").pixel_values
    with torch.no_grad():
        want = scorer.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                            pixel_values=pixels).logits_per_image[:, 0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    # batching units does not change a unit's scores
    two = scorer.score(["a red circle", "two blue squares above a green star"], [ims, ims[:1]])
    np.testing.assert_allclose(two[0], got, rtol=1e-4)
    assert len(two[1]) == 1


def test_tiny_hpsv2_is_the_cosine_of_the_open_clip_checkpoint(tiny_root):
    spec = next(s for s in resolve_scorers(["tiny"]) if s.name == "hpsv2")
    assert spec.weights.endswith(HPS_FILES["v2.1"])
    scorer = load_scorer(spec)
    ims = _images(2)
    got = scorer.score(["three yellow triangles"], [ims])[0]
    sd = torch.load(spec.weights, weights_only=True)["state_dict"]
    tok = scorer.tokenizer(["three yellow triangles"], return_tensors="pt")
    eot = (tok.input_ids == scorer.tokenizer.eos_token_id).int().argmax(-1)
    pixels = scorer.image_processor(images=ims, return_tensors="pt").pixel_values
    cfg = scorer.model.config
    with torch.no_grad():
        t = F.normalize(_oc_text(sd, tok.input_ids, eot, cfg.text_config.num_attention_heads,
                                 cfg.text_config.num_hidden_layers), dim=-1)
        i = F.normalize(_oc_image(sd, pixels, cfg.vision_config.patch_size, cfg.vision_config.num_attention_heads,
                                  cfg.vision_config.num_hidden_layers), dim=-1)
    np.testing.assert_allclose(got, (i @ t.T)[:, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert all(-1 <= s <= 1 for s in got)


def test_real_scorer_paths_with_tiny_files(tiny_root, monkeypatch):
    """PickScore and both HPS versions through their real resolution (env vars), on files in the published layout."""
    monkeypatch.setenv("IMG_PICKSCORE", str(tiny_root / "pickscore"))
    monkeypatch.setenv("IMG_CLIP_VIT_H14", str(tiny_root / "clip_vit_h14"))
    monkeypatch.setenv("IMG_HPSV2", str(tiny_root / "hpsv2"))
    specs = resolve_scorers(["pickscore", "hpsv2", "hpsv2.0", "hpsv2.1"])
    assert [(s.name, s.version) for s in specs] == [("pickscore", "v1"), ("hpsv2", "v2.1"), ("hpsv2", "v2.0")]
    ims = _images(1)
    v21, v20 = (load_scorer(s).score(["a red circle"], [ims])[0][0] for s in specs[1:])
    assert v21 != v20  # different checkpoints
    monkeypatch.setenv("IMG_HPSV2", str(tiny_root / "hpsv2" / HPS_FILES["v2.0"]))
    with pytest.raises(ScorerNotFound, match="HPS v2.1 is HPS_v2.1_compressed.pt"):
        resolve_scorers(["hpsv2"])
    assert resolve_scorers(["hpsv2.0"])[0].version == "v2.0"


def test_missing_scorer_fails_fast_naming_the_variable(tmp_path, monkeypatch):
    for var in ("IMG_PICKSCORE", "IMG_CLIP_VIT_H14", "IMG_HPSV2"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for name, var in (("pickscore", "IMG_PICKSCORE"), ("hpsv2", "IMG_HPSV2"), ("hpsv2.0", "IMG_HPSV2")):
        t0 = time.perf_counter()
        with pytest.raises(ScorerNotFound, match=var) as e:
            resolve_scorers([name])
        assert time.perf_counter() - t0 < 1.0
        assert "\n" not in str(e.value)
    monkeypatch.setenv("IMG_PICKSCORE", str(tmp_path / "nope"))
    with pytest.raises(ScorerNotFound, match="IMG_PICKSCORE='.*nope' does not exist"):
        resolve_scorers(["pickscore"])
    with pytest.raises(Exception, match="not one of"):
        resolve_scorers(["clipscore"])


@pytest.mark.slow
def test_cli_missing_scorer_is_one_line_exit_2_without_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMG_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    (tmp_path / "p.txt").write_text("a red circle\n")
    r = subprocess.run([sys.executable, "-m", "img.cli", "jobs", "eval", "--profile", "tiny", "--scorer", "pickscore",
                        "--prompts", str(tmp_path / "p.txt"), "--n", "1", "--lake", str(tmp_path / "lake")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "IMG_PICKSCORE" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "lake").exists()
    probe = ("import sys; from img.eval.scorers import resolve_scorers\n"
             "try:\n    resolve_scorers(['hpsv2'])\nexcept Exception:\n    pass\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "False"  # resolution imports no torch, so it fails in well under a second
