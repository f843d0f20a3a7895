"""Find and load a profile's models: one ``from_pretrained`` path for tiny and real weights.

Nothing is downloaded: a hub id resolves only from the local HF cache
(``local_files_only``), a path must exist, and a ``tiny:`` model is built in
code on first use (``img.models.tiny``). A missing model raises
``ModelNotFound`` (a ``UserError``) that names the setting to fix::

    from img.models.profiles import get_profile
    from img.models.loading import locate, load_ip_image_encoder, load_mllm, load_sdxl_pipeline

    p = get_profile("tiny")
    locate(p, "mllm")                          # Located(path=.../llava, source='tiny build')
    encoder, processor = load_ip_image_encoder(p)
    pipe = load_sdxl_pipeline(p)               # StableDiffusionXLPipeline + pipe.load_ip_adapter(...)
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from img.errors import UserError
from img.finetune.adapter import merge_adapter
from img.logs import quiet_loading, quiet_logger
from img.models.processors import clip_image_processor
from img.models.profiles import Profile
from img.models.tiny import tiny_root

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFound(UserError):
    """A profile's model is not on this machine; the message names the env var / TOML key to set."""


@dataclass(frozen=True)
class Located:
    """Where a component was found. ``path`` is the component's own folder (or file)."""

    component: str
    path: Path
    source: str  # "tiny build" | "local path" | "HF cache"


def _marker(component: str) -> str:
    return "model_index.json" if component == "base" else "config.json"


