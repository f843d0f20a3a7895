"""fp8 guidance: float8 e4m3 values with one scale per token (the embed job quantises, the loader dequantises).

    q, scale = quantize(h)                       # h (L, E) -> q (L, E) uint8 (e4m3 bits), scale (L,) float32
    h2 = dequantize(q, scale, torch.float16)     # (L, E); h2 ~ h within e4m3's 3 mantissa bits
    dequantize_into(out[:L], q, scale)           # into a preallocated tensor (how the loader pads)

Why one scale per token: LLaMA-family hidden states carry a few outlier channels
(tens to hundreds) and "massive activations" on a few tokens such as the first
(thousands), far beyond e4m3's range (max 448). One scale per tensor is set by
the largest of those, so the ordinary tokens fall into e4m3's subnormals or to
zero. One scale per token (its absolute maximum / 448) keeps every token's own
range: the relative error of any token is that of e4m3 itself (~2-3 % RMS).

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
    """Round-trip error of ``h`` (L, E): relative L2 error, mean per-token cosine, and the same with one scale
    for the whole tensor (what per-token scaling avoids)."""
    x = h.detach().float()
    per_token = dequantize(*quantize(x))
    amax = x.abs().max()
    s = (amax / E4M3_MAX) if amax > 0 else torch.tensor(1.0)
    per_tensor = (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s

    def rel(y: torch.Tensor) -> float:
        return float((y - x).norm() / x.norm().clamp_min(1e-30))

    def cos(y: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(y, x, dim=-1).mean())

    return {"rel_l2": rel(per_token), "cosine": cos(per_token), "cosine_min": float(
        torch.nn.functional.cosine_similarity(per_token, x, dim=-1).min()),
        "per_tensor_rel_l2": rel(per_tensor), "per_tensor_cosine": cos(per_tensor)}
