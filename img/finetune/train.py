"""`img jobs finetune-mllm`: teach the MLLM to name misalignments, with DeepSpeed (LoRA by default).

    img jobs finetune-mllm --profile tiny --data data/edits --steps 200 --run-dir runs/ft --lake lake
    img jobs finetune-mllm ... --steps 400 --run-dir runs/ft --lake lake --resume      # continue to step 400
    torchrun --nproc_per_node 2 -m img.cli jobs finetune-mllm --profile tiny --data data/edits --steps 200 ...
    deepspeed --num_gpus 8 --no_local_rank --module img.cli jobs finetune-mllm --profile sdxl ... --config F.toml

Each training example is (input image, a question from ``img.questions`` filled with the
*edited* caption) -> the edit instruction. The model reads the prompt text of guidance
extraction (``Batcher.prompt``), then the instruction and EOS; the loss is the mean
cross-entropy over the answer tokens only. LoRA (peft) adapts the language model's
linear layers and trains the multimodal projector; ``method = "full"`` trains the whole
language model and projector instead (the vision tower stays frozen, as in LLaVA-1.5).

Launchers, ranks, ``--resume`` and the checkpoint scheme are those of `img jobs train`
(``img.training.run_common``). Run folder::

    run.json                       run id, fingerprint, profile, data, world size, LR horizon
    data_plan.json                 the checked input: shards (size, mtime), blocks, usable records
    latest_checkpoint              tag of the last complete checkpoint
    checkpoints/step_00000200/     DeepSpeed state of the trainable weights (frozen base excluded),
                                   state.json (step, loader position, held-out "before"), rng_rank{r}
                                   adapter/ (LoRA: the adapter at that step)
    adapter/                       the final adapter, peft format (+ img_adapter.json)  [lora]
    merged/                        a plain transformers folder: base + adapter merged  [--merge, or full]

Scalars go to ``<lake>/metrics.lance``: ``loss`` every step, ``lr`` and ``samples_per_s``
every ``log_every`` steps, ``heldout_loss_before`` / ``heldout_exact_match_before`` at
step 0 and ``heldout_loss_after`` / ``heldout_exact_match`` at the last step (mean
answer-token cross-entropy, and the share of greedy-decoded instructions equal to the
reference after lower-casing and whitespace folding). Unusable records go to
``<lake>/finetune_quarantine.lance`` with the reason.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F

from img.config import fingerprint, project_file
from img.errors import UserError
from img.features import GuidanceEncoder
from img.finetune.adapter import META_NAME, with_mllm_adapter
from img.finetune.data import (
    EditLoader,
    EditPlan,
    EditRecord,
    gather_plans,
    list_edit_shards,
    plan_shards,
    shards_changed,
)
from img.inference.infer import _set_threads
from img.lake import tables as lake_mod
from img.models.loading import load_mllm, locate
from img.models.profiles import Profile, get_profile
from img.questions import question_for
from img.training.run_common import (
    MetricsWriter,
    build_engine,
    checkpoint_tag,
    commit_checkpoint,
    dist_env,
    init_distributed,
    load_engine_checkpoint,
    load_rng,
    new_run_id,
    open_run,
    progress_bar,
    save_rng,
)
from schemas import finetune_quarantine
from schemas.meta import with_provenance

log = logging.getLogger(__name__)

DEFAULT_CONFIG = project_file("finetune_mllm.toml")  # the installed project's jobs/finetune_mllm.toml, or None
IGNORE = -100  # label of prompt and padding positions


@dataclass
class LoraSettings:
    """peft ``LoraConfig`` (LLaVA-1.5's LoRA recipe: r 128, alpha 256, dropout 0.05)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # Linear layers of the *language model* that get an adapter (regex over module names).
    target_modules: str = r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save: list[str] = field(default_factory=lambda: ["multi_modal_projector"])  # trained in full


@dataclass
class FinetuneConfig:
    """Settings of `img jobs finetune-mllm`, filled from jobs/finetune_mllm.toml (LLaVA-1.5's fine-tuning recipe)."""

    method: Literal["lora", "full"] = "lora"
    # optimisation (LLaVA-1.5: AdamW, lr 2e-4 LoRA / 2e-5 full, projector 2e-5, no weight decay, cosine, warmup 3%)
    lr: float = 2e-4
    projector_lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    schedule_steps: int = 0  # length of the cosine; 0 = the --steps of the run's first invocation
    batch_size: int = 16  # per rank and micro-step (LLaVA-1.5: 16 x 8 GPUs = 128)
    grad_accum: int = 1
    gradient_checkpointing: bool = False  # trade compute for activation memory (13B: on)
    # data
    question_seed: int = 0  # picks each record's question paraphrase (per epoch)
    max_answer_tokens: int = 64  # longer instructions are cut
    heldout_fraction: float = 0.05  # records held out by record-id hash
    seed: int = 0  # adapter init, dropout, data order
    shuffle_blocks: int = 8  # records are shuffled within windows of this many row groups
    # run
    log_every: int = 10
    checkpoint_every: int = 500  # also at the last step
    keep_checkpoints: int = 2
    eval_max_records: int = 256  # held-out records in the loss (0 = all)
    eval_generate_records: int = 64  # held-out records greedily decoded for the exact-match rate (0 = none)
    max_new_tokens: int = 48
    # engine (as img jobs train)
    deepspeed_config: str = "jobs/deepspeed_zero0.json"
    zero_stage: Optional[int] = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)

    # Knobs that may change between a run and its resume without changing its training.
    RUN_KNOBS = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_max_records", "eval_generate_records",
                 "max_new_tokens")


