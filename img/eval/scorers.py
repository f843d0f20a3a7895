"""Preference scorers, loaded offline from local paths: PickScore and HPSv2 (v2.0 / v2.1), plus tiny twins.

    specs = resolve_scorers(["pickscore", "hpsv2"])     # fast: finds files, loads nothing; ScorerNotFound names
                                                        # the variable to set when a model is missing
    scorer = load_scorer(specs[0], device="cpu")
    scorer.score(["a red circle"], [[base_image, img_image]])   # [[s_base, s_img]]

* **PickScore** (``pickscore``, version ``v1``): ``transformers.CLIPModel`` with the
  PickScore_v1 weights and the CLIP ViT-H/14 processor; score = ``logit_scale.exp()``
  x cosine(text, image), as in PickScore's own example.
* **HPSv2** (``hpsv2`` = ``hpsv2.1``, and ``hpsv2.0``): the HPS checkpoint
  (``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``) is an open_clip ViT-H-14
  state dict. open_clip itself cannot be used here: it imports torchvision, and
  no PyPI torchvision imports beside the pinned CPU torch. So the checkpoint is
  converted key by key into a ``transformers.CLIPModel`` of the same architecture
  (``open_clip_to_transformers``: the conversion that made the laion ViT-H-14
  weights on the hub) and loaded strictly; score = cosine(text, image), as
  HPSv2's ``score()`` computes it. The version comes from the file name and is
  stored with every score; win rates group by it, so v2.0 and v2.1 never mix.
  Preprocessing is the ViT-H/14 processor (resize shortest side to 224 bicubic
  with PIL, centre crop, OpenAI mean/std); HPSv2's own transform resizes the
  tensor with torchvision instead, so scores can differ from the reference
  implementation in the third decimal.
* **tiny** (``--scorer tiny``): randomly initialised models of the same classes
  (a ``CLIPModel`` for PickScore, a random open_clip-layout ViT checkpoint for
  HPSv2, a CLIP tokenizer built in code) in the published folder layouts, built
  once under ``$IMG_CACHE/tiny/scorers-...`` and loaded by the same code as the
  real ones. Version ``tiny-<hash>``.

==========================  ========================================  ==================================
environment variable        default (offline from the HF cache)       holds
==========================  ========================================  ==================================
``IMG_PICKSCORE``           yuvalkirstain/PickScore_v1                 CLIPModel folder (config.json + weights)
``IMG_CLIP_VIT_H14``        laion/CLIP-ViT-H-14-laion2B-s32B-b79K      tokenizer, preprocessor_config.json,
                                                                      config.json (the HPS architecture)
``IMG_HPSV2``               xswu/HPSv2                                 HPS_v2.1_compressed.pt and/or
                                                                      HPS_v2_compressed.pt (folder or file)
==========================  ========================================  ==================================
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from img.errors import UserError
from img.logs import quiet_loading
from img.models.loading import find_local
from img.models.processors import clip_image_processor
from img.models.tiny import atomic_build, build_clip_tokenizer, cache_dir, vocabulary_words

ENV_PICKSCORE, HUB_PICKSCORE = "IMG_PICKSCORE", "yuvalkirstain/PickScore_v1"
ENV_CLIP_H14, HUB_CLIP_H14 = "IMG_CLIP_VIT_H14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
ENV_HPSV2, HUB_HPSV2 = "IMG_HPSV2", "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
NAMES = ("pickscore", "hpsv2", "hpsv2.1", "hpsv2.0", "tiny")
TINY_SCORERS_VERSION = 1


class ScorerNotFound(UserError):
    """A scorer's weights are not on this machine; the message names the variable to set."""


