"""Shared feature code (IP tokens, MLLM guidance, text guidance) and the question pool, on the tiny profile."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import img.data.shapes_world as sw
from img.models.profiles import get_profile
from img.questions import QUESTIONS, question_for, question_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def profile():
    return get_profile("tiny")


@pytest.fixture(scope="module")
def ip(profile):
    from img.features import IPTokenEncoder

    return IPTokenEncoder(profile)


@pytest.fixture(scope="module")
def mllm(profile):
    from img.features import GuidanceEncoder

    return GuidanceEncoder(profile)


@pytest.fixture(scope="module")
def sdxl_pipe(profile):
    from img.models.loading import load_sdxl_pipeline

    return load_sdxl_pipeline(profile)


@pytest.fixture(scope="module")
def scenes():
    """Six shapes-world images (128 px, like the sample) with their captions."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        scene = sw.sample_scene(rng, groups=1 + i % 2)
        out.append((sw.render(scene, rng, background=sw.sample_background(rng)), scene.caption()))
    return out


# ---------------------------------------------------------------- questions
def test_question_pool_is_large_distinct_and_deterministic():
    assert len(QUESTIONS) >= 100 and len(set(QUESTIONS)) == len(QUESTIONS)
    assert all(q.count("{caption}") == 1 and q.endswith("?") for q in QUESTIONS)
    q = question_for("a red circle", key="pair-7", seed=0)
    assert "a red circle" in q and q == question_for("a red circle", key="pair-7", seed=0)
    picks = {question_index(f"pair-{i}", 0) for i in range(1000)}
    assert len(picks) > 90  # keys spread over the pool
    assert sum(question_index(f"pair-{i}", 0) != question_index(f"pair-{i}", 1) for i in range(100)) > 90


@pytest.mark.slow
def test_question_pick_does_not_depend_on_python_hash_seed():
    code = "from img.questions import question_index as q; print([q(f'k{i}', 3) for i in range(20)])"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and outs.pop().strip() == str([question_index(f"k{i}", 3) for i in range(20)])


# ---------------------------------------------------------------- IP tokens
def test_ip_tokens_shape_dtype_and_determinism(ip, profile, scenes):
    images = [im for im, _ in scenes]
    t = ip(images)
    d = profile.dims
    assert t.shape == (len(images), d.ip_tokens, d.ip_dim) and t.device.type == "cpu"
    assert torch.equal(t, ip(images))
    from img.features import IPTokenEncoder

    assert torch.equal(t, IPTokenEncoder(profile)(images))  # a fresh load gives the same tokens
    assert torch.allclose(ip(images[:1])[0], t[0], atol=1e-5)  # batch-independent
    assert ip([]).shape == (0, d.ip_tokens, d.ip_dim)


def test_ip_tokens_of_different_images_differ(ip, scenes):
    t = ip([im for im, _ in scenes]).flatten(1)
    dist = torch.cdist(t, t)
    off = dist[~torch.eye(len(t), dtype=torch.bool)]
    assert off.min() > 1.0  # every pair of different scenes is clearly apart (token norm ~ sqrt(N*D))
    # One element changed (same layout and background): colour and count breaks move the tokens far more
    # than re-rendering the same scene with another jitter.
    rng = np.random.default_rng(3)
    gaps = {"colour": [], "count": [], "jitter": []}
    for _ in range(5):
        scene = sw.sample_scene(rng, groups=2)
        bg = sw.sample_background(rng)
        layout = int(rng.integers(1 << 30))
        good = sw.render(scene, np.random.default_rng(layout), background=bg)
        other = sw.render(scene, np.random.default_rng(layout + 1), background=bg)
        col = sw.render(sw.break_scene(scene, "colour", rng), np.random.default_rng(layout), background=bg)
        cnt = sw.render(sw.break_scene(scene, "count", rng), np.random.default_rng(layout), background=bg)
        x = ip([good, col, cnt, other]).flatten(1)
        gaps["colour"].append((x[0] - x[1]).norm().item())
        gaps["count"].append((x[0] - x[2]).norm().item())
        gaps["jitter"].append((x[0] - x[3]).norm().item())
    assert np.mean(gaps["colour"]) > 2 * np.mean(gaps["jitter"])
    assert np.mean(gaps["count"]) > 1.2 * np.mean(gaps["jitter"])


