"""Tables and figures for the analysis notebooks; every number is a read-only query over the lake.

The notebooks (``notebooks/dataset_analysis.ipynb``, ``notebooks/training_eval.ipynb``)
only call these functions, so the analysis is tested code, not notebook code::

    from img.eval import report
    rows = report.caption_lengths("demo/lake")            # [{"words": 5, "pairs": 120}, ...]
    fig = report.plot_caption_lengths("demo/lake")        # a matplotlib Figure
    report.save(fig, "figures/caption_lengths.png")

Queries go through ``img.lake.sql.run_query`` (the code behind ``img sql``); the
source-data figures (model mix, tie share) read the Pick-a-Pic shards through
its ``source`` view. Functions return [] (and plots say "no data") when a table
is missing, so a lake without training or eval still renders.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

from img.data.shapes_world import BROKEN_KINDS
from img.lake import tables as lake_mod
from img.lake.sql import run_query
from schemas.win_rates import OVERALL


def query(lake: str, sql: str, source: Optional[str] = None) -> list[dict]:
    """Rows of a read-only query (``img sql --json``)."""
    return json.loads(run_query(str(lake), sql, as_json=True, source=source))


def tables(lake: str) -> list[dict]:
    """Every table in the lake with its row count and version."""
    return query(lake, "select name, rows, version from img_tables order by name")


def _has(lake: str, *names: str) -> bool:
    have = set(lake_mod.list_tables(str(lake)))
    return all(n in have for n in names)


# ----------------------------------------------------------------------------- dataset analysis
def caption_lengths(lake: str) -> list[dict]:
    """Pairs per caption length in words."""
    if not _has(lake, "pairs"):
        return []
    return query(lake, "select len(string_split(trim(caption), ' ')) as words, count(*) as pairs "
                       "from pairs group by 1 order by 1")


def model_mix(source: str, lake: str) -> list[dict]:
    """Per generating model: images, images that won a decisive pair, and its win share (Pick-a-Pic ``model_*``)."""
    return query(lake, """
        with images as (
            select model_0 as model, label_0 as label from source
            union all select model_1, label_1 from source
        )
        select model, count(*) as images, count(*) filter (where label = 1.0) as wins,
               count(*) filter (where label in (0.0, 1.0)) as decisive,
               round(count(*) filter (where label = 1.0) / nullif(count(*) filter (where label in (0.0, 1.0)), 0), 4)
                   as win_share
        from images group by model order by model""", source=source)


def tie_share(source: str, lake: str) -> list[dict]:
    """Rows, ties (``label_0 = 0.5``, dropped by embed) and their share in the source shards."""
    return query(lake, "select count(*) as rows, count(*) filter (where label_0 = 0.5) as ties, "
                       "round(count(*) filter (where label_0 = 0.5) / count(*), 4) as tie_share from source",
                 source=source)


def quarantine_reasons(lake: str) -> list[dict]:
    """Quarantined rows per reason (the reason text up to its first parenthesis, so similar errors group)."""
    if not _has(lake, "quarantine"):
        return []
    return query(lake, "select trim(split_part(reason, '(', 1)) as reason, count(*) as rows from quarantine "
                       "group by 1 order by rows desc, reason")


def guidance_lengths(lake: str) -> list[dict]:
    """Pairs per MLLM guidance length L (tokens, stored unpadded)."""
    if not _has(lake, "features"):
        return []
    return query(lake, "select guidance_len as tokens, count(*) as pairs from features group by 1 order by 1")


# ----------------------------------------------------------------------------- training
def training_runs(lake: str) -> list[dict]:
    """Training runs in ``metrics``: steps and the last loss."""
    if not _has(lake, "metrics"):
        return []
    return query(lake, "select run_id, max(step) as steps, arg_max(value, step) filter (where name = 'loss') as "
                       "last_loss from metrics group by run_id order by run_id")


def loss_parts(lake: str, run_id: Optional[str] = None) -> list[dict]:
    """(run_id, step, name, value) of the loss and its parts (``loss``, ``loss_base``, ``loss_pref``, ``d_*``,
    ``z``)."""
    if not _has(lake, "metrics"):
        return []
    where = f" and run_id = {lake_mod.sql_str(run_id)}" if run_id else ""
    return query(lake, "select run_id, step, name, value from metrics where (name like 'loss%' or name like 'd\\_%' "
                       f"escape '\\' or name = 'z'){where} order by run_id, name, step")


def reference_copies(lake: str) -> list[dict]:
    """Steps at which the reference model was replaced by the trained one (``ref_copy`` = copies so far)."""
    if not _has(lake, "metrics"):
        return []
    return query(lake, "select run_id, step, value as copies from metrics where name = 'ref_copy' "
                       "order by run_id, step")


def heldout(lake: str) -> list[dict]:
    """End-of-run held-out metrics, one row per (run, metric) with its break ``kind`` ('' = all pairs)."""
    if not _has(lake, "metrics"):
        return []
    rows = query(lake, "select run_id, name, value from metrics where name like 'heldout%' order by run_id, name")
    for r in rows:
        kind = next((k for k in BROKEN_KINDS if r["name"].endswith("_" + k)), "")
        r["kind"] = kind
        r["metric"] = r["name"][: -len(kind) - 1] if kind else r["name"]
    return rows


# ----------------------------------------------------------------------------- eval
def eval_runs(lake: str) -> list[dict]:
    """Eval runs: prompt set, prompts sampled and when."""
    if not _has(lake, "eval_runs"):
        return []
    return query(lake, "select run, set, count(*) as prompts, min(created_at) as created_at from eval_runs "
                       "group by run, set order by created_at")


def win_rates(lake: str, run: Optional[str] = None) -> list[dict]:
    """``win_rates`` rows (of one run when given)."""
    if not _has(lake, "win_rates"):
        return []
    where = f" where run = {lake_mod.sql_str(run)}" if run else ""
    return query(lake, f"select * from win_rates{where} order by run, system, scorer, scorer_version, "
                       f"category = '{OVERALL}' desc, category")


def mean_scores(lake: str, run: Optional[str] = None) -> list[dict]:
    """Mean score per system (base included) per scorer and version: the paper's Pick Score criterion."""
    if not _has(lake, "scores"):
        return []
    where = f" where run = {lake_mod.sql_str(run)}" if run else ""
    return query(lake, f"select run, scorer, scorer_version, system, count(*) as images, avg(score) as mean_score "
                       f"from scores{where} group by run, scorer, scorer_version, system "
                       f"order by run, scorer, scorer_version, system <> 'base', system")


