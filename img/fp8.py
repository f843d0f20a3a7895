"""fp8 guidance: float8 e4m3 values with one scale per token (the embed job quantises, the loader dequantises).

    q, scale = quantize(h)                       # h (L, E) -> q (L, E) uint8 (e4m3 bits), scale (L,) float32
    h2 = dequantize(q, scale, torch.float16)     # (L, E); h2 ~ h within e4m3's 3 mantissa bits
    dequantize_into(out[:L], q, scale)           # into a preallocated tensor (how the loader pads)

Why one scale per token: LLaMA-family hidden states carry a few outlier channels
(tens to hundreds) and "massive activations" on a few tokens such as the first
(thousands), far beyond e4m3's range (max 448). One scale per tensor is set by
the largest of those, so the small values of ordinary tokens fall into e4m3's
subnormals or to zero (on ``llama_like`` rows: 17x more values zeroed, worst token
1.3x the error). One scale per token (its absolute maximum / 448) keeps every
token's own range: the relative error of any token is that of e4m3 itself
(~2-3 % RMS).

On CPU, torch's float8 -> float conversion is scalar (~30x slower than a copy),
so ``dequantize_into`` reads a 256-entry table, in cache-sized chunks; on a GPU
it uses torch's native conversion.
"""
from __future__ import annotations

import numpy as np
import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_CHUNK = 16  # tokens per table lookup on CPU: 16 x 5120 fp32 = 320 KB stays in L2


def quantize(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, E) hidden states -> (uint8 e4m3 bits (L, E), float32 scales (L,)); scale = token absmax / 448."""
    x = h.detach().float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale.squeeze(-1).contiguous()


def _table() -> np.ndarray:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


_LUT = _table()  # value of every e4m3 bit pattern (0x7f / 0xff are NaN; quantize never writes them)


def dequantize_into(out: torch.Tensor, q: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray) -> torch.Tensor:
    """out[t, :] = e4m3(q[t, :]) * scale[t]; ``out`` (L, E) of any float dtype, on CPU or a GPU."""
    if out.device.type != "cpu":
        qt = torch.as_tensor(q).to(out.device, non_blocking=True).view(torch.float8_e4m3fn)
        st = torch.as_tensor(scale, dtype=torch.float32).to(out.device, non_blocking=True)
        return out.copy_(qt.to(torch.float32).mul_(st[:, None]))
    qn = q.numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    sn = (scale.numpy() if isinstance(scale, torch.Tensor) else np.asarray(scale)).astype(np.float32, copy=False)
    rows = qn.shape[0]
    direct = out.dtype == torch.float32 and out.is_contiguous()
    o32 = out.numpy() if direct else None
    tmp = None if direct else np.empty((min(_CHUNK, rows), qn.shape[1]), np.float32)
    for s in range(0, rows, _CHUNK):
        e = min(s + _CHUNK, rows)
        dst = o32[s:e] if direct else tmp[: e - s]
        np.take(_LUT, qn[s:e], out=dst)
        np.multiply(dst, sn[s:e, None], out=dst)
        if not direct:
            out[s:e].copy_(torch.from_numpy(dst))
    return out


def dequantize(q: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A new (L, E) tensor of ``dtype``; see ``dequantize_into``."""
    out = torch.empty(tuple(q.shape), dtype=dtype, device=device)
    return dequantize_into(out, q, scale)


def error_stats(h: torch.Tensor) -> dict[str, float]:
    """Round-trip error of ``h`` (L, E) with one scale per token, and with one scale for the whole tensor.

    rel_l2: ||q(h) - h|| / ||h||; cosine / cosine_min: mean and worst per-token cosine; worst_token_rel_l2: the
    largest per-token relative error; zeroed: share of non-zero values that come back as 0. ``per_tensor_*``:
    the same with one scale (what one scale per token avoids).
    """
    x = h.detach().float()
    per_token = dequantize(*quantize(x))
    amax = x.abs().max()
    s = (amax / E4M3_MAX) if amax > 0 else torch.tensor(1.0)
    per_tensor = (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
    out = {}
    for prefix, y in (("", per_token), ("per_tensor_", per_tensor)):
        cos = torch.nn.functional.cosine_similarity(y, x, dim=-1)
        tok = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
        out.update({f"{prefix}rel_l2": float((y - x).norm() / x.norm().clamp_min(1e-30)),
                    f"{prefix}cosine": float(cos.mean()), f"{prefix}cosine_min": float(cos.min()),
                    f"{prefix}worst_token_rel_l2": float(tok.max()),
                    f"{prefix}zeroed": float(((y == 0) & (x != 0)).sum() / (x != 0).sum().clamp_min(1))})
    return out


def llama_like(length: int = 650, dim: int = 5120, seed: int = 0) -> torch.Tensor:
    """A synthetic (length, dim) hidden-state row with LLaMA-family outliers, for measuring quantisation.

    Ordinary channels ~ N(0, sigma_c) with per-channel sigma_c log-normal around 0.5; 6 outlier channels
    with magnitudes 20-100 of a fixed sign on every token (as LLM.int8 reports for 6.7B+ models); and
    "massive activations" of ~2,000-3,000 in 2 channels of the first token, whose other channels are
    small (as reported for LLaMA-2-13B's starting token). The values are not LLaVA's; the structure is.
    """
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.randn(dim, generator=g) * 0.5) * 0.5
    h = torch.randn(length, dim, generator=g) * sigma
    outliers = torch.randperm(dim, generator=g)[:8]
    mags = 20 + 80 * torch.rand(6, generator=g)
    signs = torch.where(torch.rand(6, generator=g) < 0.5, -1.0, 1.0)
    h[:, outliers[:6]] += signs * mags * (1 + 0.1 * torch.randn(length, 6, generator=g))
    h[0] *= 0.05
    h[0, outliers[6:]] = torch.tensor([2600.0, -2100.0])
    return h
