"""The bundled fine-tuning sample: shapes-world edits in the published InstructPix2Pix layout.

    img data sample --kind edits --out data/edits --pairs 400 --seed 0 [--corrupt 0.02]

    from img.finetune.edit_sample import write_edits_sample
    print(write_edits_sample("data/edits", records=400, seed=0))

Each record (``schemas.instructpix2pix.SAMPLE_SCHEMA``) holds an input scene
(``original_prompt``, ``original_image``), the instruction that changes one thing
(``edit_prompt``: "make the circle red", "add a blue square", ...), and the changed
scene (``edited_prompt``, ``edited_image``), drawn with the same background and
jitter; ``edit_kind`` says which kind of edit it is (balanced over
``img.finetune.edits.EDIT_KINDS``). Images are JPEG bytes in
``struct<bytes, path>`` columns, as the published parquet stores ``datasets.Image``.

``--corrupt F`` damages ``round(F * N)`` records so that they must be quarantined:
the input image truncated, garbage or empty, or the instruction empty, in equal
shares. The same seed gives byte-identical files; every record draws from its own
generator seeded by ``(seed, row)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from img.data import shapes_world as sw
from img.data.sample import CORRUPTIONS, JPEG_QUALITY, _corrupt, _install, _jpeg, _round_half_up, _validate, shard_name
from img.finetune.edits import EDIT_KINDS, applicable, edit_scene
from schemas import instructpix2pix as ip2p
from schemas.meta import with_provenance

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EDIT_CORRUPTIONS = (*CORRUPTIONS, "no instruction")
ROW_GROUP_ROWS = 50  # parquet row groups are the loader's shuffle blocks
_PLAN_STREAM, _ROW_STREAM = 2, 3  # generator streams distinct from the Pick-a-Pic sample's


def _scene_for(kind: str, rng: np.random.Generator) -> sw.Scene:
    """A random scene that ``kind`` applies to."""
    groups = 2 if kind in ("remove", "relation") else 1 if kind == "add" else None
    while True:
        scene = sw.sample_scene(rng, groups=groups)
        if kind in applicable(scene):
            return scene


def _image(data: bytes) -> dict:
    return {"bytes": data, "path": None}


def _record(seed: int, row: int, kind: str, corruption: str | None) -> dict:
    rng = np.random.default_rng([seed, _ROW_STREAM, row])
    scene = _scene_for(kind, rng)
    edited, instruction = edit_scene(scene, kind, rng)
    bg = sw.sample_background(rng)
    layout = int(rng.integers(2**63))
    original = _jpeg(sw.render(scene, np.random.default_rng(layout), background=bg))
    changed = _jpeg(sw.render(edited, np.random.default_rng(layout), background=bg))
    if corruption == "no instruction":
        instruction = ""
    elif corruption is not None:
        original = _corrupt(original, corruption, rng)
    return {"original_prompt": scene.caption(), "original_image": _image(original), "edit_prompt": instruction,
            "edited_prompt": edited.caption(), "edited_image": _image(changed), "edit_kind": kind}


def expected_corrupt(records: int, corrupt: float) -> int:
    """How many records ``write_edits_sample`` damages."""
    return min(_round_half_up(records * corrupt), records)


def write_edits_sample(out: str | os.PathLike, *, records: int = 400, seed: int = 0, corrupt: float = 0.0,
                       shard_rows: int = 500) -> str:
    """Write ``records`` shapes-world edit records as InstructPix2Pix-layout parquet shards into ``out``.

    ``out`` must be new, empty, or hold only shards of a previous sample (they are replaced).
    Returns a one-line summary.
    """
    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    _validate(out, records, seed, corrupt, 0.0, shard_rows)
    plan = np.random.default_rng([seed, _PLAN_STREAM])
    kinds = np.resize(np.arange(len(EDIT_KINDS)), records)
    plan.shuffle(kinds)
    n_bad = expected_corrupt(records, corrupt)
    bad_rows = plan.permutation(records)[:n_bad]
    bad_kinds = np.resize(np.arange(len(EDIT_CORRUPTIONS)), n_bad)
    plan.shuffle(bad_kinds)
    damage = {int(r): EDIT_CORRUPTIONS[int(k)] for r, k in zip(bad_rows, bad_kinds)}
    params = {"records": records, "seed": seed, "corrupt": corrupt, "generator": "img.finetune.edit_sample",
              "image_size": sw.SIZE, "jpeg_quality": JPEG_QUALITY}
    schema = with_provenance(
        ip2p.SAMPLE_SCHEMA, table="instructpix2pix_sample", version=SCHEMA_VERSION,
        fingerprint=hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16], extra=params,
    )
    schema = schema.with_metadata({**schema.metadata, b"huggingface": ip2p.HF_FEATURES.encode()})
    n_shards = math.ceil(records / shard_rows)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    nbytes = 0
    try:
        for s in range(n_shards):
            lo, hi = s * shard_rows, min(records, (s + 1) * shard_rows)
            rows = [_record(seed, r, EDIT_KINDS[int(kinds[r])], damage.get(r)) for r in range(lo, hi)]
            table = pa.Table.from_pylist(rows, schema=schema)
            path = tmp / shard_name(s, n_shards)
            pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="snappy")
            nbytes += path.stat().st_size
            log.info("wrote %s (%d records)", path.name, hi - lo)
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = Counter(EDIT_KINDS[int(k)] for k in kinds)
    bad = Counter(damage.values())
    return (f"wrote {records} edit records to {out} in {n_shards} shard(s), {nbytes / 1e6:.1f} MB, "
            f"{time.perf_counter() - t0:.1f}s: " + ", ".join(f"{k} {counts[k]}" for k in EDIT_KINDS)
            + f"; {n_bad} corrupt (" + ", ".join(f"{k} {bad[k]}" for k in EDIT_CORRUPTIONS) + ")")