def image_rows(lake: str, run: Optional[str] = None, prompts: int = 4, seed: int = 0) -> list[dict]:
    """The first ``prompts`` sampled prompts of ``run`` (default: the latest run) with their PNGs per system."""
    if not _has(lake, "eval_images", "eval_runs", "prompts"):
        return []
    runs = eval_runs(lake)
    if not runs:
        return []
    run = run or runs[-1]["run"]
    picked = query(lake, f"select e.prompt_id, p.prompt, e.category from eval_runs e join prompts p "
                         f"on p.set = e.set and p.prompt_id = e.prompt_id where e.run = {lake_mod.sql_str(run)} "
                         f"order by e.rank limit {int(prompts)}")
    ds = lake_mod.open_table(str(lake), "eval_images")
    out = []
    for p in picked:
        t = ds.to_table(columns=["system", "png"], filter=f"run = {lake_mod.sql_str(run)} and "
                                                          f"prompt_id = {lake_mod.sql_str(p['prompt_id'])} and seed = {int(seed)}")
        images = dict(zip(t.column("system").to_pylist(), t.column("png").to_pylist()))
        out.append({**p, "images": images})
    return out


# ----------------------------------------------------------------------------- figures
def _figure(title: str, width: float = 5.0, height: float = 3.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_title(title)
    return fig, ax


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this lake", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _bars(title: str, rows: list[dict], x: str, y: str, xlabel: str, what: str) -> Any:
    fig, ax = _figure(title)
    if not rows:
        _empty(ax, what)
        return fig
    ax.bar([str(r[x]) for r in rows], [r[y] for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y)
    if len(rows) > 6 or max(len(str(r[x])) for r in rows) * len(rows) > 60:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.tight_layout()
    return fig


def plot_caption_lengths(lake: str) -> Any:
    return _bars("caption length of pairs", caption_lengths(lake), "words", "pairs", "words", "pairs")


def plot_model_mix(source: str, lake: str) -> Any:
    return _bars("images per model (Pick-a-Pic model_0 / model_1)", model_mix(source, lake), "model", "images",
                 "model", "source rows")


def plot_quarantine_reasons(lake: str) -> Any:
    return _bars("quarantined rows by reason", quarantine_reasons(lake), "reason", "rows", "", "quarantined rows")


def plot_guidance_lengths(lake: str) -> Any:
    return _bars("MLLM guidance length", guidance_lengths(lake), "tokens", "pairs", "tokens L", "features")


def plot_loss_parts(lake: str, run_id: Optional[str] = None) -> Any:
    """One line per loss part over steps, reference copies as vertical lines."""
    rows = loss_parts(lake, run_id)
    fig, ax = _figure("loss and its parts", 6, 3.5)
    if not rows:
        _empty(ax, "training metrics")
        return fig
    run_id = run_id or rows[-1]["run_id"]
    for name in ("loss", "loss_base", "loss_pref"):
        pts = [(r["step"], r["value"]) for r in rows if r["run_id"] == run_id and r["name"] == name]
        if pts:
            ax.plot(*zip(*pts), label=name)
    for r in reference_copies(lake):
        if r["run_id"] == run_id:
            ax.axvline(r["step"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_heldout(lake: str) -> Any:
    """Held-out win rate (share of pairs where the aligned tokens are closer to the winner), overall and per kind."""
    rows = [r for r in heldout(lake) if r["metric"] == "heldout_win_rate"]
    fig, ax = _figure("held-out win rate (aligned closer to winner than loser)")
    if not rows:
        _empty(ax, "held-out metrics")
        return fig
    ax.bar([r["kind"] or "all" for r in rows], [r["value"] for r in rows])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


def plot_win_rates(lake: str, run: Optional[str] = None) -> Any:
    """Win rate of each system vs base per scorer and category, with its 95 % Wilson interval as error bars."""
    rows = win_rates(lake, run)
    fig, ax = _figure("IMG vs base: win rate with 95% Wilson interval", 6.5, 3.5)
    if not rows:
        _empty(ax, "win rates")
        return fig
    labels = [f"{r['system']} {r['scorer']}\n{r['category']}" for r in rows]
    rates = [r["win_rate"] for r in rows]
    err = [[r["win_rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["win_rate"] for r in rows]]
    ax.bar(range(len(rows)), rates, yerr=err, capsize=3, color=["C0" if r["scorer"] == "pickscore" else "C1"
                                                                  for r in rows])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate")
    fig.tight_layout()
    return fig


def plot_image_grid(lake: str, run: Optional[str] = None, prompts: int = 4) -> Any:
    """Base and IMG images side by side, one row per prompt."""
    from PIL import Image

    rows = image_rows(lake, run, prompts)
    if not rows:
        fig, ax = _figure("base vs IMG")
        _empty(ax, "eval images")
        return fig
    systems = ["base"] + sorted(s for s in rows[0]["images"] if s != "base")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(systems), figsize=(2.2 * len(systems), 2.2 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, s in enumerate(systems):
            ax = axes[i][j]
            ax.imshow(Image.open(io.BytesIO(r["images"][s])).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(s)
            if j == 0:
                ax.set_ylabel(r["prompt"][:28] + ("..." if len(r["prompt"]) > 28 else ""), fontsize=7)
    fig.tight_layout()
    return fig


def save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a PNG (folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=100)
    return p
