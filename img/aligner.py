"""The Implicit Aligner: refines IP-Adapter image tokens with MLLM guidance.

A perceiver-style stack, exactly as released by the IMG authors (same module
names, so their state dicts load unchanged)::

    from img.aligner import AlignerConfig, ImplicitAligner, load_official_checkpoint

    model = ImplicitAligner(AlignerConfig())            # SDXL sizes, identity at init
    refined = model.align(h, c_I, guidance_mask=mask)   # inference: config.passes (3) passes
    model.save_pretrained("runs/r1/aligner")             # model.safetensors + config.json (sizes and passes)
    model = ImplicitAligner.from_pretrained("runs/r1/aligner")
    model = load_official_checkpoint("img_sdxl.pth", AlignerConfig())

Shapes: guidance ``h`` (B, L, guidance_dim), image tokens ``c_I`` (B, N, dim);
the output has the shape of ``c_I``. ``guidance_mask`` (B, L) bool marks valid
guidance positions (True); padded ones are left out of the keys and values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from img.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class AlignerConfig:
    """Sizes of the aligner. Defaults are the released SDXL aligner (195,094,528 parameters)."""

    dim: int = 2048  # D: width of the image tokens the stack works in (IP-Adapter Plus SDXL tokens are 16 x 2048)
    depth: int = 4  # number of (attention, feed-forward) blocks; 4 in the release
    dim_head: int = 64  # per-head width; inner attention width is heads * dim_head = 1280, not D
    heads: int = 20  # attention heads (same as the IP-Adapter Plus resampler)
    guidance_dim: int = 5120  # E: MLLM hidden size (LLaVA-1.5-13B = 5120); proj_in maps E -> D
    output_dim: int = 2048  # D_out: width of the refined tokens; equals D so the residual output matches c_I
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * D
    passes: int = 3  # not architecture: how many times inference applies the aligner (`align`); 3 in the paper

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AlignerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"aligner config has unknown key(s) {unknown}; known keys: {sorted(known)}.")
        return cls(**{k: int(v) for k, v in d.items()})


class PerceiverAttention(nn.Module):
    """Queries from the image tokens; keys/values from [guidance ; image tokens]."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # on the guidance x
        self.norm2 = nn.LayerNorm(dim)  # on the image tokens q
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, H, n, d)

    def forward(self, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, q = self.norm1(x), self.norm2(q)
        b, n, _ = q.shape
        query = self._split(self.to_q(q))
        k, v = self.to_kv(torch.cat([x, q], dim=1)).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))  # split between q and k, as released (fp16-safe)
        logits = (query * scale) @ (k * scale).transpose(-2, -1)  # (B, H, N, L+N)
        logits = logits.float()
        if mask is not None:
            # keys = [guidance (L) ; image tokens (N)]; image-token keys are always valid,
            # so no row is fully masked and the softmax never sees only -inf.
            keep = torch.cat([mask, mask.new_ones(b, n)], dim=1)[:, None, None, :]
            logits = logits.masked_fill(~keep, float("-inf"))
        weight = torch.softmax(logits, dim=-1).to(v.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Keys layers.{i}.1.{0,1,3}: 0 = LayerNorm, 1 and 3 = Linear, 2 = GELU (no params).
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class ImplicitAligner(nn.Module):
    """f(h, c_I) -> c_I'. Output = c_I + zero_linear(norm_out(proj_out(stack(h, c_I)))), identity at init."""

    def __init__(self, config: AlignerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AlignerConfig()
        if config.output_dim != config.dim:
            raise UserError(
                f"aligner output_dim={config.output_dim} must equal dim={config.dim}: the output is added "
                "to the input image tokens. Set both to the IP token width of the profile."
            )
        if config.passes < 0:
            raise UserError(f"aligner passes={config.passes} must be >= 0 (the paper uses 3). Fix config.json.")
        self.proj_in = nn.Linear(config.guidance_dim, config.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(config.dim, config.dim_head, config.heads),
                 _feed_forward(config.dim, config.ff_mult)]
            )
            for _ in range(config.depth)
        )
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.zero_linear = nn.Linear(config.output_dim, config.output_dim)
        nn.init.zeros_(self.zero_linear.weight)
        nn.init.zeros_(self.zero_linear.bias)

    def forward(
        self, guidance: torch.Tensor, image_tokens: torch.Tensor, guidance_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One pass. guidance (B, L, E), image_tokens (B, N, D), guidance_mask (B, L) bool, True = valid."""
        if guidance.shape[-1] != self.config.guidance_dim or image_tokens.shape[-1] != self.config.dim:
            raise UserError(
                f"aligner got guidance width {guidance.shape[-1]} and image-token width {image_tokens.shape[-1]}, "
                f"expected {self.config.guidance_dim} and {self.config.dim}. Use the profile that made the features."
            )
        if guidance_mask is not None:
            guidance_mask = guidance_mask.to(torch.bool)
            if guidance_mask.shape != guidance.shape[:2]:
                raise ValueError(f"guidance_mask shape {tuple(guidance_mask.shape)} != {tuple(guidance.shape[:2])}")
        x = self.proj_in(guidance)
        q = image_tokens
        for attn, ff in self.layers:
            q = q + attn(x, q, guidance_mask)
            q = q + ff(q)
        return image_tokens + self.zero_linear(self.norm_out(self.proj_out(q)))

    def align(
        self,
        guidance: torch.Tensor,
        image_tokens: torch.Tensor,
        passes: int | None = None,
        guidance_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the aligner ``passes`` times (default ``config.passes``), each on the previous output; 0 = input."""
        if passes is None:
            passes = self.config.passes
        if passes < 0:
            raise UserError(f"passes must be >= 0, got {passes}. The paper uses 3.")
        out = image_tokens
        for _ in range(passes):
            out = self(guidance, out, guidance_mask)
        return out

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (fp32 or current dtype) and ``config.json`` into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "model": "ImplicitAligner"})
        (d / CONFIG_NAME).write_text(
            json.dumps({"model": "ImplicitAligner", **self.config.to_dict()}, indent=2, sort_keys=True) + "\n"
        )
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "ImplicitAligner":
        """Load a folder written by ``save_pretrained``: the config comes from ``config.json``."""
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise UserError(
                f"{str(d)!r} is not an aligner folder: expected {CONFIG_NAME} and {WEIGHTS_NAME}. "
                "Point at a folder written by save_pretrained (e.g. <run-dir>/aligner)."
            )
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{str(cfg_path)!r} is not readable JSON ({_first_line(e)}). Point at a folder written "
                            "by save_pretrained (e.g. <run-dir>/aligner).") from None
        if not isinstance(raw, dict):
            raise UserError(f"{str(cfg_path)!r} does not hold an aligner config (a JSON object).")
        raw.pop("model", None)
        config = AlignerConfig.from_dict(raw)
        return load_official_checkpoint(_load_safetensors(w_path), config)


