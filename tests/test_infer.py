"""``img infer`` and ``IMGPipeline`` on tiny models of the real classes (CPU, 2 diffusion steps).

Covers: PNG + generations row per image, same seed -> same pixels, the initial image is exactly the base
model's, the regeneration depends on (and only on) the aligned tokens, aligner passes matter, plug-in on a
user-built pipeline, released-checkpoint loading, bad input -> one line / exit 2 / nothing written, and the
FLUX path on a tiny FluxPipeline + XLabs-format IP-Adapter built here.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from img.errors import UserError
from img.models.profiles import Dims, ModelRef, get_profile

STEPS = 2
PROMPT = "a red circle left of a blue star"


def px(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def tiny_pipe():
    from img.inference.generation import IMGPipeline

    return IMGPipeline.from_profile("tiny")


@pytest.fixture(scope="module")
def settings(tiny_pipe):
    return tiny_pipe.settings(steps=STEPS)


def perturbed_aligner(profile, seed: int = 0, scale: float = 0.5):
    """A non-trivial aligner: the zero-initialised head gets a seeded random init."""
    from img.aligner import ImplicitAligner

    g = torch.Generator().manual_seed(seed)
    model = ImplicitAligner(profile.aligner_config())
    with torch.no_grad():
        w = model.zero_linear.weight
        w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
        model.zero_linear.bias.copy_(torch.randn(model.zero_linear.bias.shape, generator=g) * 0.1)
    return model.eval()


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the real console entry point in-process; (exit code, stdout, stderr)."""
    from img.cli import main

    monkeypatch.setattr(sys, "argv", ["img", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out, err


# ----------------------------------------------------------------------------- the CLI end to end
def test_cli_writes_images_and_rows_deterministically(tmp_path, monkeypatch, capsys):
    import lance

    lake = tmp_path / "lake"
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        code, stdout, _ = run_main(["infer", "--profile", "tiny", "--prompt", PROMPT, "--seed", "3", "--rounds", "2",
                                    "--steps", str(STEPS), "--lake", str(lake), "--out", str(out)], monkeypatch, capsys)
        assert code == 0, stdout
        assert "3 image(s)" in stdout and "MLLM share" in stdout
    names = [f"0000-a-red-circle-left-of-a-blue-star-seed3-round{r}.png" for r in range(3)]
    for out in outs:
        assert sorted(p.name for p in out.iterdir()) == names  # no temp files left
    from PIL import Image

    a = [px(Image.open(outs[0] / n)) for n in names]
    b = [px(Image.open(outs[1] / n)) for n in names]
    assert all(x.shape == (64, 64, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed -> identical pixels
    assert not np.array_equal(a[0], a[1])  # the regeneration is a different image

    rows = lance.dataset(str(lake / "generations.lance")).to_table().to_pylist()
    assert len(rows) == 6 and len({r["run_id"] for r in rows}) == 2
    for out in outs:
        mine = sorted((r for r in rows if Path(r["path"]).parent == out), key=lambda r: r["round"])
        assert [r["round"] for r in mine] == [0, 1, 2]
        assert all(Path(r["path"]).is_file() for r in mine)
        assert all(r["prompt"] == PROMPT and r["seed"] == 3 and r["profile"] == "tiny" for r in mine)
        assert all(r["aligner_id"] == "fresh" and r["steps"] == STEPS and r["passes"] == 3 for r in mine)
        assert mine[0]["t_base_s"] > 0 and mine[0]["t_regen_s"] == 0 and mine[0]["question"] == ""
        assert all(r["t_regen_s"] > 0 and r["t_mllm_s"] > 0 and r["t_base_s"] == 0 for r in mine[1:])
        assert mine[1]["question"].endswith(f"{PROMPT}?") and mine[1]["ip_scale"] == pytest.approx(0.2)


def test_infer_uses_the_aligners_own_pass_count_unless_passes_is_given(tmp_path, monkeypatch, capsys):
    import dataclasses

    import lance

    from img.aligner import ImplicitAligner
    from img.models.profiles import get_profile

    trained = perturbed_aligner(get_profile("tiny"))
    one = ImplicitAligner(dataclasses.replace(trained.config, passes=1))
    one.load_state_dict(trained.state_dict())
    one.save_pretrained(tmp_path / "aligner")
    assert '"passes": 1' in (tmp_path / "aligner" / "config.json").read_text()
    lake = tmp_path / "lake"
    for extra, out in (([], "a"), (["--passes", "2"], "b")):
        code, stdout, _ = run_main(["infer", "--profile", "tiny", "--prompt", PROMPT, "--steps", str(STEPS),
                                    "--aligner", str(tmp_path / "aligner"), "--lake", str(lake),
                                    "--out", str(tmp_path / out), *extra], monkeypatch, capsys)
        assert code == 0, stdout
    rows = lance.dataset(str(lake / "generations.lance")).to_table().to_pylist()
    passes = {Path(r["path"]).parent.name: r["passes"] for r in rows if r["round"] == 1}
    assert passes == {"a": 1, "b": 2}


@pytest.mark.slow
def test_empty_prompt_fails_cleanly_as_a_process(tmp_path, repo_root):
    out, lake = tmp_path / "D", tmp_path / "L"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "img.cli", "infer", "--profile", "tiny", "--prompt", "", "--seed", "3",
         "--rounds", "2", "--lake", str(lake), "--out", str(out)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--prompt is empty" in lines[0], proc.stderr
    assert not out.exists() and not lake.exists()


@pytest.mark.parametrize("case", ["unknown-profile", "bad-aligner-dims", "out-is-a-file", "out-under-a-file",
                                  "real-profile-needs-aligner", "blank-prompts-file", "bad-steps",
                                  "old-generations-table"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    from img.aligner import AlignerConfig, ImplicitAligner

    out, lake = tmp_path / "out", tmp_path / "lake"
    args = ["infer", "--profile", "tiny", "--prompt", PROMPT, "--steps", "2", "--lake", str(lake), "--out", str(out)]
    expect = ""
    if case == "unknown-profile":
        args[2], expect = "sdxl-nope", "unknown profile 'sdxl-nope'"
    elif case == "bad-aligner-dims":
        wrong = get_profile("tiny").aligner_config()
        wrong = AlignerConfig(**{**wrong.to_dict(), "guidance_dim": wrong.guidance_dim * 2})
        ImplicitAligner(wrong).save_pretrained(tmp_path / "wrong")
        args += ["--aligner", str(tmp_path / "wrong")]
        expect = "guidance width 128, but profile 'tiny' needs"
    elif case == "out-is-a-file":
        out.write_text("x")
        expect = "is not a folder"
    elif case == "out-under-a-file":
        (tmp_path / "f").write_text("x")
        args[-1] = str(tmp_path / "f" / "sub")
        expect = "is not writable"
    elif case == "real-profile-needs-aligner":
        args[2], expect = "sdxl", "needs a trained aligner: pass --aligner"
    elif case == "blank-prompts-file":
        (tmp_path / "p.txt").write_text("\n   \n")
        args[3:5] = ["--prompts", str(tmp_path / "p.txt")]
        expect = "has no non-empty prompt"
    elif case == "bad-steps":
        args[6] = "0"
        expect = "--steps must be >= 1, got 0"
    elif case == "old-generations-table":
        import lance
        import pyarrow as pa

        lance.write_dataset(pa.table({"prompt": ["x"]}), str(lake / "generations.lance"))
        expect = "has generations schema v0, this img writes v2"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run_main(args, monkeypatch, capsys)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("[", " "))]
    err_lines = [ln for ln in lines if ln.startswith("error:")]
    assert code == 2 and len(err_lines) == 1 and expect in err_lines[0], stderr
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created: no out, no lake


# ----------------------------------------------------------------------------- the pipeline
def test_initial_image_is_exactly_the_base_model(tiny_pipe, settings):
    from img.models.loading import load_sdxl_pipeline

    base = load_sdxl_pipeline(tiny_pipe.profile, ip_adapter=False)
    ref = base(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(px(tiny_pipe.generate_base(PROMPT, 5, settings)), px(ref))


def test_regeneration_depends_on_the_aligned_tokens(tiny_pipe, settings):
    d = tiny_pipe.profile.dims
    g = torch.Generator().manual_seed(0)
    tokens = tiny_pipe.image_tokens(tiny_pipe.generate_base(PROMPT, 1, settings))
    assert tokens.shape == (1, d.ip_tokens, d.ip_dim)
    other = tokens + torch.randn(tokens.shape, generator=g)
    first = px(tiny_pipe.regenerate(PROMPT, tokens, 1, settings))
    again = px(tiny_pipe.regenerate(PROMPT, tokens.clone(), 1, settings))
    changed = px(tiny_pipe.regenerate(PROMPT, other, 1, settings))
    assert np.array_equal(first, again)  # same tokens -> same pixels
    assert np.abs(first - changed).mean() > 0.5  # different tokens -> different pixels
    # IP scale 0 removes the tokens' influence: both token sets give the same image
    off = dataclasses.replace(settings, ip_scale=0.0)
    assert np.array_equal(px(tiny_pipe.regenerate(PROMPT, tokens, 1, off)),
                          px(tiny_pipe.regenerate(PROMPT, other, 1, off)))


def test_fresh_aligner_is_identity_and_passes_matter_for_a_trained_one(tiny_pipe, settings):
    image = tiny_pipe.generate_base(PROMPT, 2, settings)
    tokens = tiny_pipe.image_tokens(image)
    h = tiny_pipe.guidance(image, tiny_pipe.question(PROMPT, 2))
    assert h.ndim == 3 and h.shape[0] == 1 and h.shape[2] == tiny_pipe.profile.dims.mllm_hidden
    assert tiny_pipe.aligner_id == "fresh"
    assert torch.equal(tiny_pipe.align(h, tokens, 3), tokens.float())  # zero-init head: exactly the identity

    fresh = tiny_pipe.aligner
    tiny_pipe.aligner = perturbed_aligner(tiny_pipe.profile)
    try:
        zero, three = tiny_pipe.align(h, tokens, 0), tiny_pipe.align(h, tokens, 3)
        assert torch.equal(zero, tokens.float())
        assert (three - zero).abs().mean() > 1e-3
        assert not torch.equal(tiny_pipe.align(h, tokens, 1), three)
        img0 = px(tiny_pipe.regenerate(PROMPT, zero, 2, settings))
        img3 = px(tiny_pipe.regenerate(PROMPT, three, 2, settings))
        assert not np.array_equal(img0, img3)
        r0 = tiny_pipe(PROMPT, seed=2, rounds=1, steps=STEPS, passes=0)
        assert np.array_equal(px(r0.initial), px(image)) and np.array_equal(px(r0.images[1]), img0)
    finally:
        tiny_pipe.aligner = fresh


def test_rounds_analyse_the_latest_image_and_report_timings(tiny_pipe):
    calls: list[tuple[str, int, int]] = []
    result = tiny_pipe(PROMPT, seed=4, rounds=2, steps=STEPS, on_step=lambda *a: calls.append(a))
    assert len(result.images) == 3 and [r.round for r in result.rounds] == [1, 2]
    assert len(calls) == STEPS * 3 and calls[0] == ("base", 1, STEPS) and calls[-1] == ("regen", STEPS, STEPS)
    # round 2 analyses round 1's image, not the initial one
    assert torch.equal(result.rounds[1].tokens, tiny_pipe.image_tokens(result.rounds[0].image))
    t = result.timings()
    assert set(t) == {"base", "ip", "mllm", "aligner", "regen", "total"} and all(v > 0 for v in t.values())
    assert tiny_pipe(PROMPT, seed=4, rounds=0, steps=STEPS).images[0].size == (64, 64)
    with pytest.raises(UserError, match="empty"):
        tiny_pipe("  ", seed=0)


def test_plugs_into_a_pipeline_the_user_built(tiny_pipe, settings):
    """The user loads the pipeline (here with its IP-Adapter and image encoder already in); IMG wraps it."""
    from img.inference.generation import IMGPipeline
    from img.models.loading import load_sdxl_pipeline

    user_pipe = load_sdxl_pipeline(tiny_pipe.profile, ip_adapter=True)
    original = user_pipe.unet.encoder_hid_proj.image_projection_layers[0]
    img_pipe = IMGPipeline(user_pipe, tiny_pipe.ip_encoder, tiny_pipe.guidance_encoder,
                           perturbed_aligner(tiny_pipe.profile), tiny_pipe.profile)
    assert isinstance(user_pipe.unet.encoder_hid_proj.image_projection_layers[0], torch.nn.Identity)
    assert img_pipe.aligner_id.startswith("sha256:")
    result = img_pipe(PROMPT, seed=6, rounds=1, steps=STEPS)
    # same base image as the profile's own pipeline, and the same regeneration for the same tokens
    assert np.array_equal(px(result.initial), px(tiny_pipe.generate_base(PROMPT, 6, settings)))
    aligned = result.rounds[0].aligned
    assert np.array_equal(px(result.images[1]), px(tiny_pipe.regenerate(PROMPT, aligned, 6, settings)))
    with pytest.raises(UserError, match="already wrapped"):
        IMGPipeline(user_pipe, tiny_pipe.ip_encoder, tiny_pipe.guidance_encoder, img_pipe.aligner, tiny_pipe.profile)
    assert img_pipe.unwrap() is user_pipe
    assert user_pipe.unet.encoder_hid_proj.image_projection_layers[0] is original

    # an IP-Adapter projection that is not the profile's would put the tokens in another space
    with torch.no_grad():
        for p in original.parameters():
            p.add_(1.0)
    with pytest.raises(UserError, match="projection differs"):
        IMGPipeline(user_pipe, tiny_pipe.ip_encoder, tiny_pipe.guidance_encoder, img_pipe.aligner, tiny_pipe.profile)


def test_released_checkpoint_layouts_load(tmp_path):
    from img.inference.generation import load_aligner, weights_id

    prof = get_profile("tiny")
    model = perturbed_aligner(prof, seed=3)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP prefix, as released
    (tmp_path / "ckpts").mkdir()
    torch.save(state, tmp_path / "ckpts" / "aligner_sdxl.pth")
    model.save_pretrained(tmp_path / "run" / "aligner")
    for source in (tmp_path / "ckpts", tmp_path / "ckpts" / "aligner_sdxl.pth", tmp_path / "run" / "aligner"):
        loaded, aid = load_aligner(prof, source)
        assert aid == weights_id(model) and aid.startswith("sha256:")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    fresh, aid = load_aligner(prof, None, seed=1)
    assert aid == "fresh" and torch.count_nonzero(fresh.zero_linear.weight) == 0
    with pytest.raises(UserError, match="aligner_sdxl.pth"):
        load_aligner(prof, tmp_path / "run")  # neither config.json nor aligner_sdxl.pth
    with pytest.raises(UserError, match="needs a trained aligner"):
        load_aligner(get_profile("flux"), None)


def test_released_resampler_is_used_for_c_I_only_when_it_differs(tiny_pipe, settings, tmp_path):
    """The demo makes c_I with resampler.pth and the negative tokens with the IP-Adapter file's resampler."""
    from img.features import IPTokenEncoder
    from img.inference.generation import IMGPipeline, load_resampler
    from img.models.loading import load_sdxl_pipeline
    from img.models.tiny import resampler_to_original

    prof = tiny_pipe.profile
    ip = IPTokenEncoder(prof)
    released = {f"module.{k}": v.clone() for k, v in resampler_to_original(ip.projection.state_dict()).items()}
    torch.save(released, tmp_path / "resampler.pth")
    same = load_resampler(tmp_path / "resampler.pth")
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), ip.projection.state_dict().values()))

    pipe = IMGPipeline(load_sdxl_pipeline(prof, ip_adapter=False), ip, tiny_pipe.guidance_encoder,
                       tiny_pipe.aligner, prof, aligner_id="fresh")
    image = tiny_pipe.generate_base(PROMPT, 7, settings)
    before, uncond = pipe.image_tokens(image), pipe.ip_encoder.unconditional()
    assert pipe.use_released_resampler(tmp_path / "resampler.pth") is False and pipe.aligner_id == "fresh"

    g = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in released.items()},
               tmp_path / "resampler.pth")
    assert pipe.use_released_resampler(tmp_path / "resampler.pth") is True
    assert pipe.aligner_id.startswith("fresh+resampler-")
    assert not torch.equal(pipe.image_tokens(image), before)  # c_I from resampler.pth
    assert torch.equal(pipe.unconditional_tokens(), uncond)  # negatives from the IP-Adapter's resampler
    torch.save({"proj_in.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="bad.pth"):
        pipe.use_released_resampler(tmp_path / "bad.pth")


def test_image_names_are_deterministic_and_safe():
    from img.inference.infer import image_name, read_prompts

    assert image_name(7, "A cat, on a MAT!", 3, 1) == "0007-a-cat-on-a-mat-seed3-round1.png"
    assert image_name(0, "日本", 0, 0) == "0000-prompt-seed0-round0.png"
    assert len(image_name(0, "x" * 500, 0, 0)) < 80
    assert read_prompts(" a red circle ", None) == ["a red circle"]
    with pytest.raises(UserError, match="exactly one"):
        read_prompts(None, None)


# ----------------------------------------------------------------------------- FLUX
def build_tiny_flux(root: Path) -> None:
    """A tiny FluxPipeline (diffusers' test recipe), a CLIP vision tower, and XLabs-format IP-Adapter weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from img.models.tiny import build_clip_tokenizer, build_llava_tokenizer, vocabulary_words

    words = vocabulary_words()
    tok, tok2 = build_clip_tokenizer(words), build_llava_tokenizer(words)
    d, inner = 32, 32  # joint_attention_dim (= IP token width D), heads x head dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=d, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        te = CLIPTextModel(CLIPTextConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tok), max_position_embeddings=77, projection_dim=32, hidden_act="gelu"))
        te2 = T5EncoderModel(T5Config(
            vocab_size=len(tok2), d_model=d, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
            decoder_start_token_id=0))
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=16))
        ip = {
            "ip_adapter_proj_model.proj.weight": torch.randn(4 * d, 16) * 0.2,  # 4 tokens, as XLabs
            "ip_adapter_proj_model.proj.bias": torch.zeros(4 * d),
            "ip_adapter_proj_model.norm.weight": torch.ones(d),
            "ip_adapter_proj_model.norm.bias": torch.zeros(d),
        }
        for kv in "kv":
            ip[f"double_blocks.0.processor.ip_adapter_double_stream_{kv}_proj.weight"] = torch.randn(inner, d) * 0.2
            ip[f"double_blocks.0.processor.ip_adapter_double_stream_{kv}_proj.bias"] = torch.zeros(inner)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                 text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer, image_encoder=None,
                 feature_extractor=None).save_pretrained(root / "flux", safe_serialization=True)
    enc.save_pretrained(root / "clip-vit-l", safe_serialization=True)
    (root / "xlabs").mkdir()
    save_file(ip, str(root / "xlabs" / "ip_adapter.safetensors"))


@pytest.fixture(scope="module")
def tiny_flux_profile(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux(root)
    return dataclasses.replace(
        get_profile("flux"), name="tiny-flux", base=ModelRef(str(root / "flux")),
        ip_encoder=ModelRef(str(root / "clip-vit-l")),
        ip_weights=ModelRef(str(root / "xlabs"), filename="ip_adapter.safetensors"),
        mllm=ModelRef("tiny:tiny/llava"),
        dims=Dims(clip_hidden=32, clip_tokens=17, ip_tokens=4, ip_dim=32, mllm_hidden=64, image_size=32),
        steps=STEPS, aligner_depth=1, aligner_heads=2, aligner_dim_head=16, tiny="tiny",
    )


def test_flux_path_end_to_end(tiny_flux_profile):
    from img.inference.generation import IMGPipeline
    from img.models.loading import load_flux_pipeline

    prof = tiny_flux_profile
    pipe = IMGPipeline.from_profile(prof, aligner=perturbed_aligner(prof))
    s = pipe.settings()
    assert (s.steps, s.guidance_scale, s.true_cfg_scale, s.ip_scale, s.passes) == (STEPS, 3.5, 3.5, 0.2, 3)
    result = pipe(PROMPT, seed=1, rounds=1)
    assert [im.size for im in result.images] == [(32, 32), (32, 32)]
    assert result.rounds[0].aligned.shape == (1, 4, 32)
    assert torch.equal(pipe.unconditional_tokens(), pipe.ip_encoder.unconditional())  # black image
    # the initial image is what FluxPipeline makes without an IP-Adapter, with the same (true) CFG
    base = load_flux_pipeline(prof, ip_adapter=False)
    ref = base(PROMPT, num_inference_steps=STEPS, guidance_scale=3.5, true_cfg_scale=3.5, negative_prompt="",
               height=32, width=32, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(px(result.initial), px(ref))
    # the regeneration depends on the tokens, and only on them
    t = result.rounds[0].aligned
    same = px(pipe.regenerate(PROMPT, t, 1, s))
    assert np.array_equal(same, px(result.images[1]))
    assert np.abs(same - px(pipe.regenerate(PROMPT, t + 1.0, 1, s))).mean() > 0.5