@dataclass(frozen=True)
class ScorerSpec:
    """One resolved scorer: what it is (``name``, ``version``) and where its files are."""

    name: str  # "pickscore" | "hpsv2"
    version: str  # "v1" | "v2.0" | "v2.1" | "tiny-<hash>"
    weights: str  # PickScore: CLIPModel folder; HPSv2: the checkpoint file
    processor: str  # CLIP ViT-H/14 folder: tokenizer + preprocessor_config.json (+ config.json for HPSv2)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ScorerSpec":
        return cls(**json.loads(text))


# ----------------------------------------------------------------------------- resolution (no heavy imports)
def _find(env: str, hub: str, marker: str, what: str) -> Path:
    value = os.environ.get(env)
    if value:
        root = Path(value).expanduser()
        if not root.exists():
            raise ScorerNotFound(f"{what}: {env}={value!r} does not exist. Set {env} to the folder of {hub}.")
    else:
        root, _, why = find_local(hub)
        if root is None:
            raise ScorerNotFound(f"{what}: {hub} {why}. Set {env}=/path/to/{hub.split('/')[-1]} (a local copy).")
    if marker and not (root / marker).is_file():
        raise ScorerNotFound(f"{what}: {root} has no {marker}. Set {env} to a folder laid out like {hub}.")
    return root


def _hps_file(version: str) -> Path:
    want = HPS_FILES[version]
    value = os.environ.get(ENV_HPSV2)
    if value and Path(value).expanduser().is_file():
        path = Path(value).expanduser()
        if path.name != want:
            raise ScorerNotFound(f"hpsv2 {version}: {ENV_HPSV2} points at {path.name}, but HPS {version} is {want}. "
                                 f"Point {ENV_HPSV2} at {want} or at the folder holding it.")
        return path
    root = _find(ENV_HPSV2, HUB_HPSV2, "", f"hpsv2 {version}")
    if not (root / want).is_file():
        raise ScorerNotFound(f"hpsv2 {version}: {root} has no {want}. Set {ENV_HPSV2} to the folder (or file) "
                             f"with {want}.")
    return root / want


def resolve_scorers(names: Sequence[str]) -> list[ScorerSpec]:
    """Specs for ``names`` (``pickscore``, ``hpsv2`` / ``hpsv2.1``, ``hpsv2.0``, ``tiny``), in order, deduplicated.

    Only looks for files (no torch import), so a missing model fails in well under a second.
    """
    if not names:
        raise UserError("no scorer given. Pass `scorer` pickscore, hpsv2, hpsv2.0 or tiny (repeatable).")
    specs: list[ScorerSpec] = []
    for name in names:
        if name not in NAMES:
            raise UserError(f"`scorer` {name!r} is not one of {', '.join(NAMES)}. Pick one of those.")
        if name == "tiny":
            root, version = tiny_scorer_dir(), f"tiny-{tiny_scorer_fingerprint()[:8]}"
            new = [ScorerSpec("pickscore", version, str(root / "pickscore"), str(root / "clip_vit_h14")),
                   ScorerSpec("hpsv2", version, str(root / "hpsv2" / HPS_FILES["v2.1"]), str(root / "clip_vit_h14"))]
        elif name == "pickscore":
            weights = _find(ENV_PICKSCORE, HUB_PICKSCORE, "config.json", "pickscore")
            processor = _find(ENV_CLIP_H14, HUB_CLIP_H14, "preprocessor_config.json", "pickscore processor")
            new = [ScorerSpec("pickscore", "v1", str(weights), str(processor))]
        else:
            version = "v2.0" if name == "hpsv2.0" else "v2.1"
            new = [ScorerSpec("hpsv2", version, str(_hps_file(version)),
                              str(_find(ENV_CLIP_H14, HUB_CLIP_H14, "config.json", f"hpsv2 {version} architecture")))]
        specs += [s for s in new if s.key not in {x.key for x in specs}]
    return specs


