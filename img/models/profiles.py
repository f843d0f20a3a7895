"""Model profiles: every model a job loads, and the dims that follow from them.

Everything downstream reads N, D, E and friends from a profile, never from
literals::

    from img.models.profiles import get_profile, PROFILES
    p = get_profile("sdxl")
    p.dims.ip_tokens, p.dims.ip_dim, p.dims.mllm_hidden   # 16, 2048, 5120
    p.aligner_config()                                     # img.aligner.AlignerConfig for these dims
    p.components()                                         # {"base": ModelRef(...), "ip_encoder": ..., ...}

Profiles: ``tiny`` and ``bench`` (random weights built in code, see
``img.models.tiny``), ``sdxl`` (the paper's main setting), ``sdxl-dpo``,
``flux``, ``sdxl-llava7b``, ``sdxl-qwen`` (alias ``qwen``).

Where the weights come from
---------------------------
Real profiles name Hugging Face hub ids. They are resolved **offline** from the
HF cache (``HF_HOME`` / ``HF_HUB_CACHE``; nothing is ever downloaded) or from a
local path. Override a model with an environment variable (highest priority)
or with a key in ``jobs/profiles/<profile>.toml`` (folder: ``$IMG_PROFILES_DIR``,
default ``jobs/profiles`` of the installed project, never of the working
directory). A value is either a local path or a hub id. A relative path in a
TOML file is taken from the TOML's folder, in a variable from the working
directory; a hub id (a profile's default included) never resolves to a folder
of the working directory that happens to have its name.

==========================  =========================================  =================================
environment variable        default (hub id)                           used by (TOML key)
==========================  =========================================  =================================
``IMG_SDXL_BASE``           stabilityai/stable-diffusion-xl-base-1.0   sdxl*, base
``IMG_SDXL_DPO_UNET``       mhdang/dpo-sdxl-text2image-v1 (``unet/``)  sdxl-dpo, unet
``IMG_IP_ADAPTER``          h94/IP-Adapter (``models/image_encoder``   sdxl*, ip_encoder and ip_weights
                            and ``sdxl_models/ip-adapter-plus_...``)
``IMG_LLAVA_13B``           llava-hf/llava-1.5-13b-hf                  sdxl, sdxl-dpo, flux, mllm
``IMG_LLAVA_7B``            llava-hf/llava-1.5-7b-hf                   sdxl-llava7b, mllm
``IMG_QWEN25_VL_7B``        Qwen/Qwen2.5-VL-7B-Instruct                sdxl-qwen, mllm
``IMG_FLUX_BASE``           black-forest-labs/FLUX.1-dev               flux, base
``IMG_FLUX_IP_ADAPTER``     XLabs-AI/flux-ip-adapter                   flux, ip_weights
``IMG_CLIP_VIT_L``          openai/clip-vit-large-patch14              flux, ip_encoder
``IMG_CACHE``               ~/.cache/img (tiny models are built here)  tiny, bench
==========================  =========================================  =================================

A TOML file may also set ``tensor_dtype = "float16"`` or ``"bfloat16"``, how
the MLLM sees its input: ``mllm_template`` (the conversation text, see
``img.features.format_mllm_prompt``: ``"llava_v0"``, ``"llava_hf"`` or
``"chat_template"``) and ``mllm_image`` (``"pad"``: pad to a square filled with
the processor's mean colour, then resize, as LLaVA-1.5 does; ``"crop"``: the
processor's own preprocessing, which for llava-hf centre-crops), and
``mllm_adapter = "runs/ft/adapter"`` (a fine-tuned MLLM adapter, merged on load). The released
aligners were trained on ``llava_v0`` + ``pad``, the default of every LLaVA
profile. Example ``jobs/profiles/sdxl.toml``::

    base = "/data/models/sdxl-base"
    mllm = "/data/models/img-llava-13b-hf"     # the authors' fine-tuned LLaVA, converted to llava-hf format
    # mllm_template = "llava_hf"               # only for a model used with llava-hf's chat format
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from img.config import jobs_dir, load_config
from img.errors import UserError
from img.finetune.adapter import with_mllm_adapter
from img.models.tiny import FLAVOURS, IP_ENCODER_SUBFOLDER, IP_WEIGHT_NAME, IP_WEIGHT_SUBFOLDER

if TYPE_CHECKING:  # pragma: no cover
    from img.aligner import AlignerConfig


Family = Literal["sdxl", "flux"]
MLLMKind = Literal["llava", "qwen2_5_vl"]
IPKind = Literal["plus", "xlabs"]  # IP-Adapter Plus resampler (SDXL) or XLabs linear projection (FLUX)
# The conversation text the MLLM reads (img.features.format_mllm_prompt): the original LLaVA repository's v0
# conversation, llava-hf's chat format, or the processor's own chat template (Qwen2.5-VL).
MLLMTemplate = Literal["llava_v0", "llava_hf", "chat_template"]
# How an image is fitted to the MLLM's square input: padded with the processor's mean colour (LLaVA-1.5's
# image_aspect_ratio = "pad") or left to the processor (llava-hf: resize the short side, centre-crop).
MLLMImage = Literal["pad", "crop"]
TINY_PREFIX = "tiny:"


@dataclass(frozen=True)
class ModelRef:
    """One model (or file) a profile needs.

    ``repo`` is a hub id, a local path, or ``tiny:<flavour>/<part>`` for models built in code.
    ``subfolder``/``filename`` locate the component inside the repo, as on the hub.
    ``env`` is the environment variable that overrides ``repo``; ``shipped`` names the
    architecture config under ``img/models/configs/`` that ``img profile check --dry-run`` builds.
    """

    repo: str
    subfolder: str = ""
    filename: str = ""
    env: str = ""
    shipped: str = ""

    @property
    def id(self) -> str:
        """Human-readable id: repo plus the path inside it."""
        inner = "/".join(p for p in (self.subfolder, self.filename) if p)
        return f"{self.repo}:{inner}" if inner else self.repo

    @property
    def is_tiny(self) -> bool:
        return self.repo.startswith(TINY_PREFIX)


@dataclass(frozen=True)
class Dims:
    """Shapes that follow from a profile's models."""

    clip_hidden: int  # IP image encoder width (ViT-H/14: 1280)
    clip_tokens: int  # IP image encoder sequence length incl. CLS (ViT-H/14 at 224 px: 257)
    ip_tokens: int  # N: image-prompt tokens (SDXL Plus: 16; FLUX XLabs: 4)
    ip_dim: int  # D: token width = the diffusion model's cross-attention width (SDXL: 2048; FLUX: 4096)
    mllm_hidden: int  # E: MLLM last-layer width (LLaVA-1.5-13B: 5120; 7B: 4096; Qwen2.5-VL-7B: 3584)
    image_size: int  # generation size in px (SDXL/FLUX: 1024; tiny: 64)


