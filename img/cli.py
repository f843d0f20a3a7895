"""The ``img`` command line.

    img data sample --out data/sample --pairs 2000 --seed 0
    img profile check tiny
    img sql --lake lake "select count(*) from pairs"
    img jobs embed --dataset pickapic --source data/sample --profile tiny --lake lake
    img jobs train --lake lake --profile tiny --steps 200 --run-dir runs/r1
    img infer --profile tiny --prompt "a red circle" --out out
    img lake vacuum --lake lake --older-than 1h

Every command has ``--help``. A user's mistake raises ``UserError``; ``main``
prints it as one line and exits 2, with no traceback.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from img.errors import UserError

# Each command imports its own stack (Ray, DeepSpeed, diffusers) inside its function, so `img --help`
# and `img sql` start in well under a second and `img infer` never loads Ray or DeepSpeed.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="IMG: Implicit Multimodal Guidance - embed, train, infer, query.")
data_app = typer.Typer(no_args_is_help=True, help="Input data: the bundled Pick-a-Pic-format sample.")
profile_app = typer.Typer(no_args_is_help=True, help="Model profiles: what every job loads.")
jobs_app = typer.Typer(no_args_is_help=True, help="Batch jobs: embed (Ray Data) and train (DeepSpeed).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON.")
lake_app = typer.Typer(no_args_is_help=True, help="Lake housekeeping.")
app.add_typer(data_app, name="data")
app.add_typer(profile_app, name="profile")
app.add_typer(jobs_app, name="jobs")
app.add_typer(bench_app, name="bench")
app.add_typer(lake_app, name="lake")

BREAK_LOCK_HELP = ("Object-store lake: take the writer lease from a holder that is alive but stuck (a dead holder's "
                   "lease expires by itself). Without it a second writer waits for the lock.")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "ray", "diffusers", "transformers", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _stdout_to_stderr():
    """While a benchmark runs, anything libraries print to stdout (DeepSpeed's accelerator notice, Ray) goes to
    stderr, at the file-descriptor level, so stdout carries exactly one JSON document."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # Python-level writers too (loggers made meanwhile)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


# ---------------------------------------------------------------- data
@data_app.command("sample")
def data_sample(
    out: Path = typer.Option(..., "--out", help="Folder to write parquet shards into (created)."),
    pairs: int = typer.Option(2000, "--pairs", help="Number of rows (pairs) to draw."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    corrupt: float = typer.Option(0.0, "--corrupt", help="Fraction of rows whose JPEG bytes are corrupted."),
    ties: float = typer.Option(0.1, "--ties", help="Fraction of rows that are ties (label_0 = 0.5)."),
    shard_rows: int = typer.Option(500, "--shard-rows", help="Rows per parquet shard."),
    fmt: str = typer.Option("sample", "--format", help="sample: published columns + `broken` + provenance; "
                            "pickapic: exactly the published Pick-a-Pic v2 columns, HF shard names and row groups."),
    row_group_rows: Optional[int] = typer.Option(None, "--row-group-rows",
                                                 help="Rows per parquet row group (default: a shard; 100 for pickapic)."),
) -> None:
    """Write a procedurally drawn shapes-world sample with Pick-a-Pic v2 columns."""
    from img.data.sample import write_sample

    summary = write_sample(out, pairs=pairs, seed=seed, corrupt=corrupt, ties=ties, shard_rows=shard_rows,
                           fmt=fmt, row_group_rows=row_group_rows)
    typer.echo(summary)


# ---------------------------------------------------------------- profile
@profile_app.command("check")
def profile_check(
    name: str = typer.Argument(..., help="Profile name: tiny, sdxl, sdxl-dpo, flux, qwen, ..."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build real-size architectures on the meta device; no weights."),
) -> None:
    """Report, component by component, what a profile resolves to."""
    from img.app.profile_check import check

    raise typer.Exit(check(name, dry_run=dry_run))


@profile_app.command("list")
def profile_list() -> None:
    """List the known profiles."""
    from img.models.profiles import ALIASES, PROFILES

    for name, p in PROFILES.items():
        d = p.dims
        typer.echo(f"{name:13s} {p.family:5s} N x D = {d.ip_tokens} x {d.ip_dim:<5d} E = {d.mllm_hidden:<5d} {p.description}")
    typer.echo("aliases: " + ", ".join(f"{a} -> {b}" for a, b in ALIASES.items()))


# ---------------------------------------------------------------- sql
@app.command("sql")
def sql(
    query: str = typer.Argument(..., help="A read-only SQL query (DuckDB dialect)."),
    lake: Path = typer.Option(Path("lake"), "--lake", help="Lake folder whose Lance tables become views."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of row objects."),
    source: Optional[Path] = typer.Option(None, "--source", help="Also expose these parquet shards as view `source`."),
    memory_limit: str = typer.Option("2GB", "--memory-limit", help="DuckDB's memory limit (nothing spills to disk)."),
) -> None:
    """Run a read-only DuckDB query over every table in the lake."""
    from img.lake.sql import run_query

    typer.echo(run_query(str(lake), query, as_json=as_json, source=str(source) if source else None,
                         memory_limit=memory_limit))


# ---------------------------------------------------------------- jobs
@jobs_app.command("embed")
def jobs_embed(
    dataset: str = typer.Option("pickapic", "--dataset", help="Dataset format of --source. Only 'pickapic'."),
    source: str = typer.Option(..., "--source", help="Folder or URI of Pick-a-Pic v2 parquet shards."),
    profile: str = typer.Option("tiny", "--profile", help="Model profile."),
    lake: str = typer.Option(..., "--lake", help="Lake folder or object-store URI (Lance)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Embed at most N input rows."),
    config: Optional[Path] = typer.Option(None, "--config", help="Embed TOML (default: jobs/embed.toml settings)."),
    new_table: bool = typer.Option(False, "--new-table", help="Replace tables made with a different config fingerprint."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON."),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
) -> None:
    """Embed every decisive preference pair once into Lance tables (Ray Data).

    The run holds the lake's writer lock; a second writer on the same lake waits for it.
    """
    if dataset != "pickapic":
        raise UserError(f"--dataset {dataset!r} is not supported. Use --dataset pickapic.")
    from img.config import load_config, project_file
    from pipelines.embed import run_embed, summary_json
    from pipelines.embed_config import EmbedConfig

    cfg = load_config(EmbedConfig, config if config is not None else project_file("embed.toml"),
                      overrides={"limit": limit})
    summary = run_embed(source, lake, profile, cfg, new_table=new_table, break_lock=break_lock)
    typer.echo(summary.render())
    if as_json:
        typer.echo(summary_json(summary))


@jobs_app.command("train")
def jobs_train(
    lake: str = typer.Option(..., "--lake", help="Lake written by `img jobs embed`."),
    profile: str = typer.Option("tiny", "--profile", help="Model profile (dims)."),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Folder for checkpoints and logs."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the last checkpoint in --run-dir."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps."),
    config: Optional[Path] = typer.Option(None, "--config", help="Train TOML (default: jobs/train.toml settings)."),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
) -> None:
    """Train the Implicit Aligner on cached tensors with DeepSpeed.

    --steps is the run's total; with --resume the run continues from its last checkpoint up to it.
    """
    from img.config import load_config
    from img.training.trainer import DEFAULT_CONFIG, TrainConfig, run_training

    cfg_path = config if config is not None else DEFAULT_CONFIG
    cfg = load_config(TrainConfig, cfg_path, overrides={"checkpoint_every": checkpoint_every})
    summary = run_training(lake, profile, steps, run_dir, cfg, resume=resume, break_lock=break_lock)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(summary.render())


@bench_app.command("embed")
def bench_embed(
    pairs: Optional[int] = typer.Option(None, "--pairs", help="Pairs in the generated sample (default 1024; "
                                        "200 with --row-size real, 6.8 MB each)."),
    profile: str = typer.Option("bench", "--profile", help="Profile whose models do the work (not with --row-size real)."),
    fmt: str = typer.Option("sample", "--format", help="Sample format, as in `img data sample --format`: "
                            "sample or pickapic (exactly the published columns)."),
    row_size: str = typer.Option("bench", "--row-size", help="bench: the bench profile's models and rows; real: "
                                 "stand-in stages write rows of the real size (guidance 650 x 5120) through the "
                                 "same pipeline."),
    guidance_dtype: str = typer.Option("fp16", "--guidance-dtype", help="Guidance on disk: fp16 or fp8."),
    config: Optional[Path] = typer.Option(None, "--config", help="Embed TOML (default jobs/embed.toml; at real row "
                                          "size with fragment/read/writer settings of jobs/embed_gpu.toml)."),
    rows_per_fragment: Optional[int] = typer.Option(None, "--rows-per-fragment", help="Override rows_per_fragment "
                                                    "(and read_rows) of the config."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Folder for the temporary sample and lakes "
                                           "(default: system temp; removed at the end)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON figures."),
) -> None:
    """Embed job (Ray + Lance) vs a bare in-process loop over the same models and data."""
    if row_size not in ("bench", "real"):
        raise UserError(f"--row-size must be 'bench' or 'real', got {row_size!r}.")
    pairs = pairs if pairs is not None else (200 if row_size == "real" else 1024)
    if pairs < 8:
        raise UserError(f"--pairs must be >= 8, got {pairs}. Pass a larger sample size.")
    with _stdout_to_stderr():
        from img.app.bench_embed import run_bench

        result = run_bench(pairs=pairs, profile_name=profile, fmt=fmt, row_size=row_size,
                           guidance_dtype=guidance_dtype, config=str(config) if config else None,
                           workdir=str(workdir) if workdir else None, rows_per_fragment=rows_per_fragment)
    if not as_json:
        typer.echo(f"job {result['job_pairs_per_s']} pairs/s, bare {result['bare_pairs_per_s']} pairs/s, "
                   f"ratio {result['ratio']}, bytes_ratio {result['bytes_ratio']}")
    import json

    typer.echo(json.dumps(result, indent=2))


@app.command("infer")
def infer(
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One text prompt."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (or a JSON list)."),
    profile: str = typer.Option(..., "--profile", help="Model profile: tiny, sdxl, sdxl-dpo, flux, ..."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs (created)."),
    aligner: Optional[Path] = typer.Option(
        None, "--aligner", help="Aligner: save_pretrained folder, .pth/.safetensors, or folder with aligner_<family>.pth. "
        "Required except for tiny profiles (fresh aligner = identity)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial image and of every regeneration."),
    rounds: int = typer.Option(1, "--rounds", help="Analysis -> alignment -> regeneration rounds."),
    lake: Optional[str] = typer.Option(None, "--lake", help="Lake folder/URI: one `generations` row per image."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Diffusion steps (default: profile)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="CFG / FLUX guidance (default: profile)."),
    ip_scale: Optional[float] = typer.Option(None, "--ip-scale", help="IP-Adapter scale at regeneration (default 0.2)."),
    passes: Optional[int] = typer.Option(None, "--passes", help="Aligner passes (default 3)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt of every image."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    questions: Optional[Path] = typer.Option(
        None, "--questions", help="JSON list of question templates with {prompt} (e.g. the authors' list); "
        "default: the config's `questions`, else our own pool."),
    config: Optional[Path] = typer.Option(None, "--config", help="Infer TOML (default: jobs/infer.toml settings)."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON."),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
) -> None:
    """Generate with the base model, then regenerate with IMG (MLLM guidance -> aligner -> IP-Adapter)."""
    from img.config import load_config, project_file
    from img.inference.infer import InferConfig, read_prompts, run_infer

    cfg = load_config(InferConfig, config if config is not None else project_file("infer.toml"),
                      overrides={"questions": str(questions) if questions is not None else None})
    summary = run_infer(
        read_prompts(prompt, prompts), profile, out, aligner=aligner, seed=seed, rounds=rounds, lake=lake,
        steps=steps, guidance_scale=guidance_scale, ip_scale=ip_scale, passes=passes,
        negative_prompt=negative_prompt, device=device, progress=True, questions=cfg.questions,
        break_lock=break_lock,
    )
    typer.echo(summary.render())
    if as_json:
        typer.echo(summary.to_json())


@app.command("serve")
def serve(
    profile: str = typer.Option(..., "--profile", help="Model profile: tiny, sdxl, sdxl-dpo, flux, ..."),
    aligner: Optional[Path] = typer.Option(
        None, "--aligner", help="Aligner, as for `img infer` (required except for tiny profiles)."),
    mllm_adapter: Optional[Path] = typer.Option(
        None, "--mllm-adapter", help="Folder of a fine-tuned MLLM adapter (not loadable in this version: refused)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default is this machine only; "
                             "0.0.0.0 makes the demo reachable from the network (no authentication)."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    lake: Optional[str] = typer.Option(None, "--lake", help="Lake folder/URI: one `generations` row per image."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for every generation's PNGs (default with --lake: serve-out)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Serve the IMG web demo (Gradio): prompt + seed -> base image and IMG image, with timings."""
    from img.app.serve import run_server

    run_server(profile, aligner, mllm_adapter=mllm_adapter, host=host, port=port, lake=lake, out=out, device=device,
               echo=lambda line: typer.echo(line, err=True))


@bench_app.command("loader")
def bench_loader(
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON figures."),
    small: bool = typer.Option(False, "--small", help="Small rows (guidance 64 x 512, tokens 16 x 256) for a quick run."),
    rows: int = typer.Option(160, "--rows", help="Rows in the temporary benchmark table."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Folder for the temporary table (default: system temp)."),
) -> None:
    """Training loader (Lance blobs) vs a raw memmap read of the same bytes, same order, batch 8."""
    if rows < 8:
        raise UserError(f"--rows must be >= 8 (one batch), got {rows}. Pass a larger row count.")
    with _stdout_to_stderr():
        from img.app.bench_loader import run_bench

        result = run_bench(rows=rows, small=small, workdir=str(workdir) if workdir else None)
    if not as_json:
        typer.echo(f"loader {result['loader_samples_per_s']} samples/s, raw memmap {result['raw_samples_per_s']} "
                   f"samples/s, ratio {result['ratio']}")
    import json

    typer.echo(json.dumps(result, indent=2))


@bench_app.command("train")
def bench_train(
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON figures."),
    steps: int = typer.Option(6, "--steps", help="Timed training steps (after --warmup)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps first (one of them counts the FLOPs)."),
    batch_size: int = typer.Option(2, "--batch-size", help="Samples per step."),
    rows: int = typer.Option(16, "--rows", help="Rows of real size (6.8 MB each) in the temporary lake."),
    guidance_dtype: str = typer.Option("fp16", "--guidance-dtype", help="Guidance in the lake: fp16 or fp8."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Folder for the temporary lake (default: system temp)."),
) -> None:
    """DeepSpeed steps of the SDXL-size aligner (195M parameters) on guidance of 650 x 5120, through the real loader."""
    with _stdout_to_stderr():
        from img.app.bench_train import run_bench

        result = run_bench(steps=steps, warmup=warmup, batch_size=batch_size, rows=rows,
                           guidance_dtype=guidance_dtype, workdir=str(workdir) if workdir else None)
    if not as_json:
        typer.echo(f"{result['samples_per_s']} samples/s, peak RSS {result['peak_rss_gb']} GB, "
                   f"{result['flops_per_sample'] / 1e9:.1f} GFLOP and {result['bytes_per_sample'] / 1e6:.2f} MB per sample")
    import json

    typer.echo(json.dumps(result, indent=2))


# ---------------------------------------------------------------- lake
@lake_app.command("vacuum")
def lake_vacuum(
    lake: str = typer.Option(..., "--lake", help="Lake folder or object-store URI."),
    older_than: str = typer.Option("1h", "--older-than", help="Only files last modified longer ago: 90s, 30m, 1h, 7d, 0."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be removed; delete nothing."),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Also print the report as JSON."),
) -> None:
    """Delete files that no version of any table references (left by killed jobs), under the writer lock.

    Every table version is kept, so time travel and resumed training runs are unaffected.
    """
    from img.lake.vacuum import parse_age, vacuum

    report = vacuum(lake, parse_age(older_than), dry_run=dry_run, break_lock=break_lock)
    typer.echo(report.render())
    if as_json:
        import json

        typer.echo(json.dumps(report.to_dict()))


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app(standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