@dataclass
class FinetuneSummary:
    run_id: str
    method: str
    steps: int
    resumed_from: int
    seconds: float
    samples_per_s: float
    final_loss: float
    records: int
    quarantined: int
    heldout: dict[str, float]
    output: str

    def render(self) -> str:
        h = ", ".join(f"{k} {v:.4g}" for k, v in self.heldout.items())
        return (f"fine-tuned {self.run_id} ({self.method}): step {self.resumed_from} -> {self.steps} in "
                f"{self.seconds:.1f}s ({self.samples_per_s:.1f} samples/s), final loss {self.final_loss:.4g}; "
                f"{self.records} usable records, {self.quarantined} quarantined; held-out: {h or 'none'}; "
                f"output at {self.output}")


# ----------------------------------------------------------------------------- lake writes
def commit_to_lake(lake: str, write: Callable[[], None]) -> None:
    """Every commit this job makes to the lake (metrics, quarantine) goes through here.

    This is the one place for the lake writer lock: with ``img/lake/lock.py`` merged it becomes
    ``with writer_lock(lake, job="finetune-mllm"): write()``.
    """
    write()


def write_quarantine(lake: str, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Append the run's unusable records to ``finetune_quarantine`` (see schemas/finetune_quarantine.py)."""
    if not rows:
        return
    import pyarrow as pa


    schema = with_provenance(finetune_quarantine.SCHEMA, table="finetune_quarantine",
                             version=finetune_quarantine.VERSION)
    table = pa.Table.from_pylist([{**r, "run_id": run_id} for r in rows], schema=schema)
    commit_to_lake(lake, lambda: lake_mod.append_rows(lake, "finetune_quarantine", table, schema))


# ----------------------------------------------------------------------------- examples
def normalise(text: str) -> str:
    """Instruction text for the exact-match comparison: lower case, single spaces, no final full stop."""
    return " ".join(text.lower().split()).rstrip(" .!")


class Batcher:
    """Records -> model inputs: prompt (image + question) then the instruction and EOS, labels on the answer only."""

    def __init__(self, encoder: GuidanceEncoder, cfg: FinetuneConfig) -> None:
        self.encoder, self.cfg = encoder, cfg
        self.processor = encoder.processor
        self.tokenizer = encoder.processor.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    def prompt(self, question: str) -> str:
        """The text before the answer: exactly what guidance extraction reads (one place to change it)."""
        return self.encoder.prompt(question)

    def question(self, record: EditRecord, epoch: int | None = None) -> str:
        """A paraphrase filled with the edited caption; a new pick per epoch (held-out: ``epoch=None``, fixed)."""
        key = record.record_id if not epoch else f"{record.record_id}@{epoch}"
        return question_for(record.caption, key=key, seed=self.cfg.question_seed)

    def prompt_inputs(self, records: list[EditRecord], questions: list[str]) -> dict[str, torch.Tensor]:
        return self.processor(images=[r.image for r in records], text=[self.prompt(q) for q in questions],
                              padding=True, return_tensors="pt")

    def __call__(self, records: list[EditRecord], epoch: int | None = None) -> dict[str, torch.Tensor]:
        enc = self.prompt_inputs(records, [self.question(r, epoch) for r in records])
        seqs, labels = [], []
        for i, rec in enumerate(records):
            prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()]  # right padding: real tokens first
            answer = self.tokenizer(rec.instruction, add_special_tokens=False)["input_ids"][: self.cfg.max_answer_tokens]
            answer = torch.tensor([*answer, self.eos], dtype=prompt.dtype)
            seqs.append(torch.cat([prompt, answer]))
            labels.append(torch.cat([torch.full_like(prompt, IGNORE), answer]))
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=seqs[0].dtype)
        lab = torch.full((len(seqs), n), IGNORE, dtype=seqs[0].dtype)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = s, l, 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": enc["pixel_values"], "labels": lab}

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, record: EditRecord, device: torch.device, dtype: torch.dtype) -> str:
        """The greedy-decoded answer for one record (no padding, so any model gives its true continuation)."""
        enc = self.prompt_inputs([record], [self.question(record)])
        enc = {k: v.to(device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(dtype)
        out = model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                             eos_token_id=self.eos, pad_token_id=self.pad)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer_loss(model: Any, inputs: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy of the answer tokens (next-token prediction); (loss, number of answer tokens)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=inputs["pixel_values"]).logits
    labels = inputs["labels"][:, 1:]
    logits = logits[:, :-1]
    keep = labels != IGNORE
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    n = int(keep.sum())
    return (loss / max(n, 1) if reduction == "mean" else loss), n


def _to(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {k: v.to(device) for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@torch.no_grad()
def evaluate_heldout(model: Any, batcher: Batcher, loader: EditLoader, cfg: FinetuneConfig, device: torch.device,
                     dtype: torch.dtype, world: int) -> dict[str, float]:
    """Held-out answer loss (token mean) and exact-match rate of greedy-decoded instructions, over all ranks."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, answer tokens, exact matches, decoded records
    refs = loader.heldout(cfg.eval_max_records)
    for i in range(0, len(refs), cfg.batch_size):
        records = loader.records(refs[i: i + cfg.batch_size])
        loss, n = answer_loss(model, _to(batcher(records), device, dtype), reduction="sum")
        sums[0] += loss.double().cpu()
        sums[1] += n
    if cfg.eval_generate_records:
        for record in loader.records(loader.heldout(cfg.eval_generate_records)):
            sums[2] += float(normalise(batcher.generate(model, record, device, dtype)) == normalise(record.instruction))
            sums[3] += 1
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    out = {}
    if sums[1] > 0:
        out["heldout_loss"] = sums[0].item() / sums[1].item()
        out["heldout_answer_tokens"] = sums[1].item()
    if sums[3] > 0:
        out["heldout_exact_match"] = sums[2].item() / sums[3].item()
    return out


# ----------------------------------------------------------------------------- model
def _trainable_model(encoder: GuidanceEncoder, cfg: FinetuneConfig) -> torch.nn.Module:
    """The MLLM prepared for ``cfg.method``: LoRA adapters (peft) or the full language model + projector."""
    model = encoder.model
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the adapters' initial weights
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=lc.target_modules,
                                                 modules_to_save=list(lc.modules_to_save) or None))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(".vision_tower." not in f".{name}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"no trainable weights: lora.target_modules {cfg.lora.target_modules!r} matches no layer of "
                        f"{type(encoder.model).__name__}. Fix [lora] target_modules in the config.")
    return model


def _param_groups(model: torch.nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if "multi_modal_projector" in name else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}]
    if proj:
        groups.append({"params": proj, "lr": cfg.projector_lr})
    return groups


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then cosine to 0 over ``total`` (or constant)."""
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def checkpoint_dtype(profile: Profile) -> torch.dtype:
    """The dtype the base MLLM's weights are stored in (its config.json), for exports."""
    cfg = json.loads((locate(profile, "mllm").path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or profile.tensor_dtype
    return getattr(torch, str(name).replace("torch.", ""), profile.torch_dtype)


def export_merged(profile: Profile, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A plain transformers folder: the profile's MLLM with the adapter merged in (what `img jobs embed` runs)."""
    out_dir = Path(out_dir)
    model, processor = load_mllm(with_mllm_adapter(profile, adapter_dir), "cpu", checkpoint_dtype(profile))
    _save_folder(out_dir, lambda d: (model.save_pretrained(d, safe_serialization=True), processor.save_pretrained(d)))
    return out_dir


def _save_folder(out_dir: Path, write: Callable[[Path], Any]) -> None:
    """Write a folder next to ``out_dir`` and swap it into place, so a reader never sees half of one."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _save_adapter(model: Any, out_dir: Path, meta: dict[str, Any]) -> None:
    def write(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True, save_embedding_layers=False)  # frozen: not saved
        (d / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    _save_folder(out_dir, write)


# ----------------------------------------------------------------------------- the job
def _validate(steps: int, cfg: FinetuneConfig, lake: str) -> None:
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}.")
    for key in ("checkpoint_every", "log_every", "batch_size", "grad_accum", "max_answer_tokens"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be >= 1, got {getattr(cfg, key)}. Fix it in the --config TOML.")
    if cfg.lr <= 0 or cfg.projector_lr < 0 or not 0 <= cfg.warmup_ratio < 1:
        raise UserError(f"lr ({cfg.lr}) must be > 0, projector_lr ({cfg.projector_lr}) >= 0 and warmup_ratio "
                        f"({cfg.warmup_ratio}) in [0, 1). Fix the --config TOML.")
    if cfg.method == "lora" and cfg.lora.r < 1:
        raise UserError(f"lora.r must be >= 1, got {cfg.lora.r}. Fix [lora] in the --config TOML.")
    if lake_mod.is_local(lake):
        path = Path(lake.removeprefix("file://")).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"--lake {lake!r} exists and is not a folder. Pass a lake folder.")


def run_finetune(profile_name: str, data: str, steps: int, run_dir: str | Path, lake: str, cfg: FinetuneConfig,
                 resume: bool = False, merge: bool = False) -> FinetuneSummary:
    """Fine-tune to ``steps`` total optimizer steps; every rank calls this."""
    _validate(steps, cfg, lake)
    profile = get_profile(profile_name)
    if profile.mllm_adapter:
        raise UserError(f"profile {profile.name!r} already names an MLLM adapter ({profile.mllm_adapter}); fine-tuning "
                        "starts from the base MLLM. Remove mllm_adapter from the profile's TOML.")
    shards = list_edit_shards(data)
    threads = _set_threads(profile, "cuda" if torch.cuda.is_available() else "cpu")  # tiny models on CPU: 1 thread
    try:
        return _run(profile, shards, steps, Path(run_dir), lake, cfg, resume, merge)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


def _run(profile: Profile, shards: list, steps: int, run_dir: Path, lake: str, cfg: FinetuneConfig, resume: bool,
         merge: bool) -> FinetuneSummary:
    import torch.distributed as dist

    rank, world, local_rank = dist_env()
    data_key = shards[0].uri if len(shards) == 1 else os.path.dirname(os.path.commonprefix([s.uri for s in shards]))
    fp = fingerprint(cfg, exclude=FinetuneConfig.RUN_KNOBS)
    info = open_run(run_dir, resume, {"fingerprint": fp, "profile": profile.name, "models": profile.model_ids(),
                                      "world_size": world},
                    "Resume with the same --config, --profile and number of ranks.")
    device, bf16, dtype = init_distributed(local_rank, cfg.precision)

    # data: checked once; a resume reads the same plan back and refuses changed shards
    if info is not None:
        plan = EditPlan.from_json((run_dir / "data_plan.json").read_text())
        changed = shards_changed(plan, shards)
        if changed:
            raise UserError(f"--resume: the data changed since the run started ({', '.join(changed[:3])}). Resume on "
                            "the same --data, or start a new --run-dir.")
    else:
        part = plan_shards(shards, rank, world)
        parts = [part]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, part)
        plan = gather_plans(parts)
    loader = EditLoader(plan, rank=rank, world_size=world, batch_size=cfg.batch_size, seed=cfg.seed,
                        heldout_fraction=cfg.heldout_fraction, shuffle_blocks=cfg.shuffle_blocks)
    horizon = int(info["schedule_steps"]) if info is not None else (cfg.schedule_steps or steps)

    encoder = GuidanceEncoder(profile, device, dtype)
    batcher = Batcher(encoder, cfg)
    model = _trainable_model(encoder, cfg)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, horizon, cfg.warmup_ratio, cfg.schedule))
    engine = build_engine(model, optimizer, cfg, world, bf16, lr_scheduler=scheduler)

    start, before = 0, {}
    if info is not None:
        tag = (run_dir / "latest_checkpoint").read_text().strip()
        ck = load_engine_checkpoint(engine, run_dir, tag, load_module_strict=False)  # frozen weights are not in it
        state = json.loads((ck / "state.json").read_text())
        loader.load_state_dict(state["loader"])
        load_rng(ck / f"rng_rank{rank}.safetensors")
        start, before, run_id = int(state["step"]), state["before"], info["run_id"]
        log.info("resumed %s from %s (step %d)", run_id, tag, start)
    else:
        run_id = new_run_id(run_dir, world)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "data_plan.json").write_text(plan.to_json())
            (run_dir / "run.json").write_text(json.dumps({
                "run_id": run_id, "fingerprint": fp, "profile": profile.name, "models": profile.model_ids(),
                "world_size": world, "data": data_key, "lake": str(lake), "schedule_steps": horizon,
                "config": dataclasses.asdict(cfg), "records": len(plan.good), "quarantined": len(plan.quarantine),
                "train_records": len(loader.train_refs), "heldout_records": len(loader.heldout_refs),
            }, indent=2, sort_keys=True, default=str) + "\n")
            write_quarantine(str(lake), run_id, plan.quarantine)
        before = evaluate_heldout(engine.module, batcher, loader, cfg, device, dtype, world)

    # On resume, rows of steps >= start are already in the table (flushed at or after that checkpoint).
    metrics = MetricsWriter(str(lake), run_id, after_step=start - 1 if info is not None else None) \
        if rank == 0 else None
    if metrics is not None and info is None:
        for name, value in before.items():
            metrics.add(0, f"{name}_before", value)
    if metrics is not None:
        log.info("run %s: %d usable records (%d train, %d held out), %d quarantined; %s, %d steps/epoch, %d rank(s), "
                 "%s on %s; held-out before: %s", run_id, len(plan.good), len(loader.train_refs),
                 len(loader.heldout_refs), len(plan.quarantine), cfg.method, loader.steps_in_epoch(loader.epoch),
                 world, dtype, device, before)
    meta = {"profile": profile.name, "base_mllm": profile.mllm.id, "mllm_hidden": profile.dims.mllm_hidden,
            "run_id": run_id, "method": cfg.method}

    def checkpoint(step: int) -> None:
        tag = checkpoint_tag(step)
        ck = run_dir / "checkpoints" / tag
        if metrics is not None:
            commit_to_lake(str(lake), metrics.flush)
        engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag, exclude_frozen_parameters=True)
        ck.mkdir(parents=True, exist_ok=True)
        save_rng(ck / f"rng_rank{rank}.safetensors")
        if rank == 0:
            if cfg.method == "lora":
                _save_adapter(engine.module, ck / "adapter", {**meta, "step": step})
            (ck / "state.json").write_text(json.dumps({"step": step, "loader": loader.state_dict(), "before": before,
                                                        "run_id": run_id}, indent=2))
        commit_checkpoint(run_dir, tag, cfg.keep_checkpoints, rank)

    t0 = time.perf_counter()
    win_t, win_steps, last_loss = time.perf_counter(), 0, float("nan")
    engine.train()
    it = iter(loader)
    with progress_bar(rank, "fine-tune", total=steps, completed=start) as advance:
        for step in range(start + 1, steps + 1):
            total = torch.zeros(1, dtype=torch.float64)
            for _ in range(cfg.grad_accum):
                records = next(it)  # the loader's epoch is now that of this batch
                loss, _ = answer_loss(engine, _to(batcher(records, loader.epoch), device, dtype))
                engine.backward(loss)
                engine.step()
                total += loss.detach().double().cpu() / cfg.grad_accum
            if world > 1:
                dist.all_reduce(total)
                total /= world
            last_loss = total.item()
            win_steps += 1
            if metrics is not None:
                metrics.add(step, "loss", last_loss)
            if step % cfg.log_every == 0 or step == steps:
                dt = time.perf_counter() - win_t
                rate = win_steps * cfg.batch_size * cfg.grad_accum * world / max(dt, 1e-9)
                win_t, win_steps = time.perf_counter(), 0
                if metrics is not None:
                    metrics.add(step, "samples_per_s", rate)
                    metrics.add(step, "lr", engine.get_lr()[0])
                    log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, steps, last_loss,
                             engine.get_lr()[0], rate)
            advance(step)
            if step % cfg.checkpoint_every == 0 or step == steps:
                checkpoint(step)

    after = evaluate_heldout(engine.module, batcher, loader, cfg, device, dtype, world)
    after = {"heldout_loss_after" if k == "heldout_loss" else k: v for k, v in after.items()}
    final = max(steps, start)
    heldout = {**{f"{k}_before": v for k, v in before.items()}, **after}
    if metrics is not None:
        for name, value in after.items():
            metrics.add(final, name, value)
        commit_to_lake(str(lake), metrics.flush)
    if rank == 0:
        if cfg.method == "lora":
            _save_adapter(engine.module, run_dir / "adapter", {**meta, "step": final})
            if merge:
                export_merged(profile, run_dir / "adapter", run_dir / "merged")
        else:
            _save_folder(run_dir / "merged", lambda d: (engine.module.save_pretrained(d, safe_serialization=True),
                                                        encoder.processor.save_pretrained(d)))
    dist.barrier()
    seconds = time.perf_counter() - t0
    done = max(steps - start, 0)
    output = run_dir / ("adapter" if cfg.method == "lora" else "merged")
    return FinetuneSummary(run_id=run_id, method=cfg.method, steps=final, resumed_from=start, seconds=seconds,
                           samples_per_s=done * cfg.batch_size * cfg.grad_accum * world / max(seconds, 1e-9),
                           final_loss=last_loss, records=len(plan.good), quarantined=len(plan.quarantine),
                           heldout=heldout, output=str(output))
