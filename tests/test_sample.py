"""The bundled sample: Pick-a-Pic v2 columns, exact counts, determinism, faithful pixels, CLI."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from img.data import shapes_world as sw
from img.data.sample import CORRUPTIONS, decodes, expected_counts, read_sample, shard_paths, write_sample
from img.errors import UserError
from schemas import pickapic
from schemas.meta import read_provenance

PAIRS, SEED, CORRUPT, TIES, SHARD_ROWS = 240, 3, 0.1, 0.15, 64


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "s"
    write_sample(out, pairs=PAIRS, seed=SEED, corrupt=CORRUPT, ties=TIES, shard_rows=SHARD_ROWS)
    return out


@pytest.fixture(scope="module")
def rows(sample_dir) -> list[dict]:
    return read_sample(sample_dir).to_pylist()


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")  # a full decode


def _corrupt_rows(rows: list[dict]) -> list[int]:
    return [i for i, r in enumerate(rows) if not (decodes(r["jpg_0"]) and decodes(r["jpg_1"]))]


def _breaks(scene: sw.Scene, kind: str) -> set[sw.Scene]:
    """Every scene ``break_scene(scene, kind, ...)`` may return, in canonical form."""
    if kind == "relation":
        return {sw.Scene(scene.groups, sw.OPPOSITE[scene.relation]).canonical()}
    out = set()
    for gi, g in enumerate(scene.groups):
        if kind == "colour":
            options = [dataclasses.replace(g, colour=c) for c in sw.COLOURS if c not in {x.colour for x in scene.groups}]
        elif kind == "shape":
            options = [dataclasses.replace(g, shape=s) for s in sw.SHAPES if s not in {x.shape for x in scene.groups}]
        else:
            options = [dataclasses.replace(g, count=n) for n in sw.COUNT_WORDS if n != g.count]
        for new in options:
            groups = list(scene.groups)
            groups[gi] = new
            out.add(sw.Scene(tuple(groups), scene.relation).canonical())
    return out


# ---------------------------------------------------------------- layout and schema
def test_shards_and_schema(sample_dir):
    paths = shard_paths(sample_dir)
    assert [p.name for p in paths] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    assert sorted(p.name for p in sample_dir.iterdir()) == [p.name for p in paths]
    assert not list(sample_dir.parent.glob(".*partial*"))  # no temp folder left behind
    for p in paths:
        schema = pq.read_schema(p)
        assert schema.names == pickapic.SAMPLE_SCHEMA.names
        assert schema.names[: len(pickapic.SCHEMA)] == pickapic.SCHEMA.names
        assert schema.names[-1] == "broken"
        assert [f.type for f in schema] == [f.type for f in pickapic.SAMPLE_SCHEMA]
        assert schema.equals(pickapic.SAMPLE_SCHEMA)
        assert read_provenance(schema)["table"] == "pickapic_sample"
    assert [pq.read_metadata(p).num_rows for p in paths] == [64, 64, 64, 48]


def test_same_seed_byte_identical_and_seeds_differ(tmp_path):
    kw = dict(pairs=30, corrupt=0.2, ties=0.1, shard_rows=16)
    write_sample(tmp_path / "a", seed=7, **kw)
    write_sample(tmp_path / "b", seed=7, **kw)
    write_sample(tmp_path / "c", seed=8, **kw)
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 2
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    # Rows do not depend on how they are sharded.
    write_sample(tmp_path / "d", seed=7, **{**kw, "shard_rows": 7})
    assert read_sample(tmp_path / "d").equals(read_sample(tmp_path / "a"))


# ---------------------------------------------------------------- counts and labels
def test_counts_are_exact(rows):
    want = expected_counts(PAIRS, CORRUPT, TIES)
    assert want == {"pairs": 240, "ties": 36, "decisive": 204, "corrupt": 24}
    assert len(rows) == PAIRS
    ties = [i for i, r in enumerate(rows) if r["label_0"] == 0.5]
    assert len(ties) == want["ties"]
    corrupt = _corrupt_rows(rows)
    assert len(corrupt) == want["corrupt"]
    assert not set(ties) & set(corrupt)  # corrupt rows are decisive rows
    # Half-up rounding and the cap at the rows left after ties.
    assert expected_counts(10, 0.25, 0.05) == {"pairs": 10, "ties": 1, "decisive": 9, "corrupt": 3}
    assert expected_counts(3, 0.5, 0.5)["corrupt"] == 1


def test_labels_and_winner_uid(rows):
    sides = set()
    for r in rows:
        assert r["has_label"] is True and r["are_different"] is True
        assert r["image_0_url"] == f"https://example.invalid/{r['image_0_uid']}.jpg"
        assert r["image_1_url"] == f"https://example.invalid/{r['image_1_uid']}.jpg"
        assert r["best_image_uid"] in (r["image_0_uid"], r["image_1_uid"])
        assert r["label_0"] + r["label_1"] == 1.0
        if r["label_0"] == 0.5:
            assert r["label_1"] == 0.5 and r["broken"] is None
            continue
        assert (r["label_0"], r["label_1"]) in ((1.0, 0.0), (0.0, 1.0))
        winner = 0 if r["label_0"] == 1.0 else 1
        sides.add(winner)
        assert r["best_image_uid"] == r[f"image_{winner}_uid"]
        assert r["broken"] in sw.BROKEN_KINDS
        assert r["model_0"] and r["model_1"]
    assert sides == {0, 1}
    uids = [r[f"image_{k}_uid"] for r in rows for k in (0, 1)]
    assert len(set(uids)) == len(uids) and all(len(u) == 36 for u in uids)
    assert len({r["ranking_id"] for r in rows}) == len(rows)
    times = [r["created_at"] for r in rows]
    assert times == sorted(times) and len(set(times)) == len(times)
    captions = [r["caption"] for r in rows]
    assert all(r["num_example_per_prompt"] == captions.count(r["caption"]) for r in rows)


def test_broken_covers_all_kinds_evenly(rows):
    kinds = [r["broken"] for r in rows if r["broken"] is not None]
    counts = {k: kinds.count(k) for k in sw.BROKEN_KINDS}
    assert sum(counts.values()) == expected_counts(PAIRS, CORRUPT, TIES)["decisive"]
    assert max(counts.values()) - min(counts.values()) <= 1, counts


# ---------------------------------------------------------------- bytes
def test_good_jpegs_decode_and_corrupt_ones_fail(rows):
    kinds = set()
    for i, r in enumerate(rows):
        for k in (0, 1):
            data = r[f"jpg_{k}"]
            if decodes(data):
                im = _rgb(data)
                assert im.size == (sw.SIZE, sw.SIZE) and data[:2] == b"\xff\xd8"
                continue
            with pytest.raises(Exception):
                _rgb(data)
            if data == b"":
                kinds.add("empty")
            elif data[:3] == b"\xff\xd8\xff":
                # A JPEG cut in half: the header opens lazily, the full decode fails.
                Image.open(io.BytesIO(data))
                kinds.add("truncated")
            else:
                kinds.add("garbage")
    assert kinds == set(CORRUPTIONS)


# ---------------------------------------------------------------- pixels
def test_images_draw_the_caption_and_break_one_element(rows):
    """Read every image back from its pixels: winners are faithful, losers break exactly ``broken``."""
    seen = set()
    checked = relaid = untouched = 0
    for r in rows:
        if not (decodes(r["jpg_0"]) and decodes(r["jpg_1"])):
            continue
        scene = sw.parse_caption(r["caption"]).canonical()
        if r["broken"] is None:
            assert sw.describe(_rgb(r["jpg_0"])) == scene == sw.describe(_rgb(r["jpg_1"])), r["caption"]
            continue
        if checked >= 120:
            continue
        winner = 0 if r["label_0"] == 1.0 else 1
        good, bad = _rgb(r[f"jpg_{winner}"]), _rgb(r[f"jpg_{1 - winner}"])
        assert sw.describe(good) == scene, r["caption"]
        assert sw.describe(bad) in _breaks(scene, r["broken"]), (r["caption"], r["broken"], sw.describe(bad))
        # The pair differs clearly; the shapes the break leaves alone are drawn again with their own jitter.
        changed = np.abs(np.asarray(good, np.int16) - np.asarray(bad, np.int16)).max(-1) > 60
        assert changed.sum() >= 60, (r["caption"], r["broken"], changed.sum())
        if r["broken"] in ("colour", "shape"):
            hit = [g for g in scene.groups if g not in sw.describe(bad).groups]
            assert len(hit) == 1
            same = [(d.colour, d.shape) for d in sw.detect(good) if (d.colour, d.shape) != (hit[0].colour, hit[0].shape)]
            moved = [d for d in sw.detect(good) if (d.colour, d.shape) in same and not any(
                (e.colour, e.shape) == (d.colour, d.shape) and abs(e.x - d.x) + abs(e.y - d.y) < 0.01
                for e in sw.detect(bad))]
            relaid += len(moved) == len(same)
            untouched += len(same) > 0
        seen.add(r["broken"])
        checked += 1
    assert seen == set(sw.BROKEN_KINDS)
    assert untouched > 10 and relaid >= 0.9 * untouched, (relaid, untouched)  # independent jitter, not a copy


def test_captions_round_trip_and_breaks_change_one_element():
    rng = np.random.default_rng(0)
    vocab = set(sw.vocabulary())
    for _ in range(300):
        scene = sw.sample_scene(rng)
        cap = scene.caption()
        assert sw.parse_caption(cap) == scene
        assert set(cap.split()) <= vocab
        assert 1 <= sum(g.count for g in scene.groups) <= sw.MAX_SHAPES
        for kind in sw.BROKEN_KINDS:
            if kind == "relation" and scene.relation is None:
                with pytest.raises(ValueError):
                    sw.break_scene(scene, kind, rng)
                continue
            broken = sw.break_scene(scene, kind, rng)
            assert broken.canonical() in _breaks(scene, kind)
            assert broken.canonical() != scene.canonical()
    with pytest.raises(ValueError):
        sw.parse_caption("a dog on a skateboard")


# ---------------------------------------------------------------- validation and writing
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(pairs=0), "`pairs`"),
        (dict(corrupt=2.0), "`corrupt`"),
        (dict(corrupt=-0.1), "`corrupt`"),
        (dict(ties=-0.5), "`ties`"),
        (dict(corrupt=0.6, ties=0.6), "`corrupt` + `ties`"),
        (dict(shard_rows=0), "`shard_rows`"),
        (dict(seed=-1), "`seed`"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, needle):
    args = dict(pairs=4, seed=0, corrupt=0.0, ties=0.0, shard_rows=2) | kwargs
    with pytest.raises(UserError) as e:
        write_sample(tmp_path / "o", **args)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert not (tmp_path / "o").exists()


def test_out_folder_rules(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="existing file"):
        write_sample(f, pairs=2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        write_sample(busy, pairs=2)
    assert (busy / "notes.txt").read_text() == "mine"
    # An empty folder is fine; a previous sample is replaced, stale shards included.
    empty = tmp_path / "empty"
    empty.mkdir()
    write_sample(empty, pairs=10, shard_rows=2)
    assert len(shard_paths(empty)) == 5
    write_sample(empty, pairs=10, shard_rows=5)
    assert [p.name for p in sorted(empty.iterdir())] == [f"train-0000{i}-of-00002.parquet" for i in (0, 1)]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(UserError, match="not writable"):
            write_sample(locked / "s", pairs=2)


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    import img.data.sample as sample

    real = sample.pq.write_table
    calls = []

    def dies_on_second(table, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a killed run
        return real(table, path, **kw)

    monkeypatch.setattr(sample.pq, "write_table", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_sample(tmp_path / "s", pairs=6, shard_rows=2)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CLI
def test_cli_writes_sample(tmp_path):
    from img.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["data", "sample", "--out", str(out), "--pairs", "12", "--seed", "1",
                                   "--corrupt", "0.25", "--shard-rows", "5"])
    assert res.exit_code == 0, res.output
    assert "wrote 12 pairs" in res.output and "3 corrupt rows" in res.output
    table = read_sample(out)
    assert table.num_rows == 12 and len(shard_paths(out)) == 3
    assert len(_corrupt_rows(table.to_pylist())) == 3


@pytest.mark.slow
def test_cli_bad_corrupt_is_one_line_exit_2(tmp_path):
    exe = Path(sys.executable).parent / "img"
    assert exe.exists(), "the img console script is installed by `make` (pip install -e .)"
    res = subprocess.run([str(exe), "data", "sample", "--out", str(tmp_path / "o"), "--corrupt", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--corrupt" in lines[0] and "2.0" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the published form
def test_pickapic_format_is_exactly_the_published_columns(tmp_path, rows):
    out = tmp_path / "pp"
    write_sample(out, pairs=PAIRS, seed=SEED, corrupt=CORRUPT, ties=TIES, shard_rows=SHARD_ROWS, fmt="pickapic",
                 row_group_rows=50)
    paths = shard_paths(out)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths] and len(paths) == 4
    for i, p in enumerate(paths):  # HF's names: train-00000-of-00004-<16 hex>.parquet
        assert p.name.startswith(f"train-{i:05d}-of-00004-") and len(p.name) == len("train-00000-of-00004-") + 24
        schema = pq.read_schema(p)
        assert schema.equals(pickapic.SCHEMA, check_metadata=True) and schema.metadata is None
        assert "broken" not in schema.names
        md = pq.read_metadata(p)
        assert set(md.metadata) <= {b"ARROW:schema"}  # pyarrow's own schema key, nothing of ours
        assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == ([50, 14] if i < 3 else [48])
    # The same rows as the default format, minus `broken`.
    assert read_sample(out).to_pylist() == [{k: v for k, v in r.items() if k != "broken"} for r in rows]
    # Default row groups: 100 rows, as HF datasets writes binary columns.
    write_sample(tmp_path / "pp2", pairs=250, seed=1, shard_rows=250, fmt="pickapic")
    md = pq.read_metadata(shard_paths(tmp_path / "pp2")[0])
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [100, 100, 50]
    # A second pickapic sample replaces the first one's shards (names with a hash included).
    write_sample(out, pairs=10, seed=2, shard_rows=5, fmt="pickapic")
    assert len(shard_paths(out)) == 2 and len(list(out.iterdir())) == 2


@pytest.mark.parametrize("kwargs, needle", [(dict(fmt="hf"), "`fmt`"), (dict(row_group_rows=0), "`row_group_rows`")])
def test_bad_format_arguments_are_user_errors(tmp_path, kwargs, needle):
    with pytest.raises(UserError) as e:
        write_sample(tmp_path / "o", pairs=4, **kwargs)
    assert needle in str(e.value) and not (tmp_path / "o").exists()


def test_cli_pickapic_format(tmp_path):
    from img.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["data", "sample", "--out", str(out), "--pairs", "6", "--format", "pickapic"])
    assert res.exit_code == 0, res.output
    assert "pickapic format" in res.output
    assert pq.read_schema(shard_paths(out)[0]).equals(pickapic.SCHEMA, check_metadata=True)
