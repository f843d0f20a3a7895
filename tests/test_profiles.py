"""Profiles, offline tiny models, and `img profile check` (real console script, offline)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from img.errors import UserError
from img.models.profiles import PROFILES, get_profile

REPO = Path(__file__).resolve().parent.parent
IMG = REPO / ".venv" / "bin" / "img"
CONFIGS = REPO / "img" / "models" / "configs"


def _img_cmd() -> list[str]:
    return [str(IMG)] if IMG.exists() else [sys.executable, "-m", "img.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus every IMG_* override, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMG_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


# ---------------------------------------------------------------- profiles
def test_get_profile_unknown_names_the_known_ones():
    with pytest.raises(UserError) as e:
        get_profile("sdxl-turbo")
    msg = str(e.value)
    assert "'sdxl-turbo'" in msg
    for name in ("tiny", "sdxl", "sdxl-dpo", "flux", "sdxl-qwen", "qwen"):
        assert name in msg


def test_profiles_names_dims_and_defaults():
    assert {"tiny", "bench", "sdxl", "sdxl-dpo", "flux", "sdxl-llava7b", "sdxl-qwen"} <= set(PROFILES)
    assert all(p.description for p in PROFILES.values())
    sdxl, flux = get_profile("sdxl"), get_profile("flux")
    assert (sdxl.dims.ip_tokens, sdxl.dims.ip_dim, sdxl.dims.mllm_hidden, sdxl.dims.clip_tokens) == (16, 2048, 5120, 257)
    assert (sdxl.steps, sdxl.guidance_scale, sdxl.ip_scale, sdxl.aligner_passes) == (50, 7.5, 0.2, 3)
    assert (flux.steps, flux.guidance_scale, flux.dims.ip_tokens, flux.dims.ip_dim) == (30, 3.5, 4, 4096)
    assert get_profile("qwen").name == "sdxl-qwen" and get_profile("qwen").dims.mllm_hidden == 3584
    assert get_profile("sdxl-llava7b").dims.mllm_hidden == 4096
    dpo = get_profile("sdxl-dpo")
    assert dpo.unet is not None and dpo.unet.repo == "mhdang/dpo-sdxl-text2image-v1" and dpo.unet.subfolder == "unet"
    assert dpo.aligner_config() == sdxl.aligner_config()  # the SDXL aligner is reused as is
    assert sdxl.ip_weights.filename == "ip-adapter-plus_sdxl_vit-h.safetensors"
    assert sdxl.ip_encoder.subfolder == "models/image_encoder"


def test_aligner_config_parameter_counts():
    import torch

    from img.aligner import ImplicitAligner, param_count

    a = get_profile("sdxl").aligner_config()
    assert (a.dim, a.depth, a.dim_head, a.heads, a.guidance_dim, a.output_dim, a.ff_mult) == (2048, 4, 64, 20, 5120, 2048, 4)
    with torch.device("meta"):
        assert param_count(ImplicitAligner(a)) == 195_094_528
        flux = ImplicitAligner(get_profile("flux").aligner_config())
        assert param_count(flux) == 675_401_728


def test_env_beats_toml_and_toml_unknown_key_is_an_error(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("IMG_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("IMG_PROFILES_DIR", str(tmp_path))
    (tmp_path / "sdxl.toml").write_text('mllm = "/data/llava"\nbase = "/data/sdxl"\ntensor_dtype = "float16"\n')
    p = get_profile("sdxl")
    assert (p.mllm.repo, p.base.repo, p.tensor_dtype) == ("/data/llava", "/data/sdxl", "float16")
    monkeypatch.setenv("IMG_LLAVA_13B", "/env/llava")
    p = get_profile("sdxl")
    assert p.mllm.repo == "/env/llava" and dict(p.sources)["mllm"] == "env IMG_LLAVA_13B"
    assert get_profile("flux").mllm.repo == "/env/llava"  # one variable per model, whichever profile uses it
    (tmp_path / "sdxl.toml").write_text('mlm = "/typo"\n')
    with pytest.raises(UserError, match="unknown config key 'mlm'"):
        get_profile("sdxl")


# ---------------------------------------------------------------- tiny models
def _race_spec():
    """The tiny flavour with a short pre-training: the same build code, a few seconds instead of minutes."""
    from img.models.tiny import FLAVOURS

    FLAVOURS.setdefault("race", dataclasses.replace(FLAVOURS["tiny"], flavour="race", pretrain_steps=20,
                                                    mllm_pretrain_steps=20))


def _build_in(cache: str, q) -> None:  # runs in a spawned process
    os.environ["IMG_CACHE"] = cache
    from img.models.tiny import tiny_root

    _race_spec()
    q.put(str(tiny_root("race")))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_tiny_builds_atomically_once_and_deterministically(tmp_path):
    """Two processes build at once into one cache: both get the same complete folder, no temp left."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # two racers into cache "a"; a third process builds into cache "b" at the same time (one wall-clock build,
    # not two in a row)
    caches = [tmp_path / "a", tmp_path / "a", tmp_path / "b"]
    procs = [ctx.Process(target=_build_in, args=(str(c), q)) for c in caches]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    built = [Path(q.get(timeout=5)) for _ in caches]
    roots = {r for r in built if r.is_relative_to(tmp_path / "a")}
    assert len(roots) == 1
    root = roots.pop()
    assert (root / "BUILD.json").is_file() and json.loads((root / "BUILD.json").read_text())["flavour"] == "race"
    assert [p.name for p in (tmp_path / "a" / "tiny").iterdir()] == [root.name]  # no leftover .tmp folders
    # The other build (another process, another cache) is byte-identical: fixed seeds, tokenizer merges made
    # in code.
    (again,) = [r for r in built if r.is_relative_to(tmp_path / "b")]
    assert again != root and again.name == root.name
    for rel in ("sdxl/unet/diffusion_pytorch_model.safetensors", "llava/model.safetensors",
                "ip_adapter/models/image_encoder/model.safetensors",
                "ip_adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl/tokenizer/tokenizer.json"):
        assert _sha(root / rel) == _sha(again / rel), rel