def test_unconditional_tokens_are_the_all_zeros_image(ip, profile, scenes):
    u = ip.unconditional()
    assert u.shape == (1, profile.dims.ip_tokens, profile.dims.ip_dim)
    size = ip.encoder.config.image_size
    assert torch.equal(u, ip.tokens_from_pixels(torch.zeros(1, 3, size, size)))
    assert (u - ip(scenes[0][:1])).abs().max() > 0.1


def test_resampler_equals_the_unet_projection_loaded_by_load_ip_adapter(ip, sdxl_pipe, scenes):
    """Our resampler (diffusers' conversion without a UNet) == the one pipe.load_ip_adapter put in the UNet."""
    pipe = sdxl_pipe
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    ours = ip.projection.state_dict()
    theirs = layer.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.inference_mode():
        pixels = ip.pixel_values([im for im, _ in scenes])
        hidden = ip.encoder(pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(layer(hidden), ip(([im for im, _ in scenes])), atol=1e-6)
        # the pipeline's own image encoding goes through the same image encoder weights
        assert torch.equal(pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2], hidden)


def test_resampler_original_format_roundtrip():
    """The tiny IP-Adapter file is in h94's original key layout; diffusers' converter inverts our writer."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from img.models.loading import ip_projection_from_state
    from img.models.tiny import resampler_to_original

    torch.manual_seed(0)
    ref = IPAdapterPlusImageProjection(embed_dims=32, output_dims=48, hidden_dims=128, depth=4, heads=2,
                                       num_queries=16)
    original = resampler_to_original(ref.state_dict())
    assert "layers.2.0.to_kv.weight" in original and "layers.2.1.1.weight" in original
    back = ip_projection_from_state(original, "plus")
    x = torch.randn(2, 17, 32)
    assert torch.equal(back(x), ref(x))


# ---------------------------------------------------------------- guidance
def test_guidance_prompt_is_the_profiles_llava_v0_conversation(mllm):
    from img.conversation import LLAVA_V0_SYSTEM

    q = question_for("a red circle", key="k", seed=0)
    assert mllm.template == "llava_v0" and mllm.image_mode == "pad"
    assert mllm.prompt(q) == f"{LLAVA_V0_SYSTEM}###Human: <image>\n{q}###Assistant:"


def test_guidance_shapes_lengths_and_full_sequence(mllm, profile, scenes):
    images = [im for im, _ in scenes]
    questions = [question_for(c, key=f"pair-{i}", seed=0) for i, (_, c) in enumerate(scenes)]
    out = mllm(images, questions)
    assert len(out) == len(images)
    batch = mllm.inputs(images, questions)
    n_image = (batch["input_ids"] == mllm.model.config.image_token_id).sum(1)
    for h, mask, ni in zip(out, batch["attention_mask"], n_image):
        assert h.shape == (int(mask.sum()), profile.dims.mllm_hidden)  # no padding in the output
        assert int(ni) == mllm.model.config.image_seq_length and h.shape[0] > ni  # image tokens + text
    # Longer question -> longer sequence, by exactly the extra tokens.
    short, long_ = "how should this image change?", "how should this image change to match: a red circle?"
    hs, hl = mllm(images[:2], [short, long_])
    extra = len(mllm.processor.tokenizer(long_).input_ids) - len(mllm.processor.tokenizer(short).input_ids)
    assert extra > 0 and hl.shape[0] - hs.shape[0] == extra


def test_guidance_batched_equals_per_sample_and_is_deterministic(mllm, scenes):
    images = [im for im, _ in scenes]
    questions = [question_for(c, key=f"pair-{i}", seed=1) for i, (_, c) in enumerate(scenes)]
    batched = mllm(images, questions)
    for im, q, h in zip(images, questions, batched):
        (single,) = mllm([im], [q])
        assert single.shape == h.shape
        assert (single - h).abs().max() < 1e-4
    again = mllm(images, questions)
    assert all(torch.equal(a, b) for a, b in zip(batched, again))
    # The image matters: same question, different images -> different guidance.
    a, b = mllm(images[:2], [questions[0]] * 2)
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3


def test_guidance_is_the_last_hidden_state_after_the_final_norm(mllm, scenes):
    images = [im for im, _ in scenes[:3]]
    questions = ["how should this image change?", "what is missing?", "how can the picture match: a red star?"]
    ours = mllm(images, questions)
    batch = mllm.inputs(images, questions)
    with torch.inference_mode():
        full = mllm.model(**batch, output_hidden_states=True).hidden_states[-1]
    for i, h in enumerate(ours):
        assert torch.allclose(h, full[i][batch["attention_mask"][i].bool()], atol=1e-6)


def test_guidance_rejects_mismatched_lists(mllm, scenes):
    with pytest.raises(ValueError, match="one question per image"):
        mllm([scenes[0][0]], ["a", "b"])
    assert mllm([], []) == []


# ---------------------------------------------------------------- text guidance
def test_text_guidance_shapes_and_determinism(profile, scenes, sdxl_pipe):
    from img.features import TextGuidanceEncoder

    enc = TextGuidanceEncoder(profile)
    assert [type(e).__name__ for _, e in enc.encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    captions = [c for _, c in scenes]
    assert len(set(captions)) == len(captions)
    out = enc(captions)
    assert len(out) == len(captions)
    assert all(t.shape == (77, profile.text_guidance_dim()) for t in out)
    assert all(torch.equal(a, b) for a, b in zip(out, enc(captions)))
    assert (out[0] - out[1]).abs().max() > 1e-3
    # exactly the prompt embeddings StableDiffusionXLPipeline.encode_prompt gives the UNet
    with torch.inference_mode():
        embeds = sdxl_pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.allclose(torch.stack(out), embeds, atol=1e-6)


def test_text_guidance_is_sdxl_only():
    from img.errors import UserError

    with pytest.raises(UserError, match="SDXL"):
        get_profile("flux").text_guidance_dim()


def test_flux_style_ip_tokens_from_an_xlabs_format_file(tmp_path, profile, scenes):
    """The FLUX path: CLIP image_embeds -> XLabs linear projection (4 tokens), black-image negative."""
    import dataclasses

    from safetensors.torch import save_file

    from img.features import IPTokenEncoder
    from img.models.profiles import Dims, ModelRef

    embed_dim = IPTokenEncoder(profile).encoder.config.projection_dim
    n, d = 4, 48
    torch.manual_seed(0)
    save_file({"ip_adapter_proj_model.proj.weight": torch.randn(n * d, embed_dim) * 0.1,
               "ip_adapter_proj_model.proj.bias": torch.zeros(n * d),
               "ip_adapter_proj_model.norm.weight": torch.ones(d),
               "ip_adapter_proj_model.norm.bias": torch.zeros(d),
               "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(8, d)},
              str(tmp_path / "ip_adapter.safetensors"))
    flux_like = dataclasses.replace(
        profile, name="tiny-flux-ip", ip_kind="xlabs",
        ip_weights=ModelRef(str(tmp_path), filename="ip_adapter.safetensors"),
        dims=Dims(clip_hidden=profile.dims.clip_hidden, clip_tokens=profile.dims.clip_tokens, ip_tokens=n, ip_dim=d,
                  mllm_hidden=profile.dims.mllm_hidden, image_size=profile.dims.image_size))
    enc = IPTokenEncoder(flux_like)
    t = enc([im for im, _ in scenes[:3]])
    assert t.shape == (3, n, d) and type(enc.projection).__name__ == "ImageProjection"
    with torch.inference_mode():
        embeds = enc.encoder(enc.pixel_values([scenes[0][0]])).image_embeds
        assert torch.allclose(enc.projection(embeds), t[:1], atol=1e-6)
    from PIL import Image

    black = Image.new("RGB", (64, 64), (0, 0, 0))
    assert torch.equal(enc.unconditional(), enc([black]))