@dataclass(frozen=True)
class Profile:
    """Every model a job needs, the dims that follow, and the inference defaults."""

    name: str
    description: str
    family: Family
    base: ModelRef  # diffusers pipeline folder (model_index.json)
    ip_encoder: ModelRef  # CLIPVisionModelWithProjection folder
    ip_weights: ModelRef  # IP-Adapter weights file (image projection + attention layers)
    mllm: ModelRef  # MLLM folder (model + processor)
    dims: Dims
    mllm_kind: MLLMKind = "llava"
    mllm_template: MLLMTemplate = "llava_v0"  # the released aligners' guidance was computed over this text
    mllm_image: MLLMImage = "pad"  # ... and over images padded to a square, as LLaVA-1.5 does
    ip_kind: IPKind = "plus"
    unet: Optional[ModelRef] = None  # UNet that replaces the base's (SDXL-DPO)
    tensor_dtype: str = "bfloat16"  # "float16" | "bfloat16": model compute on GPU, and the stored features
    steps: int = 50
    guidance_scale: float = 7.5  # SDXL: classifier-free guidance; FLUX: distilled guidance
    ip_scale: float = 0.2  # IP-Adapter scale at regeneration
    aligner_passes: int = 3  # the aligner is applied this many times at inference
    aligner_depth: int = 4
    aligner_heads: int = 20
    aligner_dim_head: int = 64
    aligner_ff_mult: int = 4
    tiny: Optional[str] = None  # tiny flavour when every model is built in code
    mllm_adapter: Optional[str] = None  # peft adapter folder merged into the MLLM on load (img jobs finetune-mllm)
    mllm_adapter_id: str = ""  # "sha256:<16 hex>" of the adapter's files; set with img.finetune.adapter.with_mllm_adapter
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (component, "env VAR"/"TOML ...")

    def components(self) -> dict[str, ModelRef]:
        """Component name -> ModelRef, in load order (``unet`` only when the profile overrides it)."""
        out = {"base": self.base}
        if self.unet is not None:
            out["unet"] = self.unet
        out.update(ip_encoder=self.ip_encoder, ip_weights=self.ip_weights, mllm=self.mllm)
        return out

    def model_ids(self) -> dict[str, str]:
        """Ids for table provenance (``schemas.meta``) and the embed fingerprint, incl. the MLLM adapter's."""
        ids = {k: v.id for k, v in self.components().items()}
        if self.mllm_adapter:
            ids["mllm_adapter"] = self.mllm_adapter_id
        return ids

    def aligner_config(self) -> "AlignerConfig":
        """The Implicit Aligner's sizes for this profile (SDXL: 195,094,528 parameters)."""
        from img.aligner import AlignerConfig  # heavy: img.aligner imports torch; profiles stay torch-free

        return AlignerConfig(
            dim=self.dims.ip_dim,
            depth=self.aligner_depth,
            dim_head=self.aligner_dim_head,
            heads=self.aligner_heads,
            guidance_dim=self.dims.mllm_hidden,
            output_dim=self.dims.ip_dim,
            ff_mult=self.aligner_ff_mult,
            passes=self.aligner_passes,
        )

    @property
    def torch_dtype(self):
        import torch

        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[self.tensor_dtype]

    def text_guidance_dim(self) -> int:
        """Width of the text-only guidance (SDXL: both text encoders' penultimate states concatenated = D)."""
        if self.family != "sdxl":
            raise UserError(
                f"text guidance is implemented for SDXL-family profiles; {self.name!r} is {self.family}. "
                "Use an sdxl* profile or set text_guidance = false."
            )
        return self.dims.ip_dim

    def setting_for(self, component: str) -> str:
        """How a user points ``component`` at their copy: the env variable and the TOML key."""
        ref = self.components()[component]
        if ref.is_tiny:
            return "IMG_CACHE (folder where tiny models are built)"
        toml = f"{component} = \"/path\" in {profiles_dir() / (self.name + '.toml')}"
        return f"{ref.env}=/path or {toml}" if ref.env else toml