def test_tiny_components_are_the_real_classes_loaded_with_from_pretrained():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from img.models.loading import load_ip_projection, load_mllm, load_sdxl_pipeline, locate

    p = get_profile("tiny")
    pipe = load_sdxl_pipeline(p)
    assert type(pipe) is StableDiffusionXLPipeline
    assert type(pipe.unet) is UNet2DConditionModel and type(pipe.vae) is AutoencoderKL
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == 77
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    assert type(pipe.image_encoder) is CLIPVisionModelWithProjection
    assert type(pipe.unet.encoder_hid_proj.image_projection_layers[0]) is IPAdapterPlusImageProjection
    assert pipe.unet.config.cross_attention_dim == p.dims.ip_dim
    assert type(load_ip_projection(p)) is IPAdapterPlusImageProjection
    model, proc = load_mllm(p)
    assert type(model) is LlavaForConditionalGeneration and type(proc) is LlavaProcessor
    assert model.config.text_config.hidden_size == p.dims.mllm_hidden
    # Saved in the real repos' layouts: pipeline folder, h94 layout, original IP-Adapter keys.
    w = locate(p, "ip_weights").path
    assert w.name == "ip-adapter-plus_sdxl_vit-h.safetensors" and w.parent.name == "sdxl_models"
    from safetensors import safe_open

    with safe_open(str(w), framework="pt") as f:
        keys = set(f.keys())
    assert {"image_proj.latents", "image_proj.layers.0.0.to_kv.weight", "image_proj.layers.3.1.3.weight"} <= keys
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)
    assert any(k.startswith("ip_adapter.1.to_k_ip") for k in keys)


@pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py
def test_tiny_pipeline_generates_and_ip_tokens_change_the_image():
    """2 steps on CPU; feeding post-resampler tokens (projection swapped for identity) changes the image."""
    import numpy as np
    import torch

    from img.data.shapes_world import render, sample_background, sample_scene
    from img.features import IPTokenEncoder
    from img.models.loading import load_sdxl_pipeline

    p = get_profile("tiny")
    pipe = load_sdxl_pipeline(p)
    pipe.set_ip_adapter_scale(1.0)
    pipe.unet.encoder_hid_proj.image_projection_layers[0] = torch.nn.Identity()
    ip = IPTokenEncoder(p)
    rng = np.random.default_rng(0)
    imgs = [render(sample_scene(rng, groups=1), rng, background=sample_background(rng)) for _ in range(2)]
    neg = ip.unconditional()

    def gen(tokens):
        embeds = torch.cat([neg, tokens])[:, None]  # (2B, 1, N, D): [negative ; positive]
        out = pipe("a red circle", ip_adapter_image_embeds=[embeds], num_inference_steps=3,
                   generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        return out

    a, b = gen(ip(imgs[:1])), gen(ip(imgs[1:]))
    assert a.shape == (p.dims.image_size, p.dims.image_size, 3)
    assert np.abs(a - gen(ip(imgs[:1]))).max() == 0.0  # seeded: same tokens, same image
    assert np.abs(a - b).mean() > 1e-4


def test_tiny_tokenizers_cover_the_shapes_world_and_questions():
    from img.data.shapes_world import vocabulary
    from img.models.loading import load_mllm, load_text_encoders
    from img.questions import QUESTIONS

    p = get_profile("tiny")
    (clip_tok, _), _ = load_text_encoders(p)
    _, proc = load_mllm(p)
    unk = proc.tokenizer.unk_token_id
    for w in vocabulary():
        assert len(clip_tok(w, add_special_tokens=False).input_ids) == 1, w
        assert proc.tokenizer.convert_tokens_to_ids(w) != unk, w
    text = " ".join(QUESTIONS).replace("{caption}", "a red circle")
    assert unk not in proc.tokenizer(text).input_ids
    ids = clip_tok("a red circle to the left of two blue squares").input_ids
    assert len(ids) == 2 + 10  # bos + one token per word + eos


# ---------------------------------------------------------------- img profile check
@pytest.mark.slow
def test_cli_profile_check_tiny_passes():
    r = subprocess.run([*_img_cmd(), "profile", "check", "tiny"], capture_output=True, text=True, timeout=300,
                       env=_clean_env(**({"IMG_CACHE": os.environ["IMG_CACHE"]} if "IMG_CACHE" in os.environ else {})),
                       cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    for comp in ("base", "ip_encoder", "ip_weights", "mllm"):
        assert f"ok       {comp}" in r.stdout
    for step in ("ip_tokens", "guidance", "text", "aligner", "pipeline"):
        assert f"ran      {step}" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_profile_check_sdxl_offline_fails_naming_the_settings(tmp_path):
    env = _clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    r = subprocess.run([*_img_cmd(), "profile", "check", "sdxl"], capture_output=True, text=True, timeout=60,
                       env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    missing = [line for line in r.stdout.splitlines() if line.strip().startswith("MISSING")]
    assert len(missing) == 4  # base, ip_encoder, ip_weights, mllm: one line each
    for comp, var in (("base", "IMG_SDXL_BASE"), ("ip_encoder", "IMG_IP_ADAPTER"), ("ip_weights", "IMG_IP_ADAPTER"),
                      ("mllm", "IMG_LLAVA_13B")):
        line = next(m for m in missing if m.split()[1] == comp)
        assert var in line and f'{comp} = "/path"' in line and "sdxl.toml" in line
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow
def test_cli_profile_check_sdxl_dry_run():
    r = subprocess.run([*_img_cmd(), "profile", "check", "sdxl", "--dry-run"], capture_output=True, text=True,
                       timeout=120, env=_clean_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "195,094,528" in out  # the aligner at the SDXL setting
    assert "2,567,463,684" in out  # SDXL UNet
    assert "13,351,494,656" in out  # LLaVA-1.5-13B
    assert "632,076,800" in out  # ViT-H/14 image encoder
    assert "CLIP penultimate (2, 257, 1280)" in out
    assert "(2, 16, 2048) = c_I" in out
    assert "(2, 616, 5120)" in out  # 576 image tokens + 40 text tokens, E = 5120
    assert "cross-attention dim 2048" in out


def test_dry_run_other_profiles_in_process():
    from img.app.profile_check import check

    for name, expect in (("flux", "675,401,728"), ("sdxl-qwen", "8,292,166,656")):
        lines: list[str] = []
        assert check(name, dry_run=True, out=lines.append) == 0, "\n".join(lines)
        assert any(expect in line for line in lines), (name, lines)


def _fake_repo(folder: Path, config: Path | None, weights: str | None = "model.safetensors") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        shutil.copy(config, folder / "config.json")
    if weights:
        (folder / weights).write_bytes(b"")


def test_local_paths_resolve_and_configs_are_checked_against_dims(tmp_path, monkeypatch):
    """Real-profile resolution without weights: env paths, HF-cache layout, dims check, weights check."""
    from img.app.profile_check import check

    for k in list(os.environ):
        if k.startswith("IMG_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("IMG_PROFILES_DIR", str(tmp_path / "none"))
    base = tmp_path / "sdxl"
    _fake_repo(base / "unet", CONFIGS / "sdxl-base-1.0/unet/config.json", "diffusion_pytorch_model.safetensors")
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    ipa = tmp_path / "IP-Adapter"
    _fake_repo(ipa / "models" / "image_encoder", CONFIGS / "ip-adapter-vit-h14/config.json")
    _fake_repo(ipa / "sdxl_models", None, "ip-adapter-plus_sdxl_vit-h.safetensors")
    llava13 = tmp_path / "llava13"
    _fake_repo(llava13, CONFIGS / "llava-1.5-13b-hf/config.json")
    # The MLLM comes from an HF-cache layout (hub id resolved offline), the rest from env paths.
    hub = tmp_path / "hub"
    snap = hub / "models--llava-hf--llava-1.5-13b-hf" / "snapshots" / "abc123"
    _fake_repo(snap, CONFIGS / "llava-1.5-13b-hf/config.json")
    (hub / "models--llava-hf--llava-1.5-13b-hf" / "refs").mkdir()
    (hub / "models--llava-hf--llava-1.5-13b-hf" / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("IMG_SDXL_BASE", str(base))
    monkeypatch.setenv("IMG_IP_ADAPTER", str(ipa))
    lines: list[str] = []
    assert check("sdxl", out=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "(HF cache" in text and "set by env IMG_SDXL_BASE" in text

    # The weights file given directly (not the repo root) also resolves.
    monkeypatch.setenv("IMG_IP_ADAPTER", str(ipa / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"))
    from img.models.loading import locate

    assert locate(get_profile("sdxl"), "ip_weights").path.name == "ip-adapter-plus_sdxl_vit-h.safetensors"
    monkeypatch.setenv("IMG_IP_ADAPTER", str(ipa))

    # A 7B LLaVA where the profile expects 13B: caught from its config, exit 1.
    llava7 = tmp_path / "llava7"
    _fake_repo(llava7, CONFIGS / "llava-1.5-7b-hf/config.json")
    monkeypatch.setenv("IMG_LLAVA_13B", str(llava7))
    lines = []
    assert check("sdxl", out=lines.append) == 1
    assert any("MISMATCH" in line and "4096" in line and "5120" in line for line in lines), lines

    # A config without weights is reported as missing.
    bare = tmp_path / "bare"
    _fake_repo(bare, CONFIGS / "llava-1.5-13b-hf/config.json", weights=None)
    monkeypatch.setenv("IMG_LLAVA_13B", str(bare))
    lines = []
    assert check("sdxl", out=lines.append) == 1
    assert any(line.strip().startswith("MISSING  mllm") and "no weights" in line for line in lines), lines


def test_a_bad_local_path_is_named_with_its_fix(monkeypatch):
    from img.models.loading import ModelNotFound, locate

    monkeypatch.setenv("IMG_LLAVA_13B", "/nonexistent/llava")
    with pytest.raises(ModelNotFound) as e:
        locate(get_profile("sdxl"), "mllm")
    msg = str(e.value)
    assert "'/nonexistent/llava' does not exist" in msg and "IMG_LLAVA_13B=/path" in msg
    with pytest.raises(UserError, match="has no component 'vae'"):
        locate(get_profile("sdxl"), "vae")
