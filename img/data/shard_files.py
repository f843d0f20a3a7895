"""The shard files of an input dataset: a folder (searched recursively), one file, or an object-store URI.

    files = list_shard_files("data/pickapic", "`source`", (".parquet",), "a folder of Pick-a-Pic parquet shards")
    [(f.uri, f.name, f.size) for f in files]     # sorted by path; file names are unique (they key record ids)

Used by the embed job (Pick-a-Pic parquet) and MLLM fine-tuning (InstructPix2Pix parquet or JSONL). A location
that cannot be opened, does not exist or holds no such file, and two shards with one file name, are each a
``UserError`` that names the value and says what to pass (``what``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from img.errors import UserError


@dataclass(frozen=True)
class ShardFile:
    uri: str  # a local path, or scheme://path for an object store
    name: str  # the file name: unique within one dataset
    size: int
    mtime_ns: int


def list_shard_files(location: str | os.PathLike, label: str, suffixes: Sequence[str], what: str) -> list[ShardFile]:
    """Every file under ``location`` ending in one of ``suffixes``, sorted by path; ``label`` names the parameter
    (e.g. "`source`") in errors, ``what`` is what to pass instead."""
    import pyarrow.fs as pafs

    location = str(location)
    uri = location if "://" in location else "file://" + os.path.abspath(os.path.expanduser(location))
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{label} {location!r} cannot be opened ({e}). Pass {what}.") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{label} {location!r} does not exist. Pass {what}.")
    files = [info] if info.type == pafs.FileType.File else [
        f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    files = [f for f in files if f.path.endswith(tuple(suffixes))]
    if not files:
        kinds = " or ".join(f"*{s}" for s in suffixes)
        raise UserError(f"{label} {location!r} holds no {kinds} files. Pass {what}.")
    prefix = uri.split("://", 1)[0]
    out = [ShardFile(uri=f.path if prefix == "file" else f"{prefix}://{f.path}", name=f.base_name,
                     size=int(f.size or 0), mtime_ns=int(f.mtime_ns or 0)) for f in sorted(files, key=lambda f: f.path)]
    if len({f.name for f in out}) != len(out):
        raise UserError(f"{label} {location!r} holds two shards with the same file name; record ids would collide. "
                        "Give every shard a unique name.")
    return out