# ---------------------------------------------------------------- the profiles
SDXL_BASE = ModelRef("stabilityai/stable-diffusion-xl-base-1.0", env="IMG_SDXL_BASE", shipped="sdxl-base-1.0")
SDXL_DPO_UNET = ModelRef("mhdang/dpo-sdxl-text2image-v1", subfolder="unet", env="IMG_SDXL_DPO_UNET",
                         shipped="sdxl-base-1.0/unet/config.json")
IP_ENCODER_H = ModelRef("h94/IP-Adapter", subfolder="models/image_encoder", env="IMG_IP_ADAPTER",
                        shipped="ip-adapter-vit-h14/config.json")
IP_PLUS_SDXL = ModelRef("h94/IP-Adapter", subfolder="sdxl_models", filename="ip-adapter-plus_sdxl_vit-h.safetensors",
                        env="IMG_IP_ADAPTER", shipped="ip-adapter-plus-sdxl.json")
LLAVA_13B = ModelRef("llava-hf/llava-1.5-13b-hf", env="IMG_LLAVA_13B", shipped="llava-1.5-13b-hf/config.json")
LLAVA_7B = ModelRef("llava-hf/llava-1.5-7b-hf", env="IMG_LLAVA_7B", shipped="llava-1.5-7b-hf/config.json")
QWEN_VL_7B = ModelRef("Qwen/Qwen2.5-VL-7B-Instruct", env="IMG_QWEN25_VL_7B",
                      shipped="qwen2.5-vl-7b-instruct/config.json")
