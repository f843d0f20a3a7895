"""Prompt sets from local files in their published formats, as rows of the ``prompts`` table.

    ps = load_prompt_set("benchmark/")               # HPDv2 test: anime.json, concept-art.json, ...
    ps = load_prompt_set("PartiPrompts.tsv")         # Parti: TSV with Prompt / Category / Challenge / Note
    ps = load_prompt_set("examples/dataset/")        # T2I-CompBench: color_val.txt, shape_val.txt, ...
    ps = load_prompt_set("test_unique/")             # Pick-a-Pic test_unique parquet shards (caption column)
    ps = load_prompt_set("my_prompts.txt")           # one prompt per line
    ps.name, ps.format, len(ps), ps.table            # pyarrow Table with schemas.prompts.SCHEMA

The format is detected from the file's shape (``detect_format``); pass
``fmt`` (``--prompt-format``) to override. Formats:

==================  ==========================================  ===========================  =======================
format              published form                              prompt_id                    category
==================  ==========================================  ===========================  =======================
``hpdv2``           folder of ``<style>.json``, each a JSON     ``<style>/<index:05d>``      style (anime,
                    list of prompts (HPDv2 ``benchmark/``)      (the benchmark image name)   concept-art, ...)
``parti``           ``PartiPrompts.tsv``: header ``Prompt``     ``<row:05d>``                ``Category``
                    ``Category`` ``Challenge`` ``Note``; no
                    quoting (prompts contain ``"``)
``t2i-compbench``   folder of ``<category>_val.txt`` (the       ``<category>/<line:05d>``    file name minus
                    evaluation split), one prompt per line                                   ``_val.txt``
``pickapic``        parquet file(s) with a ``caption`` column   ``<row:05d>`` (over shards   ""
                    (Pick-a-Pic ``test_unique``)                in name order)
``text``            one prompt per line; blank lines skipped    ``<index:05d>``              ""
``json``            one JSON list of prompt strings             ``<index:05d>``              ""
==================  ==========================================  ===========================  =======================

``img data sample --kind prompts`` writes a shapes-world prompt file in the
Parti form (``write_shapes_prompts``), so tests have categories to stratify by.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from img.data import shapes_world as sw
from img.errors import UserError
from schemas import prompts as prompts_schema

FORMATS = ("hpdv2", "parti", "t2i-compbench", "pickapic", "text", "json")
HPD_STYLES = ("anime", "concept-art", "paintings", "photo")
PARTI_FILE = "PartiPrompts.tsv"
PARTI_COLUMNS = ("Prompt", "Category", "Challenge", "Note")
T2I_SUFFIX = "_val.txt"
DEFAULT_NAMES = {"hpdv2": "hpdv2", "parti": "parti", "t2i-compbench": "t2i-compbench", "pickapic": "pickapic-test"}
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class PromptSet:
    """The prompts of one set, in published order."""

    name: str
    format: str
    source: str
    table: pa.Table  # schemas.prompts.SCHEMA

    def __len__(self) -> int:
        return self.table.num_rows

    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of every (prompt_id, prompt, category), in order."""
        h = hashlib.sha256()
        for row in self.table.select(["prompt_id", "prompt", "category"]).to_pylist():
            h.update(json.dumps([row["prompt_id"], row["prompt"], row["category"]]).encode())
        return h.hexdigest()[:16]

    def categories(self) -> list[str]:
        return sorted(set(self.table.column("category").to_pylist()))


# ----------------------------------------------------------------------------- detection
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"`prompts` {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}). "
                        "Save it as UTF-8.") from None


