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
from typing import Any, Callable, Iterator, Literal, Optional

import torch
import torch.distributed as dist
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
    HeldoutSums,
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
    was_training = model.training
    model.eval()
    acc = HeldoutSums(["loss", "answer_tokens", "exact_matches", "decoded"])
    refs = loader.heldout(cfg.eval_max_records)
    for i in range(0, len(refs), cfg.batch_size):
        records = loader.records(refs[i: i + cfg.batch_size])
        loss, n = answer_loss(model, _to(batcher(records), device, dtype), reduction="sum")
        acc.add("loss", loss.double().cpu())
        acc.add("answer_tokens", n)
    if cfg.eval_generate_records:
        for record in loader.records(loader.heldout(cfg.eval_generate_records)):
            said = batcher.generate(model, record, device, dtype)
            acc.add("exact_matches", float(normalise(said) == normalise(record.instruction)))
            acc.add("decoded", 1)
    acc.all_reduce(world)
    model.train(was_training)
    out = {}
    if acc["answer_tokens"] > 0:
        out["heldout_loss"] = acc["loss"] / acc["answer_tokens"]
        out["heldout_answer_tokens"] = acc["answer_tokens"]
    if acc["decoded"] > 0:
        out["heldout_exact_match"] = acc["exact_matches"] / acc["decoded"]
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
    job = Finetuner(profile_name, data, steps, run_dir, lake, cfg, resume=resume, merge=merge)
    job.validate()
    threads = _set_threads(job.profile, "cuda" if torch.cuda.is_available() else "cpu")  # tiny models on CPU: 1 thread
    try:
        job.build()
        job.restore()
        job.train()
        return job.finish(job.evaluate())
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


