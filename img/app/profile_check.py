"""``img profile check NAME [--dry-run]``: what a profile resolves to, and whether its shapes fit.

Without ``--dry-run`` every component is looked up offline (local path, HF cache
or tiny build) and reported on one line; a missing one names the env variable
and TOML key that fix it. For ``tiny``/``bench`` every component is then loaded
through ``from_pretrained`` and run once. Real weights are not loaded (that is a
job's work); their configs are checked against the profile's dims.

``--dry-run`` needs no weights: it builds every real-size architecture on the
meta device from the configs shipped in ``img/models/configs/`` (or the tiny
build's configs), prints parameter counts, and pushes a batch's *shapes*
through image -> CLIP -> IP projection, (image, question) -> MLLM guidance ->
aligner -> IP cross-attention of the diffusion model. Nothing is allocated::

    img profile check tiny
    img profile check sdxl            # offline, no weights: exits 1, one line per missing model
    img profile check sdxl --dry-run  # exits 0 in seconds; aligner 195,094,528 parameters
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from img.aligner import ImplicitAligner, param_count
from img.errors import UserError
from img.features import GuidanceEncoder, IPTokenEncoder, TextGuidanceEncoder
from img.models.loading import QWEN_MAX_PIXELS, ModelNotFound, has_weights, load_sdxl_pipeline, locate
from img.models.profiles import Profile, get_profile
from img.models.tiny import IP_ENCODER_SUBFOLDER, get_spec, tiny_root
from img.questions import question_for

CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
DRY_BATCH = 2
DRY_TEXT_TOKENS = 40  # prompt text around the image tokens ("USER: ... question ... ASSISTANT:"), typical


def check(name: str, dry_run: bool = False, out: Callable[[str], Any] = print) -> int:
    """Check profile ``name``; returns the exit code (0 ok, 1 something missing or inconsistent)."""
    profile = get_profile(name)
    out(f"profile {profile.name} ({profile.family}): {profile.description}")
    out(f"  MLLM input: conversation {profile.mllm_template!r}, images {profile.mllm_image!r}")
    if dry_run:
        return dry_run_check(profile, out)
    return resolve_check(profile, out)


# ---------------------------------------------------------------- resolution
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _dims_problems(profile: Profile, found: dict[str, Path]) -> list[str]:
    """Compare the resolved models' configs with the profile's dims (cheap JSON reads)."""
    d = profile.dims
    problems = []
    if "mllm" in found:
        cfg = _read_json(found["mllm"] / "config.json")
        text = cfg.get("text_config") or {}
        hidden = text.get("hidden_size", cfg.get("hidden_size"))
        if hidden is not None and hidden != d.mllm_hidden:
            problems.append(f"mllm hidden size is {hidden} but profile {profile.name!r} expects E={d.mllm_hidden}")
    if "ip_encoder" in found:
        cfg = _read_json(found["ip_encoder"] / "config.json")
        cfg = cfg.get("vision_config", cfg)
        if cfg.get("hidden_size") not in (None, d.clip_hidden):
            problems.append(f"ip_encoder width is {cfg['hidden_size']}, profile expects {d.clip_hidden}")
    if "base" in found:
        sub = "unet" if profile.family == "sdxl" else "transformer"
        cfg = _read_json(found["base"] / sub / "config.json")
        key = "cross_attention_dim" if profile.family == "sdxl" else "joint_attention_dim"
        if cfg.get(key) not in (None, d.ip_dim):
            problems.append(f"base {sub} {key} is {cfg[key]}, profile expects D={d.ip_dim}")
    return problems


def resolve_check(profile: Profile, out: Callable[[str], Any] = print) -> int:

    found: dict[str, Path] = {}
    missing = 0
    overridden = dict(profile.sources)
    for comp, ref in profile.components().items():
        t0 = time.perf_counter()
        try:
            loc = locate(profile, comp)
        except ModelNotFound as e:
            missing += 1
            out(f"  MISSING  {comp:<10} {e}")
            continue
        if loc.path.is_dir() and comp != "base" and not has_weights(loc.path):
            missing += 1
            out(f"  MISSING  {comp:<10} {ref.id}: {loc.path} has a config but no weights. "
                f"Set {profile.setting_for(comp)}.")
            continue
        found[comp] = loc.path
        via = f", set by {overridden[comp]}" if comp in overridden else ""
        out(f"  ok       {comp:<10} {ref.id} -> {loc.path} ({loc.source}{via}, {time.perf_counter() - t0:.2f}s)")
    problems = _dims_problems(profile, found)
    for p in problems:
        out(f"  MISMATCH {p}")
    if missing or problems:
        out(f"FAILED: {missing} missing, {len(problems)} inconsistent. Nothing was downloaded (offline).")
        return 1
    if profile.tiny:
        return _smoke_tiny(profile, out)
    out("ok: every component resolves and its config matches the profile's dims (weights not loaded).")
    return 0


class _TinySmoke:
    """One forward of every tiny component, each loaded through from_pretrained; a step returns its report line."""

    CAPTION = "a red square"

    def __init__(self, profile: Profile) -> None:
        from PIL import Image

        self.profile, self.d = profile, profile.dims
        self.image = Image.new("RGB", (128, 128), (40, 40, 60))
        self.image.paste((220, 30, 30), (32, 32, 96, 96))
        self.question = question_for(self.CAPTION, key="profile-check", seed=0)
        self.c: Any = None  # IP tokens, then guidance: what the aligner step needs
        self.h: Any = None

    def ip_tokens(self) -> str:
        enc = IPTokenEncoder(self.profile)
        self.c = enc([self.image])
        assert self.c.shape == (1, self.d.ip_tokens, self.d.ip_dim), self.c.shape
        return f"{type(enc.encoder).__name__} + {type(enc.projection).__name__}: tokens {tuple(self.c.shape)}"

    def guidance(self) -> str:
        enc = GuidanceEncoder(self.profile)
        (self.h,) = enc([self.image], [self.question])
        assert self.h.shape[1] == self.d.mllm_hidden, self.h.shape
        return f"{type(enc.model).__name__}: guidance {tuple(self.h.shape)}"

    def text(self) -> str:
        (t,) = TextGuidanceEncoder(self.profile)([self.CAPTION])
        return f"CLIPTextModel + CLIPTextModelWithProjection: text guidance {tuple(t.shape)}"

    def aligner(self) -> str:
        import torch

        passes = self.profile.aligner_passes
        model = ImplicitAligner(self.profile.aligner_config()).eval()
        with torch.inference_mode():
            y = model.align(self.h[None], self.c, passes=passes)
        assert y.shape == self.c.shape
        return f"ImplicitAligner x{passes}: {tuple(y.shape)}"

    def pipeline(self) -> str:
        import torch

        pipe = load_sdxl_pipeline(self.profile)
        pipe.set_ip_adapter_scale(self.profile.ip_scale)
        img = pipe(self.CAPTION, ip_adapter_image=self.image, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0)).images[0]
        assert img.size == (self.d.image_size, self.d.image_size), img.size
        return f"{type(pipe).__name__} + load_ip_adapter: 2 steps -> {img.size[0]}x{img.size[1]} image"


def _smoke_tiny(profile: Profile, out: Callable[[str], Any]) -> int:
    """Load every tiny component through from_pretrained and run one forward of each."""
    smoke = _TinySmoke(profile)
    failures = 0
    for label in ("ip_tokens", "guidance", "text", "aligner", "pipeline"):
        if label == "aligner" and (smoke.c is None or smoke.h is None):
            continue  # its inputs failed, reported above
        t0 = time.perf_counter()
        try:
            msg = getattr(smoke, label)()
        except Exception as e:  # noqa: BLE001 - report any failure of a component as one line
            failures += 1
            out(f"  FAIL     {label:<10} {type(e).__name__}: {e}")
            continue
        out(f"  ran      {label:<10} {msg} ({time.perf_counter() - t0:.2f}s)")
    if failures:
        out(f"FAILED: {failures} component(s) did not run.")
        return 1
    out("ok: every component loads through from_pretrained and runs.")
    return 0


# ---------------------------------------------------------------- dry run
def _arch_sources(profile: Profile) -> dict[str, Path]:
    """Config files of every architecture: shipped ones for real profiles, the tiny build's for tiny."""
    if profile.tiny:

        root = tiny_root(profile.tiny)
        return {
            "base": root / "sdxl",
            "ip_encoder": root / "ip_adapter" / IP_ENCODER_SUBFOLDER / "config.json",
            "mllm": root / "llava" / "config.json",
        }
    refs = profile.components()
    return {comp: CONFIGS / ref.shipped for comp, ref in refs.items() if ref.shipped}