def _repo_root(repo: str) -> tuple[Path | None, str, str]:
    """(root, source, why-missing) for a hub id, a local path or a ``tiny:`` id."""
    if repo.startswith("tiny:"):
        flavour, _, part = repo[len("tiny:") :].partition("/")
        return tiny_root(flavour) / part, "tiny build", ""
    local = Path(os.path.expanduser(repo))
    # Only an absolute path is a local folder: overrides are made absolute by img.models.profiles, and a hub id
    # must never pick up a same-named folder of the working directory.
    if local.is_absolute():
        if local.exists():
            return local, "local path", ""
        return None, "", f"path {str(local)!r} does not exist"
    if not _HUB_ID.match(repo):
        return None, "", f"path {str(local)!r} does not exist (relative paths are taken from the profile TOML's folder)"
    from huggingface_hub import snapshot_download

    try:
        snap = snapshot_download(repo, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, broken cache...
        log.debug("snapshot_download(%s, local_files_only=True) failed: %r", repo, e)
        return None, "", "not in the local Hugging Face cache (offline: nothing is downloaded)"
    return Path(snap), "HF cache", ""


def find_local(repo: str) -> tuple[Path | None, str, str]:
    """(root, source, why-missing) of a hub id or local path, offline; the lookup ``locate`` uses, for models
    that are not profile components (e.g. the eval scorers)."""
    return _repo_root(repo)


def locate(profile: Profile, component: str) -> Located:
    """Find ``component`` (``base``, ``unet``, ``ip_encoder``, ``ip_weights``, ``mllm``) of ``profile`` offline.

    A local override may point at the repo root (``<root>/<subfolder>/<file>``) or directly at the
    component's folder or file. Raises ``ModelNotFound`` naming the setting to fix.
    """
    comps = profile.components()
    if component not in comps:
        raise UserError(f"profile {profile.name!r} has no component {component!r}; it has {', '.join(comps)}.")
    ref = comps[component]

    def missing(why: str) -> ModelNotFound:
        return ModelNotFound(
            f"{component}: {ref.id} {why}. Set {profile.setting_for(component)} (profile {profile.name!r})."
        )

    root, source, why = _repo_root(ref.repo)
    if root is None:
        raise missing(why)
    inner = Path(ref.subfolder) / ref.filename if ref.filename else Path(ref.subfolder)
    candidates = [root / inner]
    if source == "local path" and str(inner) not in ("", "."):
        # the override may name the component itself: the file, or the folder that holds it
        candidates += [root, root / ref.filename] if ref.filename else [root]
    for cand in candidates:
        if ref.filename and cand.is_file():
            return Located(component, cand, source)
        if not ref.filename and (cand / _marker(component)).is_file():
            return Located(component, cand, source)
    if ref.filename:
        what = str(inner)
    elif str(inner) not in ("", "."):
        what = f"{inner}/{_marker(component)}"
    else:
        what = _marker(component)
    raise missing(f"was found at {root} ({source}) but has no {what}")


def has_weights(folder: Path) -> bool:
    """True if ``folder`` holds model weights (safetensors/bin, possibly sharded)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.index.json"))


def compute_dtype(profile: Profile, device: Any = "cpu", dtype: Any = None):
    """``dtype`` if given; float32 on CPU (half precision is slow or missing there); else the profile's dtype."""
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float32 if torch.device(device).type == "cpu" else profile.torch_dtype


def load_ip_image_encoder(profile: Profile, device: Any = "cpu", dtype: Any = None):
    """(``CLIPVisionModelWithProjection``, CLIP image processor sized from its config), in eval mode."""
    quiet_loading()
    from transformers import CLIPVisionModelWithProjection

    loc = locate(profile, "ip_encoder")
    dt = compute_dtype(profile, device, dtype)
    model = CLIPVisionModelWithProjection.from_pretrained(loc.path, dtype=dt, local_files_only=True)
    model = model.to(device).eval()
    return model, clip_image_processor(model.config.image_size)


def read_ip_adapter_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """An IP-Adapter weights file as ``{"image_proj": {...}, "ip_adapter": {...}}`` (prefixes stripped).

    Reads h94's format (``image_proj.*`` / ``ip_adapter.*``) and XLabs' FLUX format
    (``ip_adapter_proj_model.*`` / ``double_blocks.*``), as diffusers' ``load_ip_adapter`` does.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                head, _, rest = key.partition(".")
                if head in ("image_proj", "ip_adapter_proj_model"):
                    out["image_proj"][rest] = f.get_tensor(key)
                elif head in ("ip_adapter", "double_blocks"):
                    out["ip_adapter"][rest] = f.get_tensor(key)
        return out
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


class _NoModel:
    """Stand-in ``self`` for diffusers' converters, which only read it when low_cpu_mem_usage=True."""

    device = "cpu"
    dtype = None


def ip_projection_from_state(state: dict[str, Any], ip_kind: str = "plus"):
    """An IP-Adapter image projection module from its original keys, through diffusers' own conversion.

    ``ip_kind`` "plus" (h94 IP-Adapter Plus ``Resampler`` keys -> ``IPAdapterPlusImageProjection``) or "xlabs"
    (XLabs FLUX linear projection -> ``ImageProjection``); the code ``load_ip_adapter`` runs, without a UNet.
    """
    if ip_kind == "xlabs":
        from diffusers.loaders.transformer_flux import FluxTransformer2DLoadersMixin as Mixin
    else:
        from diffusers.loaders.unet import UNet2DConditionLoadersMixin as Mixin
    return Mixin._convert_ip_adapter_image_proj_to_diffusers(_NoModel(), state, low_cpu_mem_usage=False)


def load_ip_projection(profile: Profile, device: Any = "cpu", dtype: Any = None):
    """The IP-Adapter image projection (Plus resampler, or XLabs linear) from the profile's weights file.

    It equals ``pipe.unet.encoder_hid_proj.image_projection_layers[0]`` after ``load_ip_adapter``.
    """
    state = read_ip_adapter_file(locate(profile, "ip_weights").path)["image_proj"]
    proj = ip_projection_from_state(state, profile.ip_kind)
    return proj.to(device=device, dtype=compute_dtype(profile, device, dtype)).eval()


def load_ip_adapter_weights(pipe: Any, profile: Profile) -> None:
    """The profile's IP-Adapter file into ``pipe`` through diffusers' ``load_ip_adapter`` (no image encoder:
    ours is loaded separately), offline; SDXL (h94 layout) or FLUX (XLabs)."""
    w = locate(profile, "ip_weights").path
    with quiet_logger("diffusers"):  # e.g. a spurious "kept in float32: []" warning
        if profile.family == "flux":
            pipe.load_ip_adapter(str(w.parent), weight_name=w.name, image_encoder_pretrained_model_name_or_path=None,
                                 local_files_only=True)
        else:
            pipe.load_ip_adapter(str(w.parent), subfolder="", weight_name=w.name, image_encoder_folder=None,
                                 local_files_only=True)


# ---------------------------------------------------------------- MLLM
QWEN_MAX_PIXELS = 768 * 28 * 28  # at most 768 image tokens per image for Qwen2.5-VL (LLaVA-1.5 uses 576)


def load_mllm(profile: Profile, device: Any = "cpu", dtype: Any = None):
    """(MLLM, processor): ``LlavaForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.

    The profile's ``mllm_adapter`` (if any) is merged into the weights.
    """
    quiet_loading()
    from transformers import AutoProcessor

    loc = locate(profile, "mllm")
    dt = compute_dtype(profile, device, dtype)
    if profile.mllm_kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        processor = AutoProcessor.from_pretrained(loc.path, local_files_only=True, max_pixels=QWEN_MAX_PIXELS)
    else:
        from transformers import LlavaForConditionalGeneration as Model

        processor = AutoProcessor.from_pretrained(loc.path, local_files_only=True)
    processor.tokenizer.padding_side = "right"  # real tokens keep positions 0..L-1, so batching changes nothing
    import torch

    # On an accelerator, load straight onto it (a 13B model would otherwise pass through host memory).
    placement = {} if torch.device(device).type == "cpu" else {"device_map": {"": str(torch.device(device))}}
    model = Model.from_pretrained(loc.path, dtype=dt, local_files_only=True, **placement).to(device).eval()
    if profile.mllm_adapter:  # a fine-tuned adapter (img jobs finetune-mllm), merged into the weights
        model = merge_adapter(model, profile.mllm_adapter, profile.mllm_adapter_id).eval()
    return model, processor


# ---------------------------------------------------------------- diffusion
def load_text_encoders(profile: Profile, device: Any = "cpu", dtype: Any = None) -> list[tuple[Any, Any]]:
    """[(tokenizer, text encoder), ...] of the SDXL base (CLIP ViT-L then OpenCLIP bigG); no UNet/VAE."""
    quiet_loading()
    if profile.family != "sdxl":
        raise UserError(
            f"text guidance is implemented for SDXL-family profiles; {profile.name!r} is {profile.family}. "
            "Use an sdxl* profile or drop text guidance."
        )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = locate(profile, "base").path
    dt = compute_dtype(profile, device, dtype)
    out = []
    for tok_dir, enc_dir, cls in (
        ("tokenizer", "text_encoder", CLIPTextModel),
        ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
    ):
        tok = CLIPTokenizer.from_pretrained(base, subfolder=tok_dir, local_files_only=True)
        enc = cls.from_pretrained(base, subfolder=enc_dir, dtype=dt, local_files_only=True).to(device).eval()
        out.append((tok, enc))
    return out


def load_sdxl_pipeline(profile: Profile, device: Any = "cpu", dtype: Any = None, ip_adapter: bool = True):
    """``StableDiffusionXLPipeline`` for an SDXL-family profile (DPO UNet swapped in when the profile has one).

    With ``ip_adapter`` the image encoder is loaded from the profile and the IP-Adapter weights go through
    diffusers' real ``pipe.load_ip_adapter`` (scale left at 1.0; set it with ``pipe.set_ip_adapter_scale``).
    """
    quiet_loading()
    if profile.family != "sdxl":
        raise UserError(f"profile {profile.name!r} is {profile.family}, not SDXL. Use load_flux_pipeline.")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    dt = compute_dtype(profile, device, dtype)
    kwargs: dict[str, Any] = {}
    if profile.unet is not None:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(locate(profile, "unet").path, dtype=dt,
                                                              local_files_only=True)
    if ip_adapter:
        encoder, processor = load_ip_image_encoder(profile, device, dt)
        kwargs.update(image_encoder=encoder, feature_extractor=processor)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        locate(profile, "base").path, dtype=dt, local_files_only=True, **kwargs
    )
    if ip_adapter:
        load_ip_adapter_weights(pipe, profile)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_flux_pipeline(profile: Profile, device: Any = "cpu", dtype: Any = None, ip_adapter: bool = True):
    """``FluxPipeline`` with the XLabs IP-Adapter loaded through ``pipe.load_ip_adapter``."""
    quiet_loading()
    if profile.family != "flux":
        raise UserError(f"profile {profile.name!r} is {profile.family}, not FLUX. Use load_sdxl_pipeline.")
    from diffusers import FluxPipeline

    dt = compute_dtype(profile, device, dtype)
    kwargs: dict[str, Any] = {}
    if ip_adapter:
        encoder, processor = load_ip_image_encoder(profile, device, dt)
        kwargs.update(image_encoder=encoder, feature_extractor=processor)
    pipe = FluxPipeline.from_pretrained(locate(profile, "base").path, dtype=dt, local_files_only=True, **kwargs)
    if ip_adapter:
        load_ip_adapter_weights(pipe, profile)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
