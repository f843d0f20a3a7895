"""Typed TOML config: defaults, overrides, type checks and unknown keys."""

import pytest

from img.config import fingerprint, load_config
from img.errors import UserError
from pipelines.embed_config import EmbedConfig


def test_shipped_embed_tomls_load(repo_root):
    cpu = load_config(EmbedConfig, repo_root / "jobs/embed.toml")
    gpu = load_config(EmbedConfig, repo_root / "jobs/embed_gpu.toml")
    assert cpu.ip.batch_size == 16 and gpu.mllm.num_gpus == 1
    # the two files differ only in run-size knobs, so they share a content fingerprint
    assert fingerprint(cpu, exclude=EmbedConfig.RUN_KNOBS) == fingerprint(gpu, exclude=EmbedConfig.RUN_KNOBS)
    assert fingerprint(cpu) != fingerprint(gpu)


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("question_seed = 1\nrows_per_fragmnet = 3\n")
    with pytest.raises(UserError, match="rows_per_fragmnet"):
        load_config(EmbedConfig, p)
    p.write_text("[ip]\nbatchsize = 3\n")
    with pytest.raises(UserError, match="ip.batchsize"):
        load_config(EmbedConfig, p)


def test_wrong_type_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('question_seed = "one"\n')
    with pytest.raises(UserError, match="question_seed"):
        load_config(EmbedConfig, p)
    p.write_text("question_seed = 4\n")
    cfg = load_config(EmbedConfig, p, overrides={"limit": 7, "question_seed": None})
    assert cfg.limit == 7 and cfg.question_seed == 4
    with pytest.raises(UserError, match="does not exist"):
        load_config(EmbedConfig, tmp_path / "missing.toml")