def _ip_projection_args(profile: Profile) -> dict[str, Any]:
    if profile.tiny:

        s = get_spec(profile.tiny)
        return dict(embed_dims=s.ip_hidden, output_dims=s.ip_dim, hidden_dims=s.resampler_heads * 64, depth=4,
                    dim_head=64, heads=s.resampler_heads, num_queries=s.ip_tokens, ffn_ratio=4)
    return _read_json(CONFIGS / profile.ip_weights.shipped)["image_proj"]


def _qwen_image_tokens(config: Any, side: int = 1024) -> int:
    """Image tokens Qwen2.5-VL makes of a ``side`` x ``side`` image under img's max_pixels."""

    patch, merge = config.vision_config.patch_size, config.vision_config.spatial_merge_size
    factor = patch * merge
    h = w = round(side / factor) * factor
    if h * w > QWEN_MAX_PIXELS:
        beta = (side * side / QWEN_MAX_PIXELS) ** 0.5
        h = w = int(side / beta // factor) * factor
    return (h // patch) * (w // patch) // (merge * merge)


class _Shapes:
    """The shape walk's report: one line per stage, and every mismatch."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems: list[str] = []

    def expect(self, label: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
        if tuple(got) != tuple(want):
            self.problems.append(f"{label}: got {tuple(got)}, expected {tuple(want)}")


def _shapes_ip_tokens(profile: Profile, models: dict[str, Any], report: _Shapes) -> Any:
    """image -> CLIP -> IP projection: the tokens c_I (meta)."""
    import torch

    d, B = profile.dims, DRY_BATCH
    enc = models["ip_encoder"]
    px = torch.empty(B, 3, enc.config.image_size, enc.config.image_size)
    report.lines.append(f"image {tuple(px.shape)}")
    if profile.ip_kind == "xlabs":
        feats = enc(px).image_embeds
        report.lines.append(f"-> CLIP image_embeds {tuple(feats.shape)}")
    else:
        feats = enc(px, output_hidden_states=True).hidden_states[-2]
        report.lines.append(f"-> CLIP penultimate {tuple(feats.shape)}")
        report.expect("CLIP penultimate", feats.shape, (B, d.clip_tokens, d.clip_hidden))
    c = models["ip_projection"](feats)
    report.lines.append(f"-> {type(models['ip_projection']).__name__} {tuple(c.shape)} = c_I")
    report.expect("IP tokens", c.shape, (B, d.ip_tokens, d.ip_dim))
    return c


def _shapes_aligned(profile: Profile, models: dict[str, Any], c: Any, report: _Shapes) -> Any:
    """(image, question) -> MLLM guidance h; (h, c_I) -> the aligner's passes: c_I' (meta)."""
    h, note = _meta_guidance(profile, models["mllm"], DRY_BATCH)
    report.lines.append(f"(image, question) -> {type(models['mllm']).__name__} hidden_states[-1] {tuple(h.shape)} "
                        f"[{note}]")
    if h.shape[-1] != profile.dims.mllm_hidden:
        report.problems.append(f"guidance width {h.shape[-1]} != profile E={profile.dims.mllm_hidden}")
    y = c
    for _ in range(profile.aligner_passes):
        y = models["aligner"](h, y)
    report.lines.append(f"-> ImplicitAligner x{profile.aligner_passes} {tuple(y.shape)} = c_I'")
    report.expect("aligner output", y.shape, c.shape)
    return y


def _shapes_injection(profile: Profile, models: dict[str, Any], y: Any, report: _Shapes) -> None:
    """c_I' -> the IP-Adapter's keys and values on every cross-attention layer (meta)."""
    d, B = profile.dims, DRY_BATCH
    procs, cross = models["ip_layers"], models["cross_attention_dim"]
    widths = sorted({p.to_k_ip[0].out_features for p in procs})
    for p in procs:
        k, v = p.to_k_ip[0](y), p.to_v_ip[0](y)
        if p.to_k_ip[0].in_features != cross or k.shape[:2] != (B, d.ip_tokens) or v.shape != k.shape:
            report.problems.append(f"IP layer expects width {p.to_k_ip[0].in_features}, tokens are {y.shape[-1]}")
            break
    report.lines.append(f"-> IP-Adapter keys/values on {len(procs)} cross-attention layers "
                        f"({B}, {d.ip_tokens}, {'/'.join(map(str, widths))}); cross-attention dim {cross}")
    if cross != d.ip_dim:
        report.problems.append(f"diffusion cross-attention dim {cross} != IP token width D={d.ip_dim}")


def dry_run_check(profile: Profile, out: Callable[[str], Any] = print) -> int:
    """Build real-size architectures on the meta device, count parameters, check the shapes end to end."""
    import torch

    t_start = time.perf_counter()
    rows: list[tuple[str, int, str, str]] = []
    with torch.device("meta"):
        models = _build_meta(profile, _arch_sources(profile), rows)
    width = max(len(r[0]) for r in rows)
    out(f"architectures on the meta device (no weights), from {CONFIGS if not profile.tiny else 'the tiny build'}:")
    for name, n, cls, where in rows:
        out(f"  {name:<{width}}  {n:>15,}  {cls}  [{where}]")
    total = sum(n for _, n, _, _ in rows)
    out("  (IMG trains only the aligner; every other component is frozen)")

    report = _Shapes()
    with torch.device("meta"), torch.inference_mode():
        c = _shapes_ip_tokens(profile, models, report)
        y = _shapes_aligned(profile, models, c, report)
        _shapes_injection(profile, models, y, report)
    out("shapes (meta tensors, batch of %d):" % DRY_BATCH)
    for s in report.lines:
        out(f"  {s}")
    for p in report.problems:
        out(f"  MISMATCH {p}")
    secs = time.perf_counter() - t_start
    if report.problems:
        out(f"FAILED: {len(report.problems)} shape mismatch(es) ({secs:.1f}s).")
        return 1
    out(f"ok: dry run passed in {secs:.1f}s; {total:,} parameters in all, none allocated.")
    return 0


def _config(path: Path) -> dict[str, Any]:
    cfg = _read_json(path)
    if not cfg:
        raise UserError(f"architecture config {path} is missing or not JSON; reinstall img (package data).")
    return {k: v for k, v in cfg.items() if not k.startswith("_comment")}


def _rel(p: Path) -> str:
    """A shipped config's path from the repository root (absolute for anything else)."""
    try:
        return str(p.relative_to(CONFIGS.parents[2]))
    except ValueError:
        return str(p)


def _meta_sdxl(profile: Profile, base: Path, rows: list) -> dict[str, Any]:
    """SDXL's UNet and text encoders (counted), the IP-Adapter Plus projection and one IP layer per cross-attention."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg = base / "unet" / "config.json"
    unet = UNet2DConditionModel.from_config(_config(unet_cfg))
    label = "unet (DPO)" if profile.unet is not None else "unet"
    rows.append((label, param_count(unet), "UNet2DConditionModel", _rel(unet_cfg)))
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        p = base / sub / "config.json"
        rows.append((sub, param_count(cls(CLIPTextConfig.from_dict(_config(p)))), cls.__name__, _rel(p)))
    procs = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            procs.append(IPAdapterAttnProcessor2_0(hidden_size=attn.to_k.out_features,
                                                   cross_attention_dim=unet.config.cross_attention_dim,
                                                   num_tokens=(profile.dims.ip_tokens,)))
    return {"ip_projection": IPAdapterPlusImageProjection(**_ip_projection_args(profile)), "ip_layers": procs,
            "cross_attention_dim": unet.config.cross_attention_dim}


def _meta_flux(profile: Profile, base: Path, rows: list) -> dict[str, Any]:
    """FLUX's transformer and text encoders (counted), the XLabs projection and one IP layer per double block."""
    from diffusers import FluxTransformer2DModel
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tcfg = base / "transformer" / "config.json"
    tr = FluxTransformer2DModel.from_config(_config(tcfg))
    rows.append(("transformer", param_count(tr), "FluxTransformer2DModel", _rel(tcfg)))
    p = base / "text_encoder" / "config.json"
    rows.append(("text_encoder", param_count(CLIPTextModel(CLIPTextConfig.from_dict(_config(p)))), "CLIPTextModel",
                 _rel(p)))
    p = base / "text_encoder_2" / "config.json"
    rows.append(("text_encoder_2", param_count(T5EncoderModel(T5Config.from_dict(_config(p)))), "T5EncoderModel",
                 _rel(p)))
    procs = [FluxIPAdapterAttnProcessor(hidden_size=tr.inner_dim, cross_attention_dim=tr.config.joint_attention_dim,
                                        num_tokens=(profile.dims.ip_tokens,)) for _ in range(tr.config.num_layers)]
    return {"ip_projection": ImageProjection(**_ip_projection_args(profile)), "ip_layers": procs,
            "cross_attention_dim": tr.config.joint_attention_dim}


def _meta_mllm(profile: Profile, config: Path) -> Any:
    """The profile's MLLM class (LLaVA or Qwen2.5-VL) from its config."""
    if profile.mllm_kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(_config(config)))
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(LlavaConfig.from_dict(_config(config)))


def _build_meta(profile: Profile, src: dict[str, Path], rows: list) -> dict[str, Any]:
    """Instantiate every architecture (under a meta device context) and record its parameter count in ``rows``.

    Returns the modules the shape check runs: ip_encoder, ip_projection, ip_layers, mllm, aligner (and the
    diffusion model's cross_attention_dim; the diffusion model itself is dropped once counted).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    base = src["base"]
    models = (_meta_sdxl if profile.family == "sdxl" else _meta_flux)(profile, base, rows)
    vae_cfg = base / "vae" / "config.json"
    rows.append(("vae", param_count(AutoencoderKL.from_config(_config(vae_cfg))), "AutoencoderKL", _rel(vae_cfg)))
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(_config(src["ip_encoder"])))
    rows.append(("ip_encoder", param_count(enc), "CLIPVisionModelWithProjection", _rel(src["ip_encoder"])))
    proj, procs = models["ip_projection"], models["ip_layers"]
    ip_src = _rel(CONFIGS / profile.ip_weights.shipped) if not profile.tiny else "tiny spec"
    rows.append(("ip_projection", param_count(proj), type(proj).__name__, ip_src))
    rows.append(("ip_layers", sum(param_count(p) for p in procs), f"{len(procs)} x {type(procs[0]).__name__}", ip_src))
    mllm = _meta_mllm(profile, src["mllm"])
    rows.append(("mllm", param_count(mllm), type(mllm).__name__, _rel(src["mllm"])))
    acfg = profile.aligner_config()
    aligner = ImplicitAligner(acfg)
    rows.append(("aligner", param_count(aligner), "ImplicitAligner(" + ", ".join(
        f"{k}={v}" for k, v in acfg.to_dict().items()) + ")", "profile.aligner_config()"))
    models.update(ip_encoder=enc, mllm=mllm, aligner=aligner)
    return models


def _meta_guidance(profile: Profile, mllm: Any, batch: int) -> tuple[Any, str]:
    """Guidance shape: the MLLM's image features + text embeddings through its language model, on meta."""
    import torch

    cfg = mllm.config
    text_ids = torch.zeros(batch, DRY_TEXT_TOKENS, dtype=torch.long)
    text = mllm.model.get_input_embeddings()(text_ids)
    if profile.mllm_kind == "qwen2_5_vl":
        # Qwen's vision tower plans its windows from concrete grid sizes, which meta tensors do not have:
        # the image-token count is computed from the processor's resize rule instead.
        n_img = _qwen_image_tokens(cfg)
        image = torch.empty(batch, n_img, cfg.text_config.hidden_size)
        note = f"{n_img} image tokens for a 1024 px image (computed) + {DRY_TEXT_TOKENS} text tokens"
    else:
        S = cfg.vision_config.image_size
        px = torch.empty(batch, 3, S, S)
        feats = mllm.model.get_image_features(
            pixel_values=px,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = getattr(feats, "pooler_output", feats)
        image = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        note = f"{image.shape[1]} image tokens ({S} px, patch {cfg.vision_config.patch_size}) + {DRY_TEXT_TOKENS} text tokens"
    embeds = torch.cat([image.to(text.dtype), text], dim=1)
    hidden = mllm.model.language_model(inputs_embeds=embeds).last_hidden_state
    return hidden, note