class Finetuner:
    """`img jobs finetune-mllm` as named phases, which every rank runs in this order (``run_finetune`` does):

        job = Finetuner("tiny", "data/edits", 200, "runs/ft", "lake", cfg)
        job.validate()              # settings, profile, data shards and --resume, before anything is written
        job.build()                 # the data plan and loader, the MLLM for ``cfg.method`` in its engine
        job.restore()               # --resume: the last complete checkpoint; else a new run and its "before" figures
        job.train()                 # step() up to ``steps``, checkpoint() every checkpoint_every steps and at the last
        job.finish(job.evaluate())  # held-out "after" figures, the adapter (merged/), a FinetuneSummary
    """

    def __init__(self, profile_name: str, data: str, steps: int, run_dir: str | Path, lake: str, cfg: FinetuneConfig,
                 resume: bool = False, merge: bool = False) -> None:
        self.profile_name, self.data, self.steps, self.run_dir = profile_name, data, steps, Path(run_dir)
        self.lake, self.cfg, self.resume, self.merge = lake, cfg, resume, merge
        self.info: dict[str, Any] | None = None  # run.json of the run being resumed
        self.start, self.before = 0, {}  # steps done before this invocation; held-out figures at step 0
        self.last_loss = float("nan")
        self.metrics: MetricsWriter | None = None  # rank 0 only

    # ------------------------------------------------------------------ validate
    def validate(self) -> None:
        """Refuse bad settings, an adapter profile, missing data and a mismatched --resume; nothing is written."""
        _validate(self.steps, self.cfg, self.lake)
        self.profile = get_profile(self.profile_name)
        if self.profile.mllm_adapter:
            raise UserError(f"profile {self.profile.name!r} already names an MLLM adapter "
                            f"({self.profile.mllm_adapter}); fine-tuning starts from the base MLLM. "
                            "Remove mllm_adapter from the profile's TOML.")
        self.shards = list_edit_shards(self.data)
        self.rank, self.world, self.local_rank = dist_env()
        self.fingerprint = fingerprint(self.cfg, exclude=FinetuneConfig.RUN_KNOBS)
        self.info = open_run(self.run_dir, self.resume,
                             {"fingerprint": self.fingerprint, "profile": self.profile.name,
                              "models": self.profile.model_ids(), "world_size": self.world},
                             "Resume with the same --config, --profile and number of ranks.")

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """The process group, the data plan and loader, and the MLLM in its engine (AdamW, warm-up + cosine)."""
        cfg = self.cfg
        self.device, bf16, self.dtype = init_distributed(self.local_rank, cfg.precision)
        self.plan = self._data_plan()
        self.loader = EditLoader(self.plan, rank=self.rank, world_size=self.world, batch_size=cfg.batch_size,
                                 seed=cfg.seed, heldout_fraction=cfg.heldout_fraction,
                                 shuffle_blocks=cfg.shuffle_blocks)
        horizon = int(self.info["schedule_steps"]) if self.info is not None else (cfg.schedule_steps or self.steps)
        self.horizon = horizon
        self.encoder = GuidanceEncoder(self.profile, self.device, self.dtype)
        self.batcher = Batcher(self.encoder, cfg)
        model = _trainable_model(self.encoder, cfg)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=tuple(cfg.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, horizon, cfg.warmup_ratio, cfg.schedule))
        self.engine = build_engine(model, optimizer, cfg, self.world, bf16, lr_scheduler=scheduler)

    def _data_plan(self) -> EditPlan:
        """The checked input: planned by every rank on a new run; a resume reads it back and refuses changed shards."""
        if self.info is not None:
            plan = EditPlan.from_json((self.run_dir / "data_plan.json").read_text())
            changed = shards_changed(plan, self.shards)
            if changed:
                raise UserError(f"--resume: the data changed since the run started ({', '.join(changed[:3])}). "
                                "Resume on the same --data, or start a new --run-dir.")
            return plan
        part = plan_shards(self.shards, self.rank, self.world)
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        return gather_plans(parts)

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Resume from the last complete checkpoint, or record a new run and its held-out "before" figures;
        then open the metrics (rank 0)."""
        if self.info is not None:
            self._load_checkpoint()
        else:
            self._record_new_run()
            self.before = self.evaluate()
        self.meta = {"profile": self.profile.name, "base_mllm": self.profile.mllm.id,
                     "mllm_hidden": self.profile.dims.mllm_hidden, "run_id": self.run_id, "method": self.cfg.method}
        if self.rank != 0:
            return
        # On resume, rows of steps >= start are already in the table (flushed at or after that checkpoint).
        self.metrics = MetricsWriter(str(self.lake), self.run_id,
                                     after_step=self.start - 1 if self.info is not None else None)
        if self.info is None:
            for name, value in self.before.items():
                self.metrics.add(0, f"{name}_before", value)
        plan, loader = self.plan, self.loader
        log.info("run %s: %d usable records (%d train, %d held out), %d quarantined; %s, %d steps/epoch, %d rank(s), "
                 "%s on %s; held-out before: %s", self.run_id, len(plan.good), len(loader.train_refs),
                 len(loader.heldout_refs), len(plan.quarantine), self.cfg.method, loader.steps_in_epoch(loader.epoch),
                 self.world, self.dtype, self.device, self.before)

    def _load_checkpoint(self) -> None:
        """Engine, loader position, this rank's RNG and the "before" figures from the checkpoint the pointer names."""
        tag = (self.run_dir / "latest_checkpoint").read_text().strip()
        ck = load_engine_checkpoint(self.engine, self.run_dir, tag,
                                    load_module_strict=False)  # frozen weights are not in it
        state = json.loads((ck / "state.json").read_text())
        self.loader.load_state_dict(state["loader"])
        load_rng(ck / f"rng_rank{self.rank}.safetensors")
        self.start, self.before, self.run_id = int(state["step"]), state["before"], self.info["run_id"]
        log.info("resumed %s from %s (step %d)", self.run_id, tag, self.start)

    def _record_new_run(self) -> None:
        """A run id shared by every rank; rank 0 writes data_plan.json, run.json and the quarantined records."""
        self.run_id = new_run_id(self.run_dir, self.world)
        if self.rank != 0:
            return
        plan, loader, shards, profile = self.plan, self.loader, self.shards, self.profile
        data_key = shards[0].uri if len(shards) == 1 else os.path.dirname(os.path.commonprefix([s.uri for s in shards]))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "data_plan.json").write_text(plan.to_json())
        (self.run_dir / "run.json").write_text(json.dumps({
            "run_id": self.run_id, "fingerprint": self.fingerprint, "profile": profile.name,
            "models": profile.model_ids(), "world_size": self.world, "data": data_key, "lake": str(self.lake),
            "schedule_steps": self.horizon, "config": dataclasses.asdict(self.cfg), "records": len(plan.good),
            "quarantined": len(plan.quarantine), "train_records": len(loader.train_refs),
            "heldout_records": len(loader.heldout_refs),
        }, indent=2, sort_keys=True, default=str) + "\n")
        write_quarantine(str(self.lake), self.run_id, plan.quarantine)

    # ------------------------------------------------------------------ step and checkpoint
    def train(self) -> None:
        """step() from the restored step to ``steps``; checkpoint() every checkpoint_every steps and at the last."""
        self._t0 = self._win_t = time.perf_counter()
        self._win_steps = 0
        self.engine.train()
        batches = iter(self.loader)
        with progress_bar(self.rank, "fine-tune", total=self.steps, completed=self.start) as advance:
            for step in range(self.start + 1, self.steps + 1):
                self.step(step, batches)
                advance(step)
                if step % self.cfg.checkpoint_every == 0 or step == self.steps:
                    self.checkpoint(step)

    def step(self, step: int, batches: Iterator[list[EditRecord]]) -> None:
        """Optimizer step ``step``: ``grad_accum`` micro-batches, the loss averaged over ranks, metrics, log."""
        cfg, engine = self.cfg, self.engine
        total = torch.zeros(1, dtype=torch.float64)
        for _ in range(cfg.grad_accum):
            records = next(batches)  # the loader's epoch is now that of this batch
            loss, _ = answer_loss(engine, _to(self.batcher(records, self.loader.epoch), self.device, self.dtype))
            engine.backward(loss)
            engine.step()
            total += loss.detach().double().cpu() / cfg.grad_accum
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        self.last_loss = total.item()
        self._win_steps += 1
        if self.metrics is not None:
            self.metrics.add(step, "loss", self.last_loss)
        if step % cfg.log_every == 0 or step == self.steps:
            dt = time.perf_counter() - self._win_t
            rate = self._win_steps * cfg.batch_size * cfg.grad_accum * self.world / max(dt, 1e-9)
            self._win_t, self._win_steps = time.perf_counter(), 0
            if self.metrics is not None:
                self.metrics.add(step, "samples_per_s", rate)
                self.metrics.add(step, "lr", engine.get_lr()[0])
                log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, self.steps, self.last_loss,
                         engine.get_lr()[0], rate)

    def checkpoint(self, step: int) -> None:
        """Every rank's trainable state and RNG, rank 0's adapter and state.json; the pointer moves once all are durable."""
        tag = checkpoint_tag(step)
        ck = self.run_dir / "checkpoints" / tag
        if self.metrics is not None:
            commit_to_lake(str(self.lake), self.metrics.flush)
        self.engine.save_checkpoint(str(self.run_dir / "checkpoints"), tag=tag, exclude_frozen_parameters=True)
        ck.mkdir(parents=True, exist_ok=True)
        save_rng(ck / f"rng_rank{self.rank}.safetensors")
        if self.rank == 0:
            if self.cfg.method == "lora":
                _save_adapter(self.engine.module, ck / "adapter", {**self.meta, "step": step})
            (ck / "state.json").write_text(json.dumps({"step": step, "loader": self.loader.state_dict(),
                                                        "before": self.before, "run_id": self.run_id}, indent=2))
        commit_checkpoint(self.run_dir, tag, self.cfg.keep_checkpoints, self.rank)

    # ------------------------------------------------------------------ evaluate and finish
    def evaluate(self) -> dict[str, float]:
        """Held-out answer loss and exact-match rate of the model as it is now (``evaluate_heldout``)."""
        return evaluate_heldout(self.engine.module, self.batcher, self.loader, self.cfg, self.device, self.dtype,
                                self.world)

    def finish(self, after: dict[str, float]) -> FinetuneSummary:
        """Record the "after" figures, write the adapter (and merged/) on rank 0, and summarise the run."""
        after = {"heldout_loss_after" if k == "heldout_loss" else k: v for k, v in after.items()}
        final = max(self.steps, self.start)
        heldout = {**{f"{k}_before": v for k, v in self.before.items()}, **after}
        if self.metrics is not None:
            for name, value in after.items():
                self.metrics.add(final, name, value)
            commit_to_lake(str(self.lake), self.metrics.flush)
        if self.rank == 0:
            self._save_outputs(final)
        dist.barrier()
        seconds = time.perf_counter() - self._t0
        done = max(self.steps - self.start, 0)
        cfg, plan = self.cfg, self.plan
        output = self.run_dir / ("adapter" if cfg.method == "lora" else "merged")
        return FinetuneSummary(run_id=self.run_id, method=cfg.method, steps=final, resumed_from=self.start,
                               seconds=seconds,
                               samples_per_s=done * cfg.batch_size * cfg.grad_accum * self.world / max(seconds, 1e-9),
                               final_loss=self.last_loss, records=len(plan.good), quarantined=len(plan.quarantine),
                               heldout=heldout, output=str(output))

    def _save_outputs(self, final: int) -> None:
        """LoRA: the adapter (and merged/ with --merge); full: merged/, the whole fine-tuned MLLM."""
        module, run_dir = self.engine.module, self.run_dir
        if self.cfg.method == "lora":
            _save_adapter(module, run_dir / "adapter", {**self.meta, "step": final})
            if self.merge:
                export_merged(self.profile, run_dir / "adapter", run_dir / "merged")
        else:
            _save_folder(run_dir / "merged", lambda d: (module.save_pretrained(d, safe_serialization=True),
                                                        self.encoder.processor.save_pretrained(d)))
