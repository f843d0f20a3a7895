"""``img infer``: prompts -> the base image plus one IMG regeneration per round, as PNGs and ``generations`` rows.

    img infer --profile tiny --prompt "a red circle left of a blue star" --seed 3 --rounds 2 --lake lake --out out
    img infer --profile sdxl --aligner ckpts/ --prompts prompts.txt --out out/sdxl --lake lake
    img infer --profile flux --aligner ckpts/aligner_flux.pth --prompt "..." --out out/flux

``--prompts`` is a text file (one prompt per line; blank lines are skipped) or a
JSON list of strings. ``--questions FILE`` (or ``questions = "FILE"`` in the
``--config`` TOML, default ``jobs/infer.toml``) replaces our question pool with a
JSON list of templates with ``{prompt}``, such as the authors' list. Files are ``<out>/<prompt_idx>-<slug>-seed<S>-round<R>.png``
(round 0 = the base model's image); the same command writes the same names and,
on the same machine, the same pixels. Everything is checked before the first
step (prompts, profile, settings, the aligner and its dims, the models' presence,
the lake table, ``--out`` writability); a mistake is one line and exit 2 with
nothing written. PNGs are written via a temporary file and a rename; a prompt's
rows are appended to ``<lake>/generations.lance`` in one commit after its images
are on disk. Python::

    from img.inference.infer import run_infer
    summary = run_infer(["a red circle"], "tiny", "out", seed=3, rounds=2, lake="lake")
    summary = run_infer(["a red circle"], "tiny", "out", questions="edit_instructions.json")
    summary = run_infer(["a red circle"], "tiny", "out", settings=GenerationSettings(steps=20, passes=1))

``run_infer`` is three steps, usable one by one::

    plan = validate(["a red circle"], "tiny", "out", seed=3)   # every check; UserError before any write
    pipe = load(plan)                                          # the models
    run_id, seconds = run(plan, pipe)                          # PNGs (+ rows with lake=...)
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from img.errors import UserError
from img.finetune.adapter import with_mllm_adapter
from img.inference.generation import GenerationSettings, IMGPipeline, load_aligner, released_resampler
from img.lake.lock import writer_lock
from img.lake.tables import append_rows, open_table, table_uri
from img.logs import quiet_loading, quiet_logger
from img.models.loading import locate
from img.models.profiles import Profile, get_profile
from img.paths import check_lake_folder, check_writable_folder
from img.progress import progress_bars
from img.questions import resolve_questions
from schemas import generations
from schemas.meta import read_provenance, with_provenance

log = logging.getLogger(__name__)

STAGES = ("base", "ip", "mllm", "aligner", "regen")


@dataclass
class InferConfig:
    """Keys of the ``img infer --config`` TOML (default ``jobs/infer.toml``); unknown keys are errors."""

    # JSON list of question templates with "{prompt}" (e.g. the authors' 100 questions); None = our own pool
    questions: Optional[str] = None


# ----------------------------------------------------------------------------- inputs
def read_prompts(prompt: Optional[str] = None, prompts_file: Optional[str | Path] = None) -> list[str]:
    """The prompts of ``--prompt`` or ``--prompts`` (exactly one of them); ``UserError`` if none is usable."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("pass exactly one of `prompt` (a text) or `prompts_file` (a file of prompts).")
    if prompt is not None:
        if not prompt.strip():
            raise UserError("`prompt` is empty. Pass a non-empty text prompt, e.g. \"a red circle\".")
        return [prompt.strip()]
    path = Path(prompts_file).expanduser()  # type: ignore[arg-type]
    if not path.is_file():
        raise UserError(f"`prompts_file` {str(path)!r} is not a file. Pass a text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"`prompts_file` {str(path)!r} cannot be read as UTF-8 text ({e}).") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"`prompts_file` {str(path)!r} is not valid JSON ({e}). Use a JSON list of strings.") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise UserError(f"`prompts_file` {str(path)!r} must hold a JSON list of strings.")
        lines = data
    else:
        lines = text.splitlines()
    prompts = [p.strip() for p in lines if p.strip()]
    if not prompts:
        raise UserError(f"`prompts_file` {str(path)!r} has no non-empty prompt. Put one prompt per line.")
    return prompts


def slug(text: str, max_len: int = 40) -> str:
    """Lower-case ASCII words joined by '-', at most ``max_len`` characters (``"prompt"`` if nothing is left)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return s or "prompt"


def image_name(prompt_idx: int, prompt: str, seed: int, round_: int) -> str:
    """``<prompt_idx:04d>-<slug>-seed<S>-round<R>.png``: deterministic, sorted by prompt then round."""
    return f"{prompt_idx:04d}-{slug(prompt)}-seed{seed}-round{round_}.png"


def check_out_dir(out: Path) -> list[Path]:
    """Create ``out`` if needed once a write probe proved it writable; returns the folders created (for clean-up)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {str(out)!r} exists and is not a folder. Pass a folder path.")
    check_writable_folder(out, "`out`")
    created: list[Path] = []
    p = out.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove folders we created, innermost first, if they are still empty."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            break


def check_lake(lake: str) -> None:
    """The lake must be writable and any ``generations`` table in it must have this schema."""
    import pyarrow as pa


    check_lake_folder(lake)  # a real write probe (os.access says yes to root on a read-only folder)
    try:
        ds = open_table(lake, "generations")
    except Exception as e:  # a broken table
        raise UserError(f"{table_uri(lake, 'generations')} cannot be opened ({e}). Use another `lake`.") from None
    if ds is None:
        return
    have = read_provenance(ds.schema)["schema_version"]
    want_schema = pa.schema(list(generations.SCHEMA))
    have_schema = pa.schema(list(ds.schema))
    if have != generations.VERSION or not have_schema.equals(want_schema):
        raise UserError(
            f"{table_uri(lake, 'generations')} has generations schema v{have}, this img writes "
            f"v{generations.VERSION}. Use another `lake`, or move the old table away."
        )


def generations_schema():

    return with_provenance(generations.SCHEMA, table="generations", version=generations.VERSION)


def write_png(image: Any, path: Path) -> None:
    """Write ``image`` as PNG via a temporary file in the same folder and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- summary
@dataclass
class InferSummary:
    """What ``img infer`` did and where its time went (seconds)."""

    profile: str
    aligner_id: str
    prompts: int
    rounds: int
    images: int
    out: str
    lake: Optional[str]
    run_id: str
    wall_s: float
    load_s: float
    stages: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def mllm_share(self) -> float:
        """MLLM time / all inference time (base + IP + MLLM + aligner + regeneration)."""
        total = sum(self.stages.get(k, 0.0) for k in STAGES)
        return self.stages.get("mllm", 0.0) / total if total > 0 else 0.0

    def render(self) -> str:
        st = ", ".join(f"{k} {self.stages.get(k, 0.0):.2f}s" for k in STAGES)
        lines = [
            f"img infer: {self.prompts} prompt(s) x (1 + {self.rounds} round(s)) = {self.images} image(s) in {self.out}"
            + (f"; {self.images} row(s) appended to {self.lake}/generations.lance" if self.lake else ""),
            f"profile {self.profile}, aligner {self.aligner_id}, run {self.run_id}",
            f"time: wall {self.wall_s:.2f}s (loading {self.load_s:.2f}s); {st}",
            f"MLLM share of inference time: {100 * self.mllm_share:.1f}% (paper: ~4% for LLaVA-13B + SDXL on GPU; "
            "at tiny scale this number says nothing)" if self.profile in ("tiny", "bench")
            else f"MLLM share of inference time: {100 * self.mllm_share:.1f}% (paper: ~4%)",
        ]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "mllm_share": self.mllm_share}, indent=2)


# ----------------------------------------------------------------------------- the job
class _Progress:
    """Progress bars (``img.progress``) over prompts and, below it, the diffusion steps of the current image."""

    def __init__(self, n_prompts: int, steps: int, rounds: int, enabled: bool) -> None:
        self.per_prompt = steps * (1 + rounds)
        self.bar = progress_bars(enabled, width=28)
        self.prompts = self.bar.add_task("prompts", total=n_prompts)
        self.steps = self.bar.add_task("diffusion steps", total=self.per_prompt)
        self.round = 0

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start_prompt(self, idx: int, prompt: str) -> None:
        self.round = 0
        self.bar.reset(self.steps, total=self.per_prompt, description="base image")

    def on_step(self, stage: str, step: int, total: int) -> None:
        if stage == "regen" and step == 1:
            self.round += 1
        desc = "base image" if stage == "base" else f"regeneration, round {self.round}"
        self.bar.update(self.steps, advance=1, description=desc)

    def end_prompt(self) -> None:
        self.bar.advance(self.prompts)


def _rows(result: Any, idx: int, paths: list[Path], profile: Any, aligner_id: str, run_id: str,
          model_ids: str, created: datetime) -> list[dict[str, Any]]:
    s = result.settings
    common = dict(run_id=run_id, prompt_idx=idx, prompt=result.prompt, seed=result.seed, profile=profile.name,
                  aligner_id=aligner_id, steps=s.steps, guidance_scale=float(s.guidance_scale),
                  ip_scale=float(s.ip_scale), passes=s.passes, negative_prompt=s.negative_prompt,
                  model_ids=model_ids, created_at=created)
    rows = [dict(common, generation_id=f"{run_id}-{idx}-r0", round=0, path=str(paths[0]), question="",
                 t_base_s=result.t_base_s, t_ip_s=0.0, t_mllm_s=0.0, t_aligner_s=0.0, t_regen_s=0.0)]
    for r in result.rounds:
        rows.append(dict(common, generation_id=f"{run_id}-{idx}-r{r.round}", round=r.round, path=str(paths[r.round]),
                         question=r.question, t_base_s=0.0, t_ip_s=r.t_ip_s, t_mllm_s=r.t_mllm_s,
                         t_aligner_s=r.t_aligner_s, t_regen_s=r.t_regen_s))
    return rows


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"`device` {device!r} is not a torch device. Use auto, cpu, cuda or cuda:N.") from None
    return device


def _set_threads(profile: Any, device: str) -> Optional[int]:
    """Tiny profiles on CPU run single-threaded; returns the previous thread count to restore (or None).

    Their ops take microseconds, so intra-op threads only add fork/join cost, and on a busy machine a
    spinning OpenMP thread stalls every op: measured 7.9 s vs 55 s for the same 60-step command on 2 loaded
    cores. ``OMP_NUM_THREADS`` (if set) wins; real profiles keep torch's default.
    """
    import torch

    if not profile.tiny or torch.device(device).type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


def _restore_threads(previous: Optional[int]) -> None:
    """Undo ``_set_threads``."""
    if previous is not None:
        import torch

        torch.set_num_threads(previous)


def check_models(profile: Any, aligner: Optional[str | Path]) -> tuple[Any, str]:
    """Check that every model of ``profile`` is present, then load the aligner: (aligner, aligner id).

    Cheap checks first (a fresh tiny aligner, or "pass --aligner"; each component located, ``ModelNotFound``
    naming the env var / TOML key to set), the real aligner (~0.8 GB) last.
    """

    if aligner is None:
        model, aid = load_aligner(profile, None)
    for comp in profile.components():
        locate(profile, comp)
    if aligner is not None:
        model, aid = load_aligner(profile, aligner)
    return model, aid


def load_pipeline(profile: Any, aligner: Optional[str | Path], aligner_model: Any, aligner_id: str,
                  device: str, questions: Any = None) -> Any:
    """The ``IMGPipeline`` of ``profile`` on ``device`` with the aligner of ``check_models``, quietly.

    ``aligner`` is the user's path: an SDXL folder holding the released ``resampler.pth`` makes ``c_I`` with it.
    ``questions``: the MLLM question pool (``img.questions.resolve_questions``); None = our own.
    """
    quiet_loading()
    with quiet_logger("transformers"):
        return IMGPipeline.from_profile(profile, aligner=aligner_model, device=device, aligner_id=aligner_id,
                                        resampler=released_resampler(aligner, profile), questions=questions)


def save_generation(result: Any, prompt_idx: int, out_dir: Path, *, profile: Any, aligner_id: str, run_id: str,
                    model_ids: str, lake: Optional[str] = None, written: Optional[list[str]] = None,
                    job: str = "infer", break_lock: bool = False) -> list[Path]:
    """Write the PNGs of one ``IMGResult`` (round 0 = base) and, with ``lake``, append its ``generations`` rows.

    The rows go in one commit after every PNG is on disk, under the lake's writer lock (``job`` names the
    holder; ``break_lock`` takes a stuck object-store lease); ``written`` collects each file as it lands.
    Shared by ``img infer`` and ``img serve``::

        paths = save_generation(result, 0, Path("out"), profile=prof, aligner_id=pipe.aligner_id,
                                run_id="r1", model_ids=json.dumps(prof.model_ids()), lake="lake")
    """
    paths = [(out_dir / image_name(prompt_idx, result.prompt, result.seed, r)).absolute()
             for r in range(len(result.images))]
    for image, path in zip(result.images, paths):
        write_png(image, path)
        if written is not None:
            written.append(str(path))
    if lake is not None:
        import pyarrow as pa

        schema = generations_schema()
        rows = _rows(result, prompt_idx, paths, profile, aligner_id, run_id, model_ids, datetime.now(timezone.utc))
        with writer_lock(str(lake), job=job, break_lock=break_lock):
            append_rows(str(lake), "generations", pa.Table.from_pylist(rows, schema=schema), schema)
    return paths


# ----------------------------------------------------------------------------- validate / load / run
@dataclass
class InferPlan:
    """What ``img infer`` will do, checked by ``validate`` before anything is written."""

    prompts: list[str]
    profile: Profile
    settings: GenerationSettings  # resolved against the profile
    seed: int
    rounds: int
    device: str
    aligner: Optional[str | Path]  # the user's source: an SDXL folder may hold the released resampler.pth
    aligner_model: Any  # the loaded ImplicitAligner
    aligner_id: str
    questions: Optional[tuple[str, ...]]  # None = our own pool
    out_dir: Path
    created: list[Path]  # folders made for out_dir, removed again if nothing gets written
    lake: Optional[str]


def validate(prompts: list[str], profile: str, out: str | Path, *, aligner: Optional[str | Path] = None,
             seed: int = 0, rounds: int = 1, lake: Optional[str] = None,
             settings: Optional[GenerationSettings] = None, device: str = "cpu",
             questions: Optional[str | Path] = None, mllm_adapter: Optional[str | Path] = None) -> InferPlan:
    """Everything a user can get wrong, cheapest first; ``UserError`` before anything is written.

    Loads the aligner (its dims are checked) and creates ``out`` once a write probe passed. ``mllm_adapter``:
    a fine-tuned MLLM adapter (``img jobs finetune-mllm``) used in place of the profile's MLLM.
    """
    if not prompts or any(not p.strip() for p in prompts):
        raise UserError("a prompt is empty. Pass non-empty prompts (`prompt` or `prompts_file`).")
    if rounds < 0:
        raise UserError(f"`rounds` must be >= 0, got {rounds}. 1 is the paper's setting.")
    prof = with_mllm_adapter(get_profile(profile), mllm_adapter)
    pool = resolve_questions(questions)
    dev = resolve_device(device)
    aligner_model, aid = check_models(prof, aligner)
    wanted = settings or GenerationSettings()
    if wanted.passes is None:  # the aligner's own pass count (its config.json), unless --passes overrides it
        wanted = wanted.override(passes=aligner_model.config.passes)
    resolved = wanted.resolve(prof)
    if lake is not None:
        check_lake(str(lake))
    out_dir = Path(out).expanduser()
    created = check_out_dir(out_dir)
    return InferPlan(list(prompts), prof, resolved, seed, rounds, dev, aligner, aligner_model, aid, pool, out_dir,
                     created, str(lake) if lake is not None else None)


def load(plan: InferPlan) -> IMGPipeline:
    """The plan's ``IMGPipeline``; ``plan.aligner_id`` becomes the pipeline's (a released resampler adds to it)."""
    pipe = load_pipeline(plan.profile, plan.aligner, plan.aligner_model, plan.aligner_id, plan.device,
                         questions=plan.questions)
    plan.aligner_id = pipe.aligner_id
    return pipe


def run(plan: InferPlan, pipe: IMGPipeline, *, progress: bool = True, break_lock: bool = False,
        written: Optional[list[str]] = None) -> tuple[str, dict[str, float]]:
    """Each prompt in turn: generate, write its PNGs, append its rows. Returns (run id, seconds per stage).

    ``written`` collects every file as it lands; ``break_lock`` applies to the first write only.
    """
    run_id = uuid.uuid4().hex[:12]
    model_ids = json.dumps(plan.profile.model_ids(), sort_keys=True)
    stages = {k: 0.0 for k in STAGES}
    with _Progress(len(plan.prompts), plan.settings.steps, plan.rounds, progress) as bar:
        for idx, prompt in enumerate(plan.prompts):
            bar.start_prompt(idx, prompt)
            result = pipe(prompt, seed=plan.seed, rounds=plan.rounds, settings=plan.settings, on_step=bar.on_step)
            for k, v in result.timings().items():
                if k in stages:
                    stages[k] += v
            save_generation(result, idx, plan.out_dir, profile=plan.profile, aligner_id=plan.aligner_id,
                            run_id=run_id, model_ids=model_ids, lake=plan.lake, written=written,
                            break_lock=break_lock)
            break_lock = False
            bar.end_prompt()
    return run_id, stages


def run_infer(
    prompts: list[str],
    profile: str,
    out: str | Path,
    *,
    aligner: Optional[str | Path] = None,
    seed: int = 0,
    rounds: int = 1,
    lake: Optional[str] = None,
    settings: Optional[GenerationSettings] = None,
    device: str = "cpu",
    progress: bool = True,
    questions: Optional[str | Path] = None,
    break_lock: bool = False,
    mllm_adapter: Optional[str | Path] = None,
) -> InferSummary:
    """``validate``, ``load``, ``run``: for each prompt the base image and ``rounds`` regenerations, as PNGs and
    ``generations`` rows.

    ``settings``: the generation settings (None fields, or None: the profile's).
    ``questions``: a JSON file of question templates (``img.questions.load_questions``); None = our pool.
    Each append to ``generations`` holds the lake's writer lock (``break_lock`` applies to the first).
    """
    t_start = time.perf_counter()
    plan = validate(prompts, profile, out, aligner=aligner, seed=seed, rounds=rounds, lake=lake, settings=settings,
                    device=device, questions=questions, mllm_adapter=mllm_adapter)
    written: list[str] = []
    threads = _set_threads(plan.profile, plan.device)
    try:
        t_load = time.perf_counter()
        pipe = load(plan)
        load_s = time.perf_counter() - t_load
        log.info("loaded %s on %s in %.1fs (aligner %s)", plan.profile.name, plan.device, load_s, plan.aligner_id)
        run_id, stages = run(plan, pipe, progress=progress, break_lock=break_lock, written=written)
    except BaseException:
        if not written:
            remove_empty(plan.created)
        raise
    finally:
        _restore_threads(threads)
    return InferSummary(
        profile=plan.profile.name, aligner_id=plan.aligner_id, prompts=len(plan.prompts), rounds=rounds,
        images=len(written), out=str(plan.out_dir), lake=plan.lake, run_id=run_id,
        wall_s=time.perf_counter() - t_start, load_s=load_s, stages=stages, files=written,
    )