FLUX_BASE = ModelRef("black-forest-labs/FLUX.1-dev", env="IMG_FLUX_BASE", shipped="flux.1-dev")
FLUX_IP = ModelRef("XLabs-AI/flux-ip-adapter", filename="ip_adapter.safetensors", env="IMG_FLUX_IP_ADAPTER",
                   shipped="xlabs-flux-ip-adapter.json")
CLIP_VIT_L = ModelRef("openai/clip-vit-large-patch14", env="IMG_CLIP_VIT_L", shipped="clip-vit-large-patch14/config.json")

_SDXL_DIMS = Dims(clip_hidden=1280, clip_tokens=257, ip_tokens=16, ip_dim=2048, mllm_hidden=5120, image_size=1024)


def _tiny_profile(flavour: str, description: str) -> Profile:

    s = FLAVOURS[flavour]
    root = f"{TINY_PREFIX}{flavour}"
    return Profile(
        name=flavour,
        description=description,
        family="sdxl",
        base=ModelRef(f"{root}/sdxl"),
        ip_encoder=ModelRef(f"{root}/ip_adapter", subfolder=IP_ENCODER_SUBFOLDER),
        ip_weights=ModelRef(f"{root}/ip_adapter", subfolder=IP_WEIGHT_SUBFOLDER, filename=IP_WEIGHT_NAME),
        mllm=ModelRef(f"{root}/llava"),
        dims=Dims(
            clip_hidden=s.ip_hidden,
            clip_tokens=s.clip_tokens,
            ip_tokens=s.ip_tokens,
            ip_dim=s.ip_dim,
            mllm_hidden=s.llm_hidden,
            image_size=s.image_size,
        ),
        tensor_dtype="float16",
        steps=20,
        aligner_depth=2,
        aligner_heads=4,
        aligner_dim_head=16,
        tiny=flavour,
    )


def _build_profiles() -> dict[str, Profile]:
    sdxl = Profile(
        name="sdxl",
        description="SDXL base + IP-Adapter Plus (ViT-H) + LLaVA-1.5-13B guidance (the paper's main setting)",
        family="sdxl",
        base=SDXL_BASE,
        ip_encoder=IP_ENCODER_H,
        ip_weights=IP_PLUS_SDXL,
        mllm=LLAVA_13B,
        dims=_SDXL_DIMS,
    )
    profiles = {
        "tiny": _tiny_profile("tiny", "tiny models of the real classes, built in code, encoders pre-trained on the "
                                      "shapes world (tests, demo)"),
        "bench": _tiny_profile("bench", "tiny classes at larger widths so `img bench embed` measures real compute"),
        "sdxl": sdxl,
        "sdxl-dpo": dataclasses.replace(
            sdxl,
            name="sdxl-dpo",
            description="SDXL base with the Diffusion-DPO UNet; the SDXL aligner is reused as is",
            unet=SDXL_DPO_UNET,
        ),
        "sdxl-llava7b": dataclasses.replace(
            sdxl,
            name="sdxl-llava7b",
            description="SDXL with LLaVA-1.5-7B guidance (E=4096; ablation)",
            mllm=LLAVA_7B,
            dims=dataclasses.replace(_SDXL_DIMS, mllm_hidden=4096),
        ),
        "sdxl-qwen": dataclasses.replace(
            sdxl,
            name="sdxl-qwen",
            description="SDXL with Qwen2.5-VL-7B-Instruct guidance (E=3584; ablation)",
            mllm=QWEN_VL_7B,
            mllm_kind="qwen2_5_vl",
            mllm_template="chat_template",
            mllm_image="crop",  # Qwen2.5-VL's processor keeps the aspect ratio (native-resolution resize)
            dims=dataclasses.replace(_SDXL_DIMS, mllm_hidden=3584),
        ),
        "flux": Profile(
            name="flux",
            description="FLUX.1-dev + XLabs IP-Adapter (CLIP ViT-L/14) + LLaVA-1.5-13B guidance",
            family="flux",
            base=FLUX_BASE,
            ip_encoder=CLIP_VIT_L,
            ip_weights=FLUX_IP,
            mllm=LLAVA_13B,
            ip_kind="xlabs",
            dims=Dims(clip_hidden=1024, clip_tokens=257, ip_tokens=4, ip_dim=4096, mllm_hidden=5120, image_size=1024),
            steps=30,
            guidance_scale=3.5,
        ),
    }
    return profiles


