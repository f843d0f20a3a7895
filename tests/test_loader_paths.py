"""The loader's read paths give the same padded batches: memory-mapped data files (Lance format 2.1, what the
embed job writes) and Lance's blob API (format 2.2 and object stores); fp8 guidance is dequantised while padding."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from synthetic_lake import write_synthetic_lake

from img import fp8
from img.errors import UserError
from img.training.loader import TrainLoader

DIMS = {"ip_tokens": 4, "ip_dim": 32, "guidance_dim": 24}


def _row(pid: str) -> int:
    return int(pid.split("#")[1])


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    out = {}
    for name, kw in {"v21": {"data_storage_version": "2.1"}, "v22": {},
                     "bf16": {"data_storage_version": "2.1", "dtype": "bfloat16"},
                     "fp8": {"data_storage_version": "2.1", "guidance_dtype": "fp8"},
                     "fp8_v22": {"guidance_dtype": "fp8"}}.items():
        out[name] = (str(root / name), write_synthetic_lake(str(root / name), n_pairs=60, seed=2, **kw, **DIMS))
    return out


def _batches(lake: str, **kw) -> list:
    loader = TrainLoader(lake, batch_size=8, seed=1, heldout_pairs=0, prefetch=2, **kw)
    it = iter(loader)
    return loader, [next(it) for _ in range(loader.steps_per_epoch + 2)]  # past an epoch boundary


def test_mmap_path_reads_exactly_what_lance_reads(lakes):
    root, arrays = lakes["v21"]
    mm, got = _batches(root, num_workers=2)
    lb, want = _batches(root, num_workers=0, blob_api="take_blobs")
    assert mm.blob_api == "mmap" and lb.blob_api == "take_blobs"
    assert len(mm.ds.get_fragments()) == 3  # rows spread over several data files
    for a, b in zip(got, want):
        assert a.pair_ids == b.pair_ids
        assert torch.equal(a.guidance, b.guidance) and torch.equal(a.mask, b.mask)
        for j, pid in enumerate(a.pair_ids):
            i, n = _row(pid), int(arrays["lens"][_row(pid)])
            assert torch.equal(a.guidance[j, :n], torch.from_numpy(arrays["guidance"][i]))
            assert torch.count_nonzero(a.guidance[j, n:]) == 0  # padding is zero even in a recycled buffer
            assert torch.equal(a.winner[j], torch.from_numpy(arrays["winner"][i]))


def test_lance_22_lakes_use_the_blob_api_and_mmap_is_refused(lakes):
    root, arrays = lakes["v22"]
    loader, got = _batches(root, num_workers=2)
    assert loader.blob_api == "take_blobs"
    for j, pid in enumerate(got[0].pair_ids):
        n = int(arrays["lens"][_row(pid)])
        assert torch.equal(got[0].guidance[j, :n], torch.from_numpy(arrays["guidance"][_row(pid)]))
    with pytest.raises(UserError, match="blob_api='mmap'"):
        TrainLoader(root, blob_api="mmap")


def test_pad_dtype_converts_while_padding_bf16(lakes):
    root, arrays = lakes["bf16"]
    loader, got = _batches(root, num_workers=2, pad_dtype=torch.float32)
    b = got[0]
    assert loader.blob_api == "mmap" and b.guidance.dtype == torch.float32 and b.winner.dtype == torch.bfloat16
    for j, pid in enumerate(b.pair_ids):
        n = int(arrays["lens"][_row(pid)])
        want = torch.from_numpy(arrays["guidance"][_row(pid)].astype(np.float32)).bfloat16().float()
        assert torch.equal(b.guidance[j, :n], want)
    assert b.to("cpu", torch.float32).guidance is b.guidance  # already in the training dtype: no copy


@pytest.mark.parametrize("name", ["fp8", "fp8_v22"])
def test_fp8_is_dequantised_while_padding(lakes, name):
    root, arrays = lakes[name]
    for pad in (None, torch.float32, "stored"):
        loader, got = _batches(root, num_workers=2, pad_dtype=pad)
        assert loader.fp8 and loader.blob_api == ("mmap" if name == "fp8" else "take_blobs")
        for b in got[:3]:
            g = b.to("cpu", torch.float32).guidance
            for j, pid in enumerate(b.pair_ids):
                i, n = _row(pid), int(arrays["lens"][_row(pid)])
                q, scale = arrays["guidance_fp8"][i]
                exact = q.view(torch.float8_e4m3fn).float() * scale[:, None]  # torch's own fp8 conversion
                want = exact if pad in (torch.float32, "stored") else exact.half().float()
                assert torch.equal(g[j, :n], want), (pad, pid)
                assert torch.count_nonzero(g[j, n:]) == 0
                fp16 = torch.from_numpy(arrays["guidance"][i].astype(np.float32))
                assert float((g[j, :n] - fp16).norm() / fp16.norm()) < 0.05  # e4m3: ~3 % of the values' size
        if pad is None:
            assert got[0].guidance.dtype == torch.float16
        if pad == "stored":
            assert got[0]._scale is not None and got[0]._padded.dtype == torch.uint8  # kept as e4m3 bytes
    with pytest.raises(UserError, match="pad_dtype="):
        TrainLoader(lakes["v21"][0], pad_dtype="fp8")
    same = TrainLoader(lakes["v21"][0], batch_size=8, heldout_pairs=0, pad_dtype="stored")
    assert same.pad_dtype == torch.float16  # a 16-bit lake: "stored" is the default


def test_a_wrong_blob_position_is_caught_and_read_through_lance(lakes, caplog):
    root, arrays = lakes["v21"]
    loader = TrainLoader(root, batch_size=8, heldout_pairs=0, num_workers=0)
    desc = loader.ds.take([0], columns=["_rowaddr", "guidance"]).to_pylist()[0]
    pos, size = desc["guidance"]["position"], desc["guidance"]["size"]
    fragment = desc["_rowaddr"] >> 32
    with caplog.at_level(logging.WARNING):
        assert loader._data_file(fragment, 0, pos + 64, size) is None  # bytes at a shifted position differ
    assert "do not match" in caplog.text
    # that fragment is now read through Lance, still exactly
    b = loader.read([0, 1])
    for j in range(2):
        n = int(arrays["lens"][j])
        assert torch.equal(b.guidance[j, :n], torch.from_numpy(arrays["guidance"][j]))


def test_dequantize_table_equals_torch_and_per_token_scales_beat_one_scale():
    h = fp8.llama_like(length=64, dim=512, seed=3)
    q, scale = fp8.quantize(h)
    assert q.dtype == torch.uint8 and scale.shape == (64,)
    exact = q.view(torch.float8_e4m3fn).float() * scale[:, None]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(fp8.dequantize(q, scale, dtype), exact.to(dtype))
    stats = fp8.error_stats(h)
    assert stats["rel_l2"] < 0.03 and stats["cosine_min"] > 0.999
    assert stats["zeroed"] < stats["per_tensor_zeroed"] and stats["worst_token_rel_l2"] < stats["per_tensor_worst_token_rel_l2"]
    zeros = fp8.quantize(torch.zeros(3, 8))
    assert torch.equal(fp8.dequantize(*zeros), torch.zeros(3, 8))  # an all-zero token: scale 1, no NaN


def test_rows_after_deletes_are_found_in_their_fragments(tmp_path):
    """The embed job deletes orphan features rows: dataset offsets then differ from offsets in the files."""
    import lance

    root = str(tmp_path / "del")
    arrays = write_synthetic_lake(root, n_pairs=60, seed=4, data_storage_version="2.1", **DIMS)
    lance.dataset(f"{root}/features.lance").delete("pair_id IN ('shard-000.parquet#3', 'shard-000.parquet#25', "
                                                   "'shard-000.parquet#41')")
    loader, got = _batches(root, num_workers=2)
    _, want = _batches(root, num_workers=0, blob_api="take_blobs")
    assert loader.blob_api == "mmap" and len(loader.pair_ids) == 57
    for a, b in zip(got, want):
        assert a.pair_ids == b.pair_ids and torch.equal(a.guidance, b.guidance)
        assert torch.equal(a.winner, b.winner) and torch.equal(a.loser, b.loser)
        for j, pid in enumerate(a.pair_ids):
            assert torch.equal(a.loser[j], torch.from_numpy(arrays["loser"][_row(pid)]))
