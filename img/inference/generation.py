"""IMG regeneration as a plug-in around a diffusers pipeline (SDXL, SDXL-DPO, FLUX).

One call runs the paper's loop: the base model makes an image from the prompt;
the IP-Adapter encoder turns it into image-prompt tokens ``c_I`` and the MLLM
reads it with a question built from the prompt (guidance ``h``); the Implicit
Aligner refines the tokens (3 passes, fp32); the same pipeline regenerates with
the same prompt, seed, steps and guidance, conditioned on the refined tokens
through the IP-Adapter at scale 0.2::

    from img.inference.generation import IMGPipeline
    pipe = IMGPipeline.from_profile("tiny")                      # fresh aligner (identity, see load_aligner)
    pipe = IMGPipeline.from_profile("sdxl", aligner="ckpts/")    # folder with aligner_sdxl.pth
    result = pipe("a red circle left of a blue star", seed=3, rounds=2)
    result.initial, result.images[-1], result.timings()          # PIL images; seconds per stage
    pipe("a red circle", seed=3, steps=20, ip_scale=0.3)         # any GenerationSettings field overrides
    pipe("a red circle", seed=3, settings=GenerationSettings(steps=20))   # the same, as one object

Plug-in: wrap a pipeline you already built (e.g. the SDXL-DPO UNet swapped in,
offloading enabled). The IP-Adapter of the profile is loaded into it when it
has none::

    base = StableDiffusionXLPipeline.from_pretrained(...)
    pipe = IMGPipeline(base, IPTokenEncoder(p), GuidanceEncoder(p), aligner, p)
    pipe.unwrap()                                               # the original projection layer back

How the aligned tokens reach the denoiser: the aligner works on the IP-Adapter's
*post*-projection tokens (SDXL Plus: the resampler's 16 x 2048; FLUX XLabs: the
linear projection's 4 x 4096), but diffusers' ``ip_adapter_image_embeds`` are
*pre*-projection features. So ``unet.encoder_hid_proj.image_projection_layers[0]``
(FLUX: ``transformer.encoder_hid_proj...``) is swapped for ``torch.nn.Identity``
and the tokens are passed as ``[negative ; positive]`` of shape (2B, 1, N, D)
with classifier-free guidance. The negative tokens are
``IPTokenEncoder.unconditional()`` (SDXL: an all-zeros preprocessed image; FLUX:
a black image). The initial image is made with the IP-Adapter switched *off*
(its attention processors and projection are taken out for that call), so it is
exactly the image the base pipeline makes without an IP-Adapter.

Released checkpoints (SHI-Labs/IMG-Multimodal-Diffusion-Alignment, ``ckpts/``):

==============================  ===============================================================
file                            where it goes
==============================  ===============================================================
``aligner_sdxl.pth``            ``--aligner <folder or file>`` with ``--profile sdxl`` or
                                ``sdxl-dpo`` (the SDXL aligner is reused for DPO);
                                loaded by ``img.aligner.load_official_checkpoint``
``aligner_flux.pth``            ``--aligner <folder or file>`` with ``--profile flux``
``resampler.pth``               the IP-Adapter Plus resampler alone, original ``Resampler`` keys. The
                                demo makes ``c_I`` with it (negative tokens with the IP-Adapter file's
                                own resampler). Put it next to ``aligner_sdxl.pth`` and pass that
                                folder as ``--aligner``: it is compared with the profile's resampler
                                and used for ``c_I`` only if it differs (``use_released_resampler``)
``ip-adapter-plus_sdxl_vit-h``  h94/IP-Adapter ``sdxl_models/`` (.safetensors or the demo's .bin):
                                resampler + attention layers. ``IMG_IP_ADAPTER=<h94/IP-Adapter folder>``
                                or ``ip_weights = "ckpts/ip-adapter-plus_sdxl_vit-h.bin"`` in
                                ``jobs/profiles/sdxl.toml`` (the env var sets ip_encoder too, so a
                                bare ``ckpts/`` needs the two TOML keys)
``image_encoder/``              h94/IP-Adapter ``models/image_encoder`` (OpenCLIP ViT-H/14);
                                ``IMG_IP_ADAPTER`` folder, or ``ip_encoder = "ckpts/image_encoder"``
``llava/``                      the authors' fine-tuned LLaVA-1.5-13B in the original LLaVA repo
                                format; convert to ``llava-hf`` format, then ``IMG_LLAVA_13B=<dir>``
XLabs FLUX IP-Adapter           ``ip_adapter.safetensors``: ``IMG_FLUX_IP_ADAPTER=<folder or file>``;
                                its CLIP ViT-L/14 via ``IMG_CLIP_VIT_L``
==============================  ===============================================================

``--aligner`` accepts a file (``.pth``/``.pt``/``.safetensors``), a folder
holding ``aligner_<family>.pth`` (the released ``ckpts/`` folder), or a folder
written by ``ImplicitAligner.save_pretrained`` (``img jobs train`` output).

FLUX notes: the release (XFlux) uses true classifier-free guidance (``true_gs
3.5`` with an empty negative prompt and black-image negative tokens, from the
second step on) on top of the distilled guidance 3.5. ``FluxPipeline`` applies
true CFG from the first step; ``true_cfg_scale`` defaults to 3.5 for FLUX here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from img.aligner import CONFIG_NAME, ImplicitAligner, load_official_checkpoint
from img.errors import UserError
from img.features import GuidanceEncoder, IPTokenEncoder
from img.models.loading import ip_projection_from_state, load_flux_pipeline, load_ip_adapter_weights, load_sdxl_pipeline
from img.models.profiles import Profile, get_profile
from img.questions import load_questions, question_for

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int, int], None]  # (stage: "base" | "regen", step done (1-based), total steps)
AlignerSource = Union[None, str, Path, ImplicitAligner]
QuestionSource = Union[None, str, Path, Sequence[str]]  # a questions file, loaded templates, or None (our pool)

FLUX_TRUE_CFG = 3.5  # XFlux true_gs in the authors' demo_flux.py


# ----------------------------------------------------------------------------- aligner
def weights_id(aligner: ImplicitAligner) -> str:
    """``sha256:<16 hex>`` of the aligner's weights (key names, dtypes, shapes and bytes, sorted by key)."""
    h = hashlib.sha256()
    for key, value in sorted(aligner.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()[:16]


def _check_aligner_dims(aligner: ImplicitAligner, profile: Profile, source: str) -> None:
    cfg, d = aligner.config, profile.dims
    if cfg.dim != d.ip_dim or cfg.guidance_dim != d.mllm_hidden:
        raise UserError(
            f"aligner {source} has token width {cfg.dim} and guidance width {cfg.guidance_dim}, but profile "
            f"{profile.name!r} needs {d.ip_dim} and {d.mllm_hidden}. Use the aligner trained for this profile "
            f"(or the profile the aligner was trained with)."
        )


def load_aligner(profile: Profile, source: AlignerSource = None, seed: int = 0) -> tuple[ImplicitAligner, str]:
    """(aligner in fp32 eval mode, aligner id) for ``profile``.

    ``source`` is an ``ImplicitAligner``, a checkpoint file, a folder with ``aligner_<family>.pth``
    (the authors' ``ckpts/``), or a ``save_pretrained`` folder. ``None`` is allowed only for tiny profiles:
    a fresh aligner initialised with ``seed``. A fresh aligner is exactly the identity (its ``zero_linear``
    head is zero-initialised), so its "regeneration" only shows what the IP-Adapter does with the
    unrefined tokens of the initial image; its id is ``"fresh"``. Wrong dims raise ``UserError``.
    """
    if isinstance(source, ImplicitAligner):
        _check_aligner_dims(source, profile, "passed in")
        return source.float().eval(), weights_id(source)
    if source is None:
        if not profile.tiny:
            raise UserError(
                f"profile {profile.name!r} needs a trained aligner: pass `aligner`, a folder from "
                f"`img jobs train` (<run-dir>/aligner), or the released aligner_{profile.family}.pth or its folder."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ImplicitAligner(profile.aligner_config())
        return model.float().eval(), "fresh"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"`aligner` {str(path)!r} does not exist. Pass an aligner checkpoint file or folder.")
    if path.is_dir():

        if (path / CONFIG_NAME).is_file():
            model = ImplicitAligner.from_pretrained(path)
            _check_aligner_dims(model, profile, repr(str(path)))
        else:
            released = path / f"aligner_{profile.family}.pth"
            if not released.is_file():
                raise UserError(
                    f"`aligner` folder {str(path)!r} has neither {CONFIG_NAME} (a save_pretrained folder) nor "
                    f"{released.name} (the released checkpoint for {profile.family}). Point at one of those."
                )
            model = load_official_checkpoint(released, profile.aligner_config())
    else:
        model = load_official_checkpoint(path, profile.aligner_config())
    return model.float().eval(), weights_id(model)


RELEASED_RESAMPLER = "resampler.pth"  # the authors' standalone IP-Adapter Plus resampler (SDXL)


def released_resampler(aligner: AlignerSource, profile: Profile) -> Optional[Path]:
    """The released ``resampler.pth`` next to ``aligner_sdxl.pth``, when ``aligner`` is such a folder (SDXL)."""
    if not isinstance(aligner, (str, Path)) or profile.family != "sdxl":
        return None
    found = Path(aligner).expanduser() / RELEASED_RESAMPLER
    return found if found.is_file() else None


def load_resampler(path: str | Path, device: Any = "cpu", dtype: Any = torch.float32) -> torch.nn.Module:
    """The released ``resampler.pth`` (original IP-Adapter ``Resampler`` keys, optional ``module.`` prefix) as the
    diffusers ``IPAdapterPlusImageProjection`` that ``IPTokenEncoder.projection`` is, via diffusers' converter."""
    p = Path(path)
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{str(p)!r} is not a readable PyTorch state dict ({e}). Use the released resampler.pth."
        ) from None
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    try:
        proj = ip_projection_from_state(sd, "plus")
    except Exception as e:
        raise UserError(f"{str(p)!r} is not an IP-Adapter Plus resampler ({type(e).__name__}: {e}).") from None
    return proj.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class GenerationSettings:
    """Everything that must match between the initial image and its regenerations: the one carrier of
    generation settings (``img infer``, ``img serve`` and ``IMGPipeline`` all pass one of these).

    A field left ``None`` takes the profile's value (SDXL 50 steps, CFG 7.5; FLUX 30 steps, guidance 3.5 and
    true CFG 3.5; IP scale 0.2; 3 aligner passes; the profile's image size)::

        s = GenerationSettings(steps=20)                   # partial: the rest from the profile
        s.resolve(get_profile("tiny"))                     # every field filled in, validated
        s.override(ip_scale=0.3, passes=None)              # None leaves a field as it is
    """

    steps: Optional[int] = None
    guidance_scale: Optional[float] = None  # SDXL: CFG; FLUX: distilled guidance
    ip_scale: Optional[float] = None  # IP-Adapter scale at regeneration
    passes: Optional[int] = None  # aligner passes
    negative_prompt: str = ""  # "" = none (SDXL then zeroes the negative text embeddings, as the release does)
    true_cfg_scale: Optional[float] = None  # FLUX only: true CFG with the negative prompt and black-image tokens
    height: Optional[int] = None
    width: Optional[int] = None

    def override(self, **changes: Any) -> "GenerationSettings":
        """A copy with every non-None value of ``changes`` set (an unknown name is a ``TypeError``)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def resolve(self, profile: Profile) -> "GenerationSettings":
        """Every ``None`` field from ``profile``, then validated: the settings a generation runs with."""
        defaults = dict(steps=profile.steps, guidance_scale=profile.guidance_scale, ip_scale=profile.ip_scale,
                        passes=profile.aligner_passes,
                        true_cfg_scale=FLUX_TRUE_CFG if profile.family == "flux" else 1.0,
                        height=profile.dims.image_size, width=profile.dims.image_size)
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None}).validate()

    def validate(self) -> "GenerationSettings":
        """``self``, or ``UserError`` naming the first value out of range."""
        if self.steps < 1:
            raise UserError(f"`steps` must be >= 1, got {self.steps}. The paper uses 50 (SDXL) / 30 (FLUX).")
        if self.guidance_scale < 0:
            raise UserError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        if self.ip_scale < 0:
            raise UserError(f"`ip_scale` must be >= 0, got {self.ip_scale}. The paper uses 0.2.")
        if self.passes < 0:
            raise UserError(f"`passes` must be >= 0, got {self.passes}. The paper uses 3.")
        if self.true_cfg_scale < 0:
            raise UserError(f"true_cfg_scale must be >= 0, got {self.true_cfg_scale}.")
        if self.height < 8 or self.width < 8:
            raise UserError(f"image size must be at least 8 px, got {self.width}x{self.height}.")
        return self


@dataclass
class IMGRound:
    """One analysis -> alignment -> regeneration round."""

    round: int  # 1-based
    image: Any  # PIL.Image: the regenerated image
    question: str
    tokens: torch.Tensor  # (1, N, D) IP tokens of the image this round analysed
    aligned: torch.Tensor  # (1, N, D) fp32 aligner output fed to the regeneration
    guidance_length: int  # L: MLLM sequence length
    t_ip_s: float
    t_mllm_s: float
    t_aligner_s: float
    t_regen_s: float


@dataclass
class IMGResult:
    """The initial image, every round's image, and where the time went."""

    prompt: str
    seed: int
    settings: GenerationSettings
    initial: Any  # PIL.Image made by the base model
    t_base_s: float
    rounds: list[IMGRound] = field(default_factory=list)

    @property
    def images(self) -> list[Any]:
        """[initial, round 1, ..., round R]."""
        return [self.initial, *(r.image for r in self.rounds)]

    def timings(self) -> dict[str, float]:
        """Seconds per stage, summed over rounds: base, ip, mllm, aligner, regen, total."""
        t = {
            "base": self.t_base_s,
            "ip": sum(r.t_ip_s for r in self.rounds),
            "mllm": sum(r.t_mllm_s for r in self.rounds),
            "aligner": sum(r.t_aligner_s for r in self.rounds),
            "regen": sum(r.t_regen_s for r in self.rounds),
        }
        t["total"] = sum(t.values())
        return t