PROFILES: dict[str, Profile] = _build_profiles()
ALIASES: dict[str, str] = {"qwen": "sdxl-qwen", "sdxl-llava13b": "sdxl", "dpo": "sdxl-dpo"}


# ---------------------------------------------------------------- overrides
@dataclass
class ProfileOverrides:
    """Keys of ``jobs/profiles/<name>.toml``; each is a local path or a hub id."""

    base: Optional[str] = None
    unet: Optional[str] = None
    ip_encoder: Optional[str] = None
    ip_weights: Optional[str] = None
    mllm: Optional[str] = None
    tensor_dtype: Optional[Literal["float16", "bfloat16"]] = None
    mllm_template: Optional[MLLMTemplate] = None
    mllm_image: Optional[MLLMImage] = None
    mllm_adapter: Optional[str] = None  # a folder from `img jobs finetune-mllm` (RUN_DIR/adapter)


def profiles_dir() -> Path:
    """Folder of optional per-profile TOML overrides: ``$IMG_PROFILES_DIR``, else the project's ``jobs/profiles``."""
    env = os.environ.get("IMG_PROFILES_DIR")
    return Path(env).expanduser() if env else jobs_dir() / "profiles"


def _local_or_hub(value: str, base: Path) -> str:
    """An override value as an absolute path when it names an existing path relative to ``base``, else as is."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    return str((base / p).absolute()) if (base / p).exists() else value


def _apply_overrides(p: Profile) -> Profile:

    changes: dict[str, object] = {}
    sources: list[tuple[str, str]] = []
    toml = profiles_dir() / f"{p.name}.toml"
    ov = load_config(ProfileOverrides, toml if toml.is_file() else None)
    for key in ("tensor_dtype", "mllm_template", "mllm_image"):
        if getattr(ov, key):
            changes[key] = getattr(ov, key)
    template = changes.get("mllm_template", p.mllm_template)
    if p.mllm_kind != "llava" and template != "chat_template":
        raise UserError(f"mllm_template = {template!r} in {toml} is a LLaVA conversation, but profile {p.name!r} "
                        f"uses {p.mllm_kind}. Remove the key (its processor's chat template is used).")
    for comp, ref in p.components().items():
        value, source = getattr(ov, comp), f"TOML {toml}"
        if value:
            value = _local_or_hub(value, toml.parent)
        env_value = os.environ.get(ref.env) if ref.env else None
        if env_value:  # the user's own shell: a relative path is taken from the working directory
            value, source = _local_or_hub(env_value, Path.cwd()), f"env {ref.env}"
        if value:
            changes[comp] = dataclasses.replace(ref, repo=value)
            sources.append((comp, source))
    if changes:
        p = dataclasses.replace(p, sources=tuple(sources), **changes)
    if ov.mllm_adapter:
        p = with_mllm_adapter(p, ov.mllm_adapter)
    return p


def get_profile(name: str) -> Profile:
    """The profile ``name`` with TOML and environment overrides applied; ``UserError`` if unknown."""
    key = ALIASES.get(name, name)
    if key not in PROFILES:
        known = ", ".join([*PROFILES, *ALIASES])
        raise UserError(f"unknown profile {name!r}. Known profiles: {known}. See `img profile list`.")
    return _apply_overrides(PROFILES[key])
