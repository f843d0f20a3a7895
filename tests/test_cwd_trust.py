"""Working-directory trust (issue 9, item 6): files in the folder `img` runs in never change what loads.

Profile overrides, job TOMLs and DeepSpeed configs come from the installed project (``img.config.jobs_dir``),
an explicit ``--config`` / ``IMG_PROFILES_DIR``, or absolute paths; a hub id never resolves to a folder of
the working directory that has its name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from img.config import jobs_dir, project_file, resolve_project_path
from img.errors import UserError
from img.models.profiles import PROFILES, get_profile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def hostile_cwd(tmp_path, monkeypatch):
    """A working directory with its own jobs/ (profile override, train TOML, DeepSpeed JSON) and a hub-id folder."""
    for k in list(os.environ):
        if k.startswith("IMG_") and k != "IMG_CACHE":
            monkeypatch.delenv(k)
    cwd = tmp_path / "untrusted"
    evil = cwd / "evil-weights"
    (evil / "unet").mkdir(parents=True)
    (evil / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (cwd / "jobs" / "profiles").mkdir(parents=True)
    for name in ("tiny", "sdxl"):
        (cwd / "jobs" / "profiles" / f"{name}.toml").write_text(
            f'base = "{evil}"\nmllm = "{evil}"\nip_encoder = "{evil}"\ntensor_dtype = "bfloat16"\n')
    (cwd / "jobs" / "train.toml").write_text("lr = 1000.0\n")
    (cwd / "jobs" / "embed.toml").write_text("question_seed = 666\n")
    (cwd / "jobs" / "deepspeed_zero0.json").write_text(json.dumps({"zero_optimization": {"stage": 3},
                                                                   "checkpoint": {"writer": {"type": "evil"}}}))
    hub = cwd / "stabilityai" / "stable-diffusion-xl-base-1.0"  # the sdxl profile's default hub id, as a folder
    hub.mkdir(parents=True)
    (hub / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    monkeypatch.chdir(cwd)
    return cwd


def test_profile_overrides_in_the_cwd_have_no_effect(hostile_cwd):
    assert get_profile("tiny") == PROFILES["tiny"] and get_profile("tiny").sources == ()
    sdxl = get_profile("sdxl")
    assert sdxl.base.repo == "stabilityai/stable-diffusion-xl-base-1.0" and sdxl.tensor_dtype == "bfloat16"
    assert sdxl.sources == () and jobs_dir() == REPO / "jobs"


def test_a_hub_id_never_resolves_to_a_cwd_folder(hostile_cwd, monkeypatch):
    from img.models.loading import ModelNotFound, locate

    monkeypatch.setenv("HF_HUB_CACHE", str(hostile_cwd / "empty-hf-cache"))
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        locate(get_profile("sdxl"), "base")


def test_job_files_come_from_the_project_not_the_cwd(hostile_cwd):
    from img.config import load_config
    from img.training.trainer import DEFAULT_CONFIG, TrainConfig, deepspeed_config
    from pipelines.embed_config import EmbedConfig

    assert DEFAULT_CONFIG == REPO / "jobs" / "train.toml" and project_file("embed.toml") == REPO / "jobs" / "embed.toml"
    assert load_config(TrainConfig, DEFAULT_CONFIG).lr == 1e-4
    assert load_config(EmbedConfig, project_file("embed.toml")).question_seed == 0
    ds = deepspeed_config(TrainConfig(), world_size=1, bf16=False)
    project = json.loads((REPO / "jobs" / "deepspeed_zero0.json").read_text())
    assert ds["zero_optimization"]["stage"] == project["zero_optimization"]["stage"] == 0 and "checkpoint" not in ds
    assert resolve_project_path("jobs/deepspeed_zero0.json") == REPO / "jobs" / "deepspeed_zero0.json"
    assert resolve_project_path("/abs/x.json") == Path("/abs/x.json")
    with pytest.raises(UserError, match="never the working directory"):
        deepspeed_config(TrainConfig(deepspeed_config="my_ds.json"), world_size=1, bf16=False)


@pytest.mark.slow
def test_cli_in_an_untrusted_folder_loads_the_project_profile(hostile_cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "img.cli", "profile", "check", "tiny"], capture_output=True, text=True,
                       cwd=hostile_cwd, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "evil-weights" not in r.stdout + r.stderr and "tiny build" in r.stdout


def test_explicit_overrides_still_work(tmp_path, monkeypatch):
    """IMG_PROFILES_DIR is explicit; a relative path in its TOML is taken from the TOML's folder."""
    for k in list(os.environ):
        if k.startswith("IMG_") and k != "IMG_CACHE":
            monkeypatch.delenv(k)
    conf = tmp_path / "conf"
    (conf / "models" / "llava").mkdir(parents=True)
    (conf / "sdxl.toml").write_text('mllm = "models/llava"\nbase = "org/some-model"\n')
    monkeypatch.setenv("IMG_PROFILES_DIR", str(conf))
    monkeypatch.chdir(tmp_path)
    p = get_profile("sdxl")
    assert p.mllm.repo == str(conf / "models" / "llava")  # resolved from the TOML's folder, made absolute
    assert p.base.repo == "org/some-model"  # not a path there: stays a hub id
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv("IMG_LLAVA_13B", "mine")  # the user's own shell: relative to the working directory
    assert get_profile("sdxl").mllm.repo == str(tmp_path / "mine")