# ----------------------------------------------------------------------------- the pipeline
def _has_ip(proc: Any) -> bool:
    """IP-Adapter attention processors (SDXL and FLUX, all backends) carry ``to_k_ip``."""
    return hasattr(proc, "to_k_ip")


class IMGPipeline:
    """A diffusers text-to-image pipeline plus IMG's analysis, alignment and regeneration.

    ``base_pipe``: ``StableDiffusionXLPipeline`` (SDXL, SDXL-DPO) or ``FluxPipeline``, with or without an
    IP-Adapter (the profile's is loaded when missing). ``ip_encoder``/``guidance_encoder``: the
    ``img.features`` classes the embed job uses. ``aligner``: an ``ImplicitAligner`` for the profile's dims.
    ``questions``: the question templates (a JSON file as ``img.questions.load_questions`` reads, or the
    templates; None = our pool). The pipeline is modified in place (identity projection); ``unwrap()`` undoes
    that.
    """

    def __init__(
        self,
        base_pipe: Any,
        ip_encoder: Any,
        guidance_encoder: Any,
        aligner: ImplicitAligner,
        profile: Profile | str,
        *,
        aligner_id: Optional[str] = None,
        device: Any = None,
        questions: QuestionSource = None,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.questions = load_questions(questions) if isinstance(questions, (str, Path)) else (
            tuple(questions) if questions is not None else None)
        self.pipe = base_pipe
        self.ip_encoder = ip_encoder
        self.guidance_encoder = guidance_encoder
        self.device = torch.device(device) if device is not None else torch.device(getattr(ip_encoder, "device", "cpu"))
        self.set_aligner(aligner, aligner_id)
        self._uncond: Optional[torch.Tensor] = None
        self._denoiser = self._check_pipe()
        self._base_procs: Optional[dict[str, Any]] = None
        self._projection: Optional[torch.nn.Module] = None
        self._install_ip_adapter()

    def set_aligner(self, aligner: ImplicitAligner, aligner_id: Optional[str] = None) -> None:
        """Use ``aligner`` (fp32, on the pipeline's device) from now on; the eval job swaps systems this way."""
        _check_aligner_dims(aligner, self.profile, "passed in")
        self.aligner = aligner.to(self.device, torch.float32).eval()
        self.aligner_id = aligner_id or weights_id(aligner)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_profile(
        cls,
        profile: Profile | str,
        aligner: AlignerSource = None,
        device: Any = "cpu",
        *,
        dtype: Any = None,
        mllm_device: Any = None,
        base_pipe: Any = None,
        aligner_seed: int = 0,
        aligner_id: Optional[str] = None,
        resampler: Optional[str | Path] = None,
        questions: QuestionSource = None,
    ) -> "IMGPipeline":
        """Load every model of ``profile`` (offline); ``aligner`` as in ``load_aligner``.

        ``base_pipe`` replaces the profile's base pipeline (it gets the profile's IP-Adapter if it has none);
        ``mllm_device`` puts the MLLM on another device (e.g. a second GPU); ``aligner_id`` labels an
        ``ImplicitAligner`` passed in (default: the hash of its weights). ``resampler``: the released
        ``resampler.pth`` (default: the one next to ``aligner_sdxl.pth`` when ``aligner`` is that folder);
        see ``use_released_resampler``. ``questions``: as in ``IMGPipeline``.
        """

        prof = get_profile(profile) if isinstance(profile, str) else profile
        if isinstance(aligner, ImplicitAligner) and aligner_id:  # already loaded and hashed (img infer)
            model, aid = aligner, aligner_id
        else:
            model, aid = load_aligner(prof, aligner, seed=aligner_seed)
        if base_pipe is None:
            loader = load_flux_pipeline if prof.family == "flux" else load_sdxl_pipeline
            base_pipe = loader(prof, device, dtype, ip_adapter=False)
        ip = IPTokenEncoder(prof, device, dtype)
        guidance = GuidanceEncoder(prof, mllm_device if mllm_device is not None else device, dtype)
        pipe = cls(base_pipe, ip, guidance, model, prof, aligner_id=aid, device=device, questions=questions)
        resampler = resampler if resampler is not None else released_resampler(aligner, prof)
        if resampler is not None:
            pipe.use_released_resampler(resampler)
        return pipe

    def _check_pipe(self) -> torch.nn.Module:
        fam = self.profile.family
        den = getattr(self.pipe, "unet" if fam == "sdxl" else "transformer", None)
        if den is None:
            want = "StableDiffusionXLPipeline (has .unet)" if fam == "sdxl" else "FluxPipeline (has .transformer)"
            raise UserError(
                f"profile {self.profile.name!r} is {fam} but the pipeline is a {type(self.pipe).__name__}; "
                f"pass a {want}, or a profile of the pipeline's family."
            )
        return den

    def _install_ip_adapter(self) -> None:
        """Load the profile's IP-Adapter if the pipe has none; swap its projection for an identity."""
        from diffusers.models.embeddings import MultiIPAdapterImageProjection


        den = self._denoiser
        hid = getattr(den, "encoder_hid_proj", None)
        if not isinstance(hid, MultiIPAdapterImageProjection):
            self._base_procs = dict(den.attn_processors)  # the exact processors of the base model
            log.info("loading the IP-Adapter of profile %s into the %s", self.profile.name, type(den).__name__)
            load_ip_adapter_weights(self.pipe, self.profile)
            hid = den.encoder_hid_proj
        layers = hid.image_projection_layers
        if len(layers) != 1:
            raise UserError(
                f"the pipeline has {len(layers)} IP-Adapters loaded; IMG conditions on exactly one. "
                "Unload the others (pipe.unload_ip_adapter()) and pass the pipeline again."
            )
        if isinstance(layers[0], torch.nn.Identity):
            raise UserError("the pipeline is already wrapped by an IMGPipeline; call .unwrap() on that one first.")
        self._check_projection(layers[0])
        self._projection = layers[0]
        layers[0] = torch.nn.Identity()

    def _check_projection(self, layer: torch.nn.Module) -> None:
        """The pipe's projection must be the one the IP encoder uses, or the tokens live in another space."""
        mine = getattr(self.ip_encoder, "projection", None)
        if mine is None:
            return
        a, b = layer.state_dict(), mine.state_dict()
        same = a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and torch.allclose(a[k].float().cpu(), b[k].float().cpu(), rtol=1e-2, atol=1e-3)
            for k in a
        )
        if not same:
            raise UserError(
                f"the pipeline's IP-Adapter projection differs from the one in {self.profile.ip_weights.id} that "
                f"the IP encoder uses. Load the profile's IP-Adapter into the pipeline, or none (it is loaded then)."
            )

    def use_released_resampler(self, path: str | Path) -> bool:
        """Compute ``c_I`` with the authors' ``resampler.pth``, as their demo does (SDXL).

        The release extracts ``c_I`` with ``resampler.pth`` but takes the negative tokens from the IP-Adapter
        Plus file's own resampler. If the two are equal (expected) nothing changes and this returns False.
        Otherwise the negative tokens are fixed from the IP-Adapter's resampler first, the IP encoder's
        projection becomes ``resampler.pth``, ``aligner_id`` gets ``+resampler-<hash>``, and this returns True.
        """
        if self.profile.family != "sdxl":
            raise UserError(f"resampler.pth is the SDXL IP-Adapter Plus resampler; profile {self.profile.name!r} "
                            f"is {self.profile.family}. Leave it out.")
        mine = self.ip_encoder.projection
        released = load_resampler(path, self.ip_encoder.device, self.ip_encoder.dtype)
        a, b = released.state_dict(), mine.state_dict()
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise UserError(f"{str(path)!r} does not fit profile {self.profile.name!r}'s IP-Adapter resampler "
                            "(different keys or shapes). Use the resampler.pth released with aligner_sdxl.pth.")
        if all(torch.equal(a[k], b[k]) for k in a):
            log.info("%s equals the IP-Adapter's resampler; nothing to change", path)
            return False
        self.unconditional_tokens()  # negative tokens from the IP-Adapter's resampler, as the release does
        self.ip_encoder.projection = released
        h = hashlib.sha256(b"".join(v.detach().cpu().float().numpy().tobytes() for _, v in sorted(a.items())))
        self.aligner_id = f"{self.aligner_id}+resampler-{h.hexdigest()[:8]}"
        log.info("c_I now comes from %s (differs from the IP-Adapter's resampler)", path)
        return True

    def unwrap(self) -> Any:
        """Put the original IP-Adapter projection back; returns the base pipeline."""
        if self._projection is not None:
            self._denoiser.encoder_hid_proj.image_projection_layers[0] = self._projection
            self._projection = None
        return self.pipe

    @contextmanager
    def _ip_adapter_off(self) -> Iterator[None]:
        """The base model as it is without an IP-Adapter: IP processors and projection taken out."""
        den = self._denoiser
        procs = dict(den.attn_processors)
        if self._base_procs is not None:
            base = {n: (self._base_procs.get(n, p) if _has_ip(p) else p) for n, p in procs.items()}
        else:  # the user loaded the IP-Adapter: use diffusers' own defaults, as unload_ip_adapter does
            if self.profile.family == "flux":
                from diffusers.models.transformers.transformer_flux import FluxAttnProcessor as Default
            else:
                from diffusers.models.attention_processor import AttnProcessor2_0 as Default
            base = {n: (Default() if _has_ip(p) else p) for n, p in procs.items()}
        hid = den.encoder_hid_proj
        den.set_attn_processor(base)
        den.encoder_hid_proj = None
        try:
            yield
        finally:
            den.encoder_hid_proj = hid
            den.set_attn_processor(procs)

    # ------------------------------------------------------------------ stages
    def settings(self, settings: Optional[GenerationSettings] = None, **overrides: Any) -> GenerationSettings:
        """``settings`` (default: all the profile's) with any non-None ``GenerationSettings`` field of
        ``overrides`` applied, resolved against the profile and validated. ``passes`` left unset is the
        aligner's own ``config.passes`` (recorded in its config.json by training; 3 for released checkpoints)."""
        s = (settings or GenerationSettings()).override(**overrides)
        if s.passes is None:
            s = s.override(passes=self.aligner.config.passes)
        return s.resolve(self.profile)

    def unconditional_tokens(self) -> torch.Tensor:
        """(1, N, D) negative image tokens (cached)."""
        if self._uncond is None:
            self._uncond = self.ip_encoder.unconditional()
        return self._uncond

    def _call_pipe(self, prompt: str, seed: int, s: GenerationSettings, stage: str,
                   on_step: Optional[StepCallback], **extra: Any) -> Any:
        def step_end(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if on_step is not None:
                on_step(stage, i + 1, s.steps)
            return {}

        kwargs: dict[str, Any] = dict(
            prompt=prompt,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            generator=torch.Generator("cpu").manual_seed(int(seed)),  # CPU noise: same image on any device
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if self.profile.family == "flux":
            kwargs.update(negative_prompt=s.negative_prompt, true_cfg_scale=s.true_cfg_scale)
        else:
            kwargs.update(negative_prompt=s.negative_prompt or None)
        kwargs.update(extra)
        return self.pipe(**kwargs).images[0]

    def generate_base(self, prompt: str, seed: int, settings: Optional[GenerationSettings] = None,
                      on_step: Optional[StepCallback] = None) -> Any:
        """The base model's image for ``prompt`` and ``seed`` (IP-Adapter off)."""
        s = self.settings(settings)
        with self._ip_adapter_off():
            return self._call_pipe(prompt, seed, s, "base", on_step)

    def question(self, prompt: str, seed: int) -> str:
        """The MLLM question: ``question_for(prompt, key=prompt, seed=seed)`` from the pipeline's question pool,
        the same in every round."""
        return question_for(prompt, key=prompt, seed=seed, questions=self.questions)

    def image_tokens(self, image: Any) -> torch.Tensor:
        """(1, N, D) IP tokens of ``image`` (the embed job's ``IPTokenEncoder``)."""
        return self.ip_encoder([image])

    def guidance(self, image: Any, question: str) -> torch.Tensor:
        """(1, L, E) MLLM guidance for ``image`` and ``question`` (the embed job's ``GuidanceEncoder``)."""
        return self.guidance_encoder([image], [question])[0][None]

    @torch.inference_mode()
    def align(self, guidance: torch.Tensor, tokens: torch.Tensor, passes: int = 3) -> torch.Tensor:
        """Aligner ``passes`` times in fp32 on the pipeline's device; returns (B, N, D) fp32 on the CPU."""
        out = self.aligner.align(guidance.to(self.device, torch.float32), tokens.to(self.device, torch.float32),
                                 passes=passes)
        return out.cpu()

    def regenerate(self, prompt: str, tokens: torch.Tensor, seed: int, settings: Optional[GenerationSettings] = None,
                   on_step: Optional[StepCallback] = None) -> Any:
        """The image for ``prompt`` and ``seed`` conditioned on post-projection ``tokens`` (1, N, D)."""
        s = self.settings(settings)
        d = self.profile.dims
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (d.ip_tokens, d.ip_dim):
            raise ValueError(f"tokens must be (B, {d.ip_tokens}, {d.ip_dim}), got {tuple(tokens.shape)}")
        dtype = self._denoiser.dtype  # the pipeline moves the embeds to its execution device (offload-safe)
        pos = tokens[:, None].to(dtype=dtype)
        neg = self.unconditional_tokens().expand_as(tokens)[:, None].to(dtype=dtype)
        self.pipe.set_ip_adapter_scale(s.ip_scale)
        if self.profile.family == "flux":
            extra = dict(ip_adapter_image_embeds=[pos], negative_ip_adapter_image_embeds=[neg])
        else:
            cfg = s.guidance_scale > 1 and self._denoiser.config.time_cond_proj_dim is None
            extra = dict(ip_adapter_image_embeds=[torch.cat([neg, pos]) if cfg else pos])  # (2B, 1, N, D)
        return self._call_pipe(prompt, seed, s, "regen", on_step, **extra)

    # ------------------------------------------------------------------ the loop
    def __call__(
        self,
        prompt: str,
        seed: int = 0,
        rounds: int = 1,
        *,
        settings: Optional[GenerationSettings] = None,
        on_step: Optional[StepCallback] = None,
        **overrides: Any,
    ) -> IMGResult:
        """Initial image, then ``rounds`` x (analysis of the latest image -> alignment -> regeneration).

        ``settings`` and ``overrides`` (``GenerationSettings`` fields: ``steps``, ``ip_scale``, ...) as in
        ``IMGPipeline.settings``; the profile fills in the rest.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"prompt {prompt!r} is empty. Pass a non-empty text prompt.")
        if rounds < 0:
            raise UserError(f"`rounds` must be >= 0, got {rounds}. 1 is the paper's setting.")
        s = self.settings(settings, **overrides)
        t0 = time.perf_counter()
        image = self.generate_base(prompt, seed, s, on_step)
        result = IMGResult(prompt, seed, s, image, time.perf_counter() - t0)
        result.rounds = self.refine(prompt, image, seed, rounds, s, on_step)
        return result

    def refine(self, prompt: str, image: Any, seed: int, rounds: int, settings: GenerationSettings,
               on_step: Optional[StepCallback] = None) -> list[IMGRound]:
        """``rounds`` x (analysis of the latest image -> alignment -> regeneration), starting from ``image``."""
        s = settings
        question = self.question(prompt, seed)
        out: list[IMGRound] = []
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            tokens = self.image_tokens(image)
            t1 = time.perf_counter()
            h = self.guidance(image, question)
            t2 = time.perf_counter()
            aligned = self.align(h, tokens, s.passes)
            t3 = time.perf_counter()
            image = self.regenerate(prompt, aligned, seed, s, on_step)
            t4 = time.perf_counter()
            out.append(IMGRound(r, image, question, tokens, aligned, int(h.shape[1]),
                                t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        return out
