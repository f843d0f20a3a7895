"""Settings of the embed job, filled from ``jobs/embed.toml``.

    cfg = load_config(EmbedConfig, "jobs/embed.toml", overrides={"limit": 500})

Run-size knobs (batch sizes, concurrency, GPUs, limit) do not enter the
config fingerprint; everything that changes the stored tensors does. The
questions file enters by its content (``img.questions.questions_id``), not its
path, together with the profile's MLLM template and image mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ActorPool:
    """One Ray actor pool that hosts a model."""

    batch_size: int = 8  # rows per model call; bigger batches use the GPU better
    concurrency: int = 1  # actors in the pool (one per GPU on a cluster)
    num_gpus: float = 0.0  # GPUs per actor (1 on a GPU cluster)
    # CPUs reserved per actor (held for the whole job); torch uses ``threads`` of them (model pools: per call, see
    # ModelPool.calls, so calls x threads may exceed the reservation, e.g. 2 x 1 on 1.5 CPUs)
    num_cpus: float = 0.75

    @property
    def threads(self) -> int:
        """Torch threads per actor: round(num_cpus), at least 1."""
        return max(1, int(round(self.num_cpus)))


@dataclass
class ModelPool(ActorPool):
    """An actor pool of an embed model stage: an ``ActorPool`` whose actors may run several batches at once."""

    # batches each actor runs at once, each in its own thread with ``threads`` torch threads:
    # one process (one set of imports, one copy of the models) keeps several cores busy with 1-thread kernels,
    # which waste less than one batch on several threads. With fuse_models the [mllm] value applies ([ip] must
    # keep 1). Meant for CPU actors: on a GPU each call holds its own activations.
    calls: int = 1

    @property
    def threads(self) -> int:
        """Torch threads per call: round(num_cpus / calls), at least 1."""
        return max(1, int(round(self.num_cpus / self.calls)))


@dataclass
class EmbedConfig:
    question_seed: int = 0  # picks each pair's paraphrased MLLM question (deterministic per pair_id)
    # JSON list of question templates with "{prompt}" (e.g. the authors' 100 questions); None = our own pool
    questions: Optional[str] = None
    text_guidance: bool = False  # also store the diffusion text encoders' caption embeddings (ablation)
    # MLLM guidance on disk: "fp16" = the profile's 16-bit dtype (fp16/bf16, 2 bytes per value); "fp8" = float8
    # e4m3 with one float32 scale per token (1 byte per value; see img/fp8.py). Enters the fingerprint.
    guidance_dtype: Literal["fp16", "fp8"] = "fp16"
    rows_per_fragment: int = 32  # rows per written + committed fragment: bounds memory and lost work on a kill
    read_rows: int = 32  # rows per read unit (a slice of one row group); results stream out per unit
    decode_cpus: float = 0.25  # CPUs reserved per decode task and per fragment writer
    writers: int = 1  # fragment writer actors at most (each writes rows_per_fragment rows per fragment)
    # the driver commits the fragments written in this many seconds in one Lance transaction per table (0: each
    # fragment at once); at hundreds of pairs/s one commit per fragment is more transactions than an object store takes
    commit_seconds: float = 0.0
    # one actor hosts both the IP and the MLLM model ([ip] batch size, [mllm] concurrency and resources): one
    # process imports torch and loads models instead of two, which is what a small CPU job spends its start-up on
    fuse_models: bool = False
    min_side: int = 16  # images smaller than this (px) are quarantined as impossible
    max_pixels: int = 60_000_000  # larger images are quarantined (decompression bombs)
    limit: Optional[int] = None  # embed at most this many input rows (first rows in shard order)
    ip: ModelPool = field(default_factory=lambda: ModelPool(batch_size=16))
    mllm: ModelPool = field(default_factory=lambda: ModelPool(batch_size=8))
    text: ModelPool = field(default_factory=lambda: ModelPool(num_cpus=0.25))
    storage_options: dict = field(default_factory=dict)  # passed to Lance for object stores (s3://, gs://, az://)

    # keys left out of the fingerprint: they change speed, not content
    RUN_KNOBS = ("rows_per_fragment", "read_rows", "decode_cpus", "writers", "commit_seconds", "fuse_models", "limit",
                 "ip", "mllm", "text", "storage_options")
    CONTENT_KEYS = ("questions",)  # fingerprinted by the content they point at, not by their value