def _is_parti_header(first_line: str) -> bool:
    return "\t" in first_line and "Prompt" in [c.strip() for c in first_line.split("\t")]


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its shape (see the module table); ``UserError`` if none fits."""
    p = Path(path).expanduser()
    if p.is_dir():
        names = set(os.listdir(p))
        if any(f"{s}.json" in names for s in HPD_STYLES):
            return "hpdv2"
        if any(n.endswith(T2I_SUFFIX) for n in names):
            return "t2i-compbench"
        if PARTI_FILE in names:
            return "parti"
        if any(n.endswith(".parquet") for n in names):
            return "pickapic"
        raise UserError(
            f"`prompts` folder {str(p)!r} holds no known prompt set (HPDv2 <style>.json files, T2I-CompBench "
            f"*{T2I_SUFFIX} files, {PARTI_FILE}, or Pick-a-Pic parquet shards). Point at one of those, or a file."
        )
    if not p.is_file():
        raise UserError(f"`prompts` {str(p)!r} does not exist. Pass a prompt file or a prompt-set folder.")
    if p.suffix == ".parquet":
        return "pickapic"
    if p.suffix == ".json":
        return "hpdv2" if p.stem in HPD_STYLES else "json"
    if p.name.endswith(T2I_SUFFIX):
        return "t2i-compbench"
    text = _read_text(p)
    first = text.splitlines()[0] if text.strip() else ""
    return "parti" if _is_parti_header(first) else "text"


# ----------------------------------------------------------------------------- readers
Row = tuple[str, str, str]  # (prompt_id, prompt, category)


def _json_list(path: Path) -> list[str]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"`prompts` {str(path)!r} is not valid JSON ({e.msg}, line {e.lineno}). "
                        "Fix the file.") from None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise UserError(f"`prompts` {str(path)!r} must hold one JSON list of prompt strings, as HPDv2's "
                        "benchmark files do.")
    return data


def read_hpdv2(path: Path) -> list[Row]:
    """HPDv2 test prompts: ``<style>.json`` files (a folder of them, or one); id = style/index."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    rows: list[Row] = []
    for f in files:
        for i, prompt in enumerate(_json_list(f)):
            rows.append((f"{f.stem}/{i:05d}", prompt, f.stem))
    return rows


def read_parti(path: Path) -> list[Row]:
    """PartiPrompts.tsv: tab-separated with a header; ``Prompt`` required, ``Category`` used when present."""
    f = path / PARTI_FILE if path.is_dir() else path
    lines = _read_text(f).splitlines()
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [c.strip() for c in next(reader, [])]
    if "Prompt" not in header:
        raise UserError(f"`prompts` {str(f)!r}: the first line must be the Parti header "
                        f"({chr(9).join(PARTI_COLUMNS)}), got {chr(9).join(header)[:80]!r}.")
    ip, ic = header.index("Prompt"), header.index("Category") if "Category" in header else None
    rows: list[Row] = []
    for i, cells in enumerate(reader):
        prompt = cells[ip] if ip < len(cells) else ""
        category = cells[ic].strip() if ic is not None and ic < len(cells) else ""
        rows.append((f"{i:05d}", prompt, category))
    return rows


def read_t2i_compbench(path: Path) -> list[Row]:
    """T2I-CompBench: ``<category>_val.txt`` files, one prompt per line; id = category/line."""
    files = sorted(p for p in path.iterdir() if p.name.endswith(T2I_SUFFIX)) if path.is_dir() else [path]
    rows: list[Row] = []
    for f in files:
        category = f.name[: -len(T2I_SUFFIX)] if f.name.endswith(T2I_SUFFIX) else f.stem
        for i, line in enumerate(_read_text(f).splitlines()):
            rows.append((f"{category}/{i:05d}", line, category))
    return rows


