"""Test helper: write a small lake with the real ``features`` / ``pairs`` schemas and a learnable target.

Each pair has random loser tokens l (N x D) and guidance h (len_i x E) whose rows
are u + noise for a per-pair vector u. The winner is the loser with its first
``k`` channels (default D/4) *replaced* by u @ A (A fixed and the same for every
token, since tokens carry no position): w = l with w[..., :k] = g(h).
So f(h, l) = "set channels :k to g(h)" is learnable from the guidance only, and
it is idempotent, so the inference setting (3 passes) is meaningful too.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from img.models.profiles import get_profile
from schemas import features as features_schema
from schemas import pairs as pairs_schema
from schemas.meta import with_provenance


def tiny_dims() -> dict[str, int]:
    """(ip_tokens, ip_dim, guidance_dim) of the ``tiny`` profile."""
    d = get_profile("tiny").dims
    return {"ip_tokens": d.ip_tokens, "ip_dim": d.ip_dim, "guidance_dim": d.mllm_hidden}


def write_synthetic_lake(
    lake: str,
    *,
    n_pairs: int = 256,
    ip_tokens: int = 4,
    ip_dim: int = 32,
    guidance_dim: int = 24,
    text_guidance_dim: int | None = None,
    k: int | None = None,
    min_len: int = 3,
    max_len: int = 9,
    seed: int = 0,
    dtype: str = "float16",
    profile: str = "tiny",
    with_pairs: bool = True,
    uncommitted: int = 0,
    kinds: tuple[str, ...] = (),
    shuffle_rows: int | None = None,
    guidance_dtype: str = "fp16",
    data_storage_version: str | None = None,
) -> dict[str, np.ndarray]:
    """Write ``<lake>/features.lance`` (+ ``pairs.lance``); return the arrays written, keyed by column.

    ``uncommitted`` extra features rows are written whose pair is missing from pairs.lance. ``kinds``, when
    given, fills ``pairs.broken`` round-robin (as a shapes-world lake records it; the data do not depend on it).
    ``shuffle_rows`` (a seed) writes the same rows in a shuffled order, as another embed run may commit them;
    the returned arrays stay indexed by the number in the pair id.
    ``guidance_dtype="fp8"`` stores the guidance as the embed job does (``img.fp8.quantize``; the returned
    ``guidance`` are then the fp16 values before quantisation, ``guidance_fp8`` the (bits, scales) stored).
    ``data_storage_version`` is the Lance file format (None: Lance's default, 2.2; the embed job writes 2.1).
    """
    import lance

    rng = np.random.default_rng(seed)
    n, d, e = ip_tokens, ip_dim, guidance_dim
    k = k if k is not None else max(1, d // 4)
    A = rng.standard_normal((e, k)).astype(np.float32) / np.sqrt(e)
    total = n_pairs + uncommitted
    lens = rng.integers(min_len, max_len + 1, size=total)
    u = rng.standard_normal((total, e)).astype(np.float32)
    guid = [(u[i] + 0.3 * rng.standard_normal((lens[i], e))).astype(np.float16) for i in range(total)]
    loser = rng.standard_normal((total, n, d)).astype(np.float32)
    winner = loser.copy()
    winner[:, :, :k] = (u @ A * 2.0)[:, None, :]
    loser, winner = loser.astype(np.float16), winner.astype(np.float16)
    pair_ids = [f"shard-{i // 100:03d}.parquet#{i}" for i in range(total)]

    def enc(a: np.ndarray) -> np.ndarray:
        return a.view(np.uint16) if dtype == "float16" else _to_bf16_bits(a.astype(np.float32))

    cols = {
        "pair_id": pa.array(pair_ids),
        "winner_tokens": pa.FixedSizeListArray.from_arrays(pa.array(enc(winner).reshape(-1).view(np.float16)), n * d),
        "loser_tokens": pa.FixedSizeListArray.from_arrays(pa.array(enc(loser).reshape(-1).view(np.float16)), n * d),
        "guidance": pa.array([enc(g).tobytes() for g in guid], pa.large_binary()),
        "guidance_len": pa.array(lens.astype(np.int32)),
    }
    extra = {"ip_tokens": n, "ip_dim": d, "guidance_dim": e, "dtype": dtype, "profile": profile}
    quantized = None
    if guidance_dtype == "fp8":
        import torch

        from img import fp8

        quantized = [fp8.quantize(torch.from_numpy(g.astype(np.float32))) for g in guid]
        cols["guidance"] = pa.array([q.numpy().tobytes() for q, _ in quantized], pa.large_binary())
        cols["guidance_scale"] = pa.array([s.numpy() for _, s in quantized], pa.list_(pa.float32()))
        extra["guidance_dtype"] = features_schema.FP8
    text = None
    if text_guidance_dim is not None:
        text = [rng.standard_normal((5, text_guidance_dim)).astype(np.float16) for _ in range(total)]
        cols["text_guidance"] = pa.array([enc(t).tobytes() for t in text], pa.large_binary())
        cols["text_guidance_len"] = pa.array(np.full(total, 5, np.int32))
        extra["text_guidance_dim"] = text_guidance_dim
    schema = with_provenance(features_schema.schema(n, d, text_guidance_dim is not None, guidance_dtype),
                             table="features",
                             version=features_schema.VERSION, model_ids={"mllm": "synthetic"},
                             fingerprint="synthetic", extra=extra)
    order = np.random.default_rng(shuffle_rows).permutation(total) if shuffle_rows is not None else np.arange(total)
    lance.write_dataset(pa.table(cols, schema=schema).take(order), f"{lake}/features.lance", schema=schema,
                        max_rows_per_file=max(total // 3, 1), data_storage_version=data_storage_version)
    if with_pairs:
        m = n_pairs
        ptable = pa.table({
            "pair_id": pair_ids[:m], "caption": [f"caption {i}" for i in range(m)], "question": ["q"] * m,
            "winner_uid": [f"w{i}" for i in range(m)], "loser_uid": [f"l{i}" for i in range(m)],
            "source": ["synthetic"] * m, "row": list(range(m)),
            "broken": [kinds[i % len(kinds)] for i in range(m)] if kinds else [None] * m,
        }, schema=pairs_schema.SCHEMA)
        lance.write_dataset(ptable.take([i for i in order if i < m]), f"{lake}/pairs.lance")
    return {"pair_id": np.array(pair_ids), "winner": winner, "loser": loser, "guidance": guid, "lens": lens,
            "text_guidance": text, "guidance_fp8": quantized}


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