def _read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    p = Path(source)
    if not p.is_file():
        raise UserError(f"aligner checkpoint {str(p)!r} does not exist. Pass the path of a .pth/.pt/.safetensors file.")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:  # weights_only: a pickle that names any code (os.system, ...) is refused, never run
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
                ImportError, IndexError, KeyError, OSError) as e:
            raise UserError(
                f"aligner checkpoint {str(p)!r} is not a PyTorch state dict img can load safely "
                f"({_first_line(e)}). Pass the released aligner_<family>.pth, a .safetensors file or an "
                "`img jobs train` <run-dir>/aligner folder; pickles naming code are never unpickled."
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UserError(f"aligner checkpoint {str(p)!r} holds a {type(obj).__name__}, not a state dict.")
        return obj
    raise UserError(f"aligner checkpoint {str(p)!r} has suffix {p.suffix!r}; expected .pth, .pt or .safetensors.")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    unsafe = [ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln]
    text = (unsafe or lines or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:200]}"


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"aligner weights {str(p)!r} are not a readable safetensors file ({_first_line(e)}). "
                        "Pass a file written by `img jobs train` or the released checkpoint.") from None


def load_official_checkpoint(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path, config: AlignerConfig | None = None
) -> ImplicitAligner:
    """Build an aligner for ``config`` and load released weights (a dict, .pth/.pt, or .safetensors).

    A ``module.`` prefix (from DistributedDataParallel) is stripped. Keys and shapes are checked
    strictly; a mismatch raises ``UserError`` naming the missing/unexpected keys and bad shapes.
    """
    config = config or AlignerConfig()
    if isinstance(state_dict_or_path, (str, Path)):
        sd = _read_state_dict(state_dict_or_path)
    else:
        sd = dict(state_dict_or_path)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    model = ImplicitAligner(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        def _few(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_few(shapes)}")
        raise UserError(
            f"aligner checkpoint does not match AlignerConfig({config.to_dict()}): " + "; ".join(parts)
            + ". Use the profile (dims) the checkpoint was trained for."
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
    return model


def param_count(model: nn.Module) -> int:
    """Parameters of any module (works on the meta device): ``param_count(ImplicitAligner(cfg))``."""
    return sum(p.numel() for p in model.parameters())