# ----------------------------------------------------------------------------- open_clip -> transformers
def _block_keys(src: str, dst: str, sd: dict[str, Any], out: dict[str, Any]) -> None:
    """One residual block: open_clip ``resblocks.i`` (packed in_proj) -> transformers ``layers.i`` (q/k/v)."""
    w, b = sd[f"{src}.attn.in_proj_weight"], sd[f"{src}.attn.in_proj_bias"]
    for name, wi, bi in zip(("q", "k", "v"), w.chunk(3, dim=0), b.chunk(3, dim=0)):
        out[f"{dst}.self_attn.{name}_proj.weight"] = wi
        out[f"{dst}.self_attn.{name}_proj.bias"] = bi
    for a, c in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[f"{dst}.{c}.weight"] = sd[f"{src}.{a}.weight"]
        out[f"{dst}.{c}.bias"] = sd[f"{src}.{a}.bias"]


def open_clip_to_transformers(state: dict[str, Any]) -> dict[str, Any]:
    """An open_clip CLIP state dict (ViT image tower, default text tower) as ``transformers.CLIPModel`` keys.

    ``x @ proj`` parameters become linear weights (transposed); packed attention ``in_proj`` is split into
    q / k / v. A ``module.`` prefix (DDP) is stripped. Unknown or missing keys raise ``KeyError``.
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    sd.pop("attn_mask", None)  # a non-persistent buffer in open_clip; present in some old checkpoints
    out: dict[str, Any] = {
        "logit_scale": sd["logit_scale"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    used = {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "text_projection", "visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding",
            "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
            "visual.proj"}
    for tower, src_prefix, dst_prefix in (("text", "transformer.resblocks", "text_model.encoder.layers"),
                                          ("vision", "visual.transformer.resblocks", "vision_model.encoder.layers")):
        i = 0
        while f"{src_prefix}.{i}.ln_1.weight" in sd:
            _block_keys(f"{src_prefix}.{i}", f"{dst_prefix}.{i}", sd, out)
            used |= {k for k in sd if k.startswith(f"{src_prefix}.{i}.")}
            i += 1
        if i == 0:
            raise KeyError(f"no {tower} blocks ({src_prefix}.0.*) in the checkpoint")
    extra = sorted(set(sd) - used)
    if extra:
        raise KeyError(f"unexpected keys for an open_clip ViT CLIP: {extra[:5]}")
    return out


def random_open_clip_state(config: Any, seed: int = 0) -> dict[str, Any]:
    """A random state dict in open_clip's layout for the architecture of ``config`` (a ``CLIPConfig``).

    Key names and shapes are open_clip's (``token_embedding.weight``, ``transformer.resblocks.i.attn.in_proj_weight``,
    ``visual.conv1.weight``, ``visual.proj``, ...). The tiny HPSv2 checkpoint is made with this.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def ln(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + rnd(width, std=0.05), f"{prefix}.bias": rnd(width)}

    def blocks(prefix: str, width: int, mlp: int, layers: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(layers):
            p = f"{prefix}.{i}"
            out.update(ln(f"{p}.ln_1", width))
            out.update({f"{p}.attn.in_proj_weight": rnd(3 * width, width), f"{p}.attn.in_proj_bias": rnd(3 * width),
                        f"{p}.attn.out_proj.weight": rnd(width, width), f"{p}.attn.out_proj.bias": rnd(width)})
            out.update(ln(f"{p}.ln_2", width))
            out.update({f"{p}.mlp.c_fc.weight": rnd(mlp, width), f"{p}.mlp.c_fc.bias": rnd(mlp),
                        f"{p}.mlp.c_proj.weight": rnd(width, mlp), f"{p}.mlp.c_proj.bias": rnd(width)})
        return out

    t, v, e = config.text_config, config.vision_config, config.projection_dim
    grid = v.image_size // v.patch_size
    sd: dict[str, torch.Tensor] = {
        "positional_embedding": rnd(t.max_position_embeddings, t.hidden_size, std=0.01),
        "text_projection": rnd(t.hidden_size, e, std=t.hidden_size ** -0.5),
        "logit_scale": torch.tensor(4.6052),  # log(100), the clamp value trained CLIPs end at
        "token_embedding.weight": rnd(t.vocab_size, t.hidden_size),
        "visual.class_embedding": rnd(v.hidden_size, std=v.hidden_size ** -0.5),
        "visual.positional_embedding": rnd(grid * grid + 1, v.hidden_size, std=v.hidden_size ** -0.5),
        "visual.proj": rnd(v.hidden_size, e, std=v.hidden_size ** -0.5),
        "visual.conv1.weight": rnd(v.hidden_size, 3, v.patch_size, v.patch_size),
    }
    sd.update(ln("ln_final", t.hidden_size))
    sd.update(ln("visual.ln_pre", v.hidden_size))
    sd.update(ln("visual.ln_post", v.hidden_size))
    sd.update(blocks("transformer.resblocks", t.hidden_size, t.intermediate_size, t.num_hidden_layers))
    sd.update(blocks("visual.transformer.resblocks", v.hidden_size, v.intermediate_size, v.num_hidden_layers))
    return sd


# ----------------------------------------------------------------------------- tiny scorers
def tiny_scorer_fingerprint() -> str:
    """Hash of this module's source and version: any change to the tiny recipe rebuilds the cache."""
    blob = f"{TINY_SCORERS_VERSION}\n".encode() + Path(__file__).read_bytes()
    return hashlib.sha256(blob).hexdigest()[:10]


def tiny_scorer_dir() -> Path:
    """Where the tiny scorers are (or will be) built; does not build."""

    return cache_dir() / "tiny" / f"scorers-v{TINY_SCORERS_VERSION}-{tiny_scorer_fingerprint()}"


def tiny_clip_config() -> Any:
    """The tiny twin of the ViT-H/14 CLIP config: same classes and activations (GELU), tiny widths."""
    from transformers import CLIPConfig


    tok = build_clip_tokenizer(vocabulary_words())
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def build_tiny_scorers(out: str | Path) -> Path:
    """Build the tiny scorers into ``out`` (non-atomic; use ``tiny_scorer_root``).

    ``clip_vit_h14/``: config.json + CLIP tokenizer + preprocessor_config.json (the laion repo's layout);
    ``pickscore/``: a random ``CLIPModel`` (PickScore_v1's layout); ``hpsv2/HPS_v2.1_compressed.pt`` and
    ``HPS_v2_compressed.pt``: random open_clip-layout checkpoints ``{"state_dict": ...}`` (xswu/HPSv2's files).
    """
    import torch
    from transformers import CLIPModel


    out = Path(out)
    config = tiny_clip_config()
    proc_dir = out / "clip_vit_h14"
    config.save_pretrained(proc_dir)  # the files the laion repo has: config, preprocessor_config.json, tokenizer
    clip_image_processor(config.vision_config.image_size).save_pretrained(proc_dir)
    build_clip_tokenizer(vocabulary_words()).save_pretrained(proc_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        CLIPModel(config).save_pretrained(out / "pickscore", safe_serialization=True)
    (out / "hpsv2").mkdir(parents=True, exist_ok=True)
    for seed, (version, name) in enumerate(sorted(HPS_FILES.items()), start=21):
        torch.save({"state_dict": random_open_clip_state(config, seed=seed)}, out / "hpsv2" / name)
    (out / "BUILD.json").write_text(json.dumps({"version": TINY_SCORERS_VERSION,
                                                "fingerprint": tiny_scorer_fingerprint()}, indent=2))
    return out


def tiny_scorer_root() -> Path:
    """The built tiny scorer folder; builds it atomically on first use."""

    return atomic_build(tiny_scorer_dir(), build_tiny_scorers, what="tiny scorers")


# ----------------------------------------------------------------------------- scoring
def _features(out: Any) -> Any:
    """transformers 5 returns a model output from ``get_*_features``; older versions a tensor."""
    return getattr(out, "pooler_output", out)


class ClipScorer:
    """A ``CLIPModel`` with its tokenizer and image processor; subclasses set how a score is made."""

    name = ""

    def __init__(self, spec: ScorerSpec, device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer


        try:
            from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
        except ImportError:  # pragma: no cover
            from transformers import CLIPImageProcessor as ImageProcessor

        quiet_loading()
        if spec.version.startswith("tiny-"):
            tiny_scorer_root()
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        self.tokenizer = AutoTokenizer.from_pretrained(spec.processor, local_files_only=True)
        self.image_processor = ImageProcessor.from_pretrained(spec.processor, local_files_only=True)
        self.model = self.load().to(self.device, self.dtype).eval()

    def load(self) -> Any:
        raise NotImplementedError

    def embed(self, prompts: Sequence[str], images: Sequence[Any]) -> tuple[Any, Any]:
        """L2-normalised text (len(prompts), E) and image (len(images), E) embeddings, float32 on the CPU."""
        import torch

        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        with torch.inference_mode():
            t = _features(self.model.get_text_features(input_ids=text.input_ids.to(self.device),
                                                       attention_mask=text.attention_mask.to(self.device)))
            i = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        t = torch.nn.functional.normalize(t.float(), dim=-1).cpu()
        i = torch.nn.functional.normalize(i.float(), dim=-1).cpu()
        return t, i

    def scale(self) -> float:
        return 1.0

    def score(self, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> list[list[float]]:
        """Scores of ``images[j][k]`` against ``prompts[j]``: one text and every image in one forward each."""
        flat = [im for group in images for im in group]
        t, i = self.embed(prompts, flat)
        owner = [j for j, group in enumerate(images) for _ in group]
        cos = (i * t[owner]).sum(-1) * self.scale()
        out, pos = [], 0
        for group in images:
            out.append([float(x) for x in cos[pos: pos + len(group)]])
            pos += len(group)
        return out


class PickScore(ClipScorer):
    """PickScore_v1: ``logit_scale.exp()`` x cosine(text, image)."""

    name = "pickscore"

    def load(self) -> Any:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.spec.weights, local_files_only=True, dtype=self.dtype)

    def scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())


class HPSv2(ClipScorer):
    """HPS v2.x: the open_clip ViT-H-14 checkpoint converted into a ``CLIPModel``; score = cosine(text, image)."""

    name = "hpsv2"

    def load(self) -> Any:
        import torch
        from accelerate import init_empty_weights
        from transformers import CLIPConfig, CLIPModel

        path = Path(self.spec.weights)
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{str(path)!r} is not a readable HPS checkpoint ({type(e).__name__}: {e}). "
                            f"Use {HPS_FILES['v2.1']} or {HPS_FILES['v2.0']} as published.") from None
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{str(path)!r} holds no state dict. Use the published HPS checkpoint.")
        try:
            converted = open_clip_to_transformers(state)
        except KeyError as e:
            raise UserError(f"{str(path)!r} is not an open_clip ViT CLIP checkpoint ({e}).") from None
        config = CLIPConfig.from_pretrained(self.spec.processor, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = CLIPModel(config)
        try:
            model.load_state_dict({k: v.to(self.dtype) for k, v in converted.items()}, strict=True, assign=True)
        except RuntimeError as e:
            raise UserError(f"{str(path)!r} does not fit the CLIP architecture in {self.spec.processor} "
                            f"({str(e).splitlines()[0]}). Point {ENV_CLIP_H14} at the ViT-H-14 config.") from None
        return model


def load_scorer(spec: ScorerSpec, device: str = "cpu") -> ClipScorer:
    """The scorer for ``spec`` (tiny scorers are built on first use)."""
    return {"pickscore": PickScore, "hpsv2": HPSv2}[spec.name](spec, device)