def read_pickapic(path: Path) -> list[Row]:
    """Pick-a-Pic ``test_unique``: the ``caption`` column of every parquet shard, in file-name order."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    rows: list[Row] = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"`prompts` {str(f)!r} is not a readable parquet file ({e}).") from None
        if "caption" not in schema.names:
            raise UserError(f"`prompts` {str(f)!r} has no 'caption' column (columns: {', '.join(schema.names[:8])}). "
                            "Pick-a-Pic test_unique shards have one.")
        for caption in pq.read_table(f, columns=["caption"]).column("caption").to_pylist():
            rows.append((f"{len(rows):05d}", caption or "", ""))
    return rows


def read_text(path: Path) -> list[Row]:
    """One prompt per line; blank lines are skipped."""
    prompts = [line for line in _read_text(path).splitlines() if line.strip()]
    return [(f"{i:05d}", p, "") for i, p in enumerate(prompts)]


def read_json(path: Path) -> list[Row]:
    return [(f"{i:05d}", p, "") for i, p in enumerate(_json_list(path))]


READERS = {"hpdv2": read_hpdv2, "parti": read_parti, "t2i-compbench": read_t2i_compbench,
           "pickapic": read_pickapic, "text": read_text, "json": read_json}


def default_set_name(path: Path, fmt: str) -> str:
    """``hpdv2``, ``parti``, ``t2i-compbench``, ``pickapic-test`` for a whole published set; single files of a
    per-category set add their category; plain files use their stem."""
    if fmt in ("text", "json"):
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "prompts"
        return name[:64]
    if path.is_file() and fmt == "hpdv2":
        return f"hpdv2-{path.stem}"
    if path.is_file() and fmt == "t2i-compbench":
        return f"t2i-compbench-{path.name.removesuffix(T2I_SUFFIX)}"
    return DEFAULT_NAMES[fmt]


def load_prompt_set(path: str | Path, fmt: str | None = None, name: str | None = None) -> PromptSet:
    """Read ``path`` in format ``fmt`` (detected when None) as prompt set ``name`` (default: see ``default_set_name``).

    Prompts are stripped of surrounding white space; empty prompts are dropped (their ids stay unused, so ids
    keep following the published order). ``UserError`` if nothing is left.
    """
    p = Path(path).expanduser()
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"`prompt_format` {fmt!r} is not one of {', '.join(FORMATS)}. Pick one, or leave it out "
                        "to detect the format from the file.")
    if not p.exists():
        raise UserError(f"`prompts` {str(p)!r} does not exist. Pass a prompt file or a prompt-set folder.")
    fmt = fmt or detect_format(p)
    if p.is_dir() and fmt in ("text", "json"):
        raise UserError(f"`prompts` {str(p)!r} is a folder; `prompt_format` {fmt} reads one file. Pass the file.")
    rows = [(pid, prompt.strip(), cat) for pid, prompt, cat in READERS[fmt](p) if prompt and prompt.strip()]
    if not rows:
        raise UserError(f"`prompts` {str(p)!r} holds no prompt (read as {fmt}). Check the file, or pass "
                        "`prompt_format`.")
    name = name or default_set_name(p, fmt)
    if not _SET_NAME.match(name):
        raise UserError(f"`set_name` {name!r} is not a valid set name. Use letters, digits, '.', '_' or '-' (max 64).")
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):  # only possible when two files share a stem
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"`prompts` {str(p)!r}: prompt id {dup!r} occurs twice. Remove the duplicate file.")
    table = pa.table({"set": [name] * len(rows), "prompt_id": ids, "prompt": [r[1] for r in rows],
                      "category": [r[2] for r in rows]}, schema=prompts_schema.SCHEMA)
    return PromptSet(name=name, format=fmt, source=str(p.absolute()), table=table)


# ----------------------------------------------------------------------------- shapes-world prompt file
SHAPES_CATEGORIES = {"single": "Basic", "counting": "Quantity", "spatial": "Properties & Positioning"}


def shapes_category(scene: sw.Scene) -> str:
    """``single`` (one shape), ``counting`` (one group of 2-3 shapes) or ``spatial`` (two groups and a relation)."""
    if scene.relation is not None:
        return "spatial"
    return "single" if scene.groups[0].count == 1 else "counting"


def write_shapes_prompts(out: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` distinct shapes-world prompts to ``<out>/prompts.tsv`` in the Parti form; returns the path.

    Columns ``Prompt``, ``Category`` (single / counting / spatial), ``Challenge`` (Parti's label for it) and
    ``Note`` (empty). The same ``n`` and ``seed`` give a byte-identical file.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 2000:
        raise UserError(f"`n` must be an integer from 1 to 2000, got {n!r}. Pass e.g. 60.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"`seed` must be an integer >= 0, got {seed!r}. Pass e.g. 0.")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"`out` {str(out_dir)!r} exists and is not a folder. Pass a folder path.")
    rng = np.random.default_rng([seed, 7])
    seen: dict[str, str] = {}
    while len(seen) < n:
        scene = sw.sample_scene(rng)
        seen.setdefault(scene.caption(), shapes_category(scene))
    lines = ["\t".join(PARTI_COLUMNS)]
    lines += [f"{caption}\t{cat}\t{SHAPES_CATEGORIES[cat]}\t" for caption, cat in seen.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prompts.tsv"
    fd, tmp = tempfile.mkstemp(prefix=".prompts.", suffix=".tmp", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
