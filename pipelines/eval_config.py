"""Settings of the eval job, filled from ``jobs/eval.toml``.

    cfg = load_config(EvalConfig, "jobs/eval.toml", overrides={"seeds": 2})

What enters the run's identity (and so the ``run`` id) is decided by the job:
the prompts, seeds, models, systems, generation settings and scorers. The pool
sizes, batch sizes, GPUs and fragment size here change speed only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.embed_config import ActorPool


@dataclass
class EvalConfig:
    seeds: int = 1  # images per prompt and system, with generation seeds 0 .. seeds-1 (the same for base and IMG)
    units_per_fragment: int = 2  # (prompt, seed) units per written + committed fragment: bounds lost work on a kill
    writer_cpus: float = 0.25  # CPUs reserved by the fragment writer
    device: str = "auto"  # auto, cpu, cuda: where actors without a GPU reservation run their models
    # One actor pool per model: the generator (diffusion model + IP encoder + MLLM + aligners) and each scorer.
    generate: ActorPool = field(default_factory=lambda: ActorPool(batch_size=1, num_cpus=1.0))
    # Scorer batches are counted in units (1 + systems images each). Keep 1: a larger batch makes Ray Data hold
    # finished units until the batch fills, which delays their commits (measured: all at the end for 6 units).
    scorer: ActorPool = field(default_factory=lambda: ActorPool(batch_size=1, num_cpus=0.25))
    storage_options: dict = field(default_factory=dict)  # passed to Lance for object stores (s3://, gs://, az://)
