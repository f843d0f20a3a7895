"""Offline tiny models: random weights, the real classes, the real loading path.

Every component of a real profile has a tiny twin of the *same class*, built
from a config in code with a fixed seed, saved once with ``save_pretrained`` in
the on-disk layout of its real hub repository, and then loaded back through the
very ``from_pretrained`` / ``load_ip_adapter`` code that real weights use
(``img/models/loading.py``)::

    from img.models.tiny import tiny_root
    root = tiny_root("tiny")          # builds on first use, then a cache hit
    # root/sdxl/                      StableDiffusionXLPipeline folder (like stabilityai/stable-diffusion-xl-base-1.0)
    # root/ip_adapter/models/image_encoder/                     CLIPVisionModelWithProjection (like h94/IP-Adapter)
    # root/ip_adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors   original IP-Adapter format
    # root/llava/                     LlavaForConditionalGeneration + LlavaProcessor (like llava-hf/llava-1.5-13b-hf)

The cache lives in ``$IMG_CACHE/tiny/<flavour>-v<version>-<spec hash>`` (default
``~/.cache/img``). A build goes to a temporary folder that is renamed into place
at the end, so a crash never leaves a half-built cache and two processes that
build at once both end up with one complete copy.

Flavours: ``tiny`` (trivial compute; tests and the demo) and ``bench`` (same
classes, wider, so ``img bench embed`` measures real work).

The ``tiny`` flavour's image encoders are not left random: the CLIP vision tower
and the IP-Adapter resampler are pre-trained on the shapes world
(``img.models.tiny_pretrain``, about a minute of one core, once per cache key) so that
their tokens respond to colour, shape, count and relation, and the same trained
tower is LLaVA's vision tower (the projector and the language model stay random).
``BUILD.json`` records the build and pre-training times and the held-out accuracy
of the pre-training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from img.conversation import TEMPLATES
from img.data.shapes_world import vocabulary
from img.errors import UserError
from img.finetune.edits import INSTRUCTION_WORDS
from img.logs import quiet_loading
from img.models.processors import clip_image_processor
from img.questions import QUESTIONS

log = logging.getLogger(__name__)

TINY_VERSION = 3  # the cache key also hashes the source of the files the recipe uses, so any change rebuilds
_RECIPE_FILES = ("models/tiny.py", "models/tiny_pretrain.py", "data/shapes_world.py", "questions.py")  # under img/

IP_WEIGHT_NAME = "ip-adapter-plus_sdxl_vit-h.safetensors"  # h94's file name, so the loading code is the real one
IP_WEIGHT_SUBFOLDER = "sdxl_models"
IP_ENCODER_SUBFOLDER = "models/image_encoder"

# The LLaVA-1.5 chat template (llava-hf): "USER: <image>\n{question} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Words of the shapes world and of the question pool. Each is one token in both
# tiny tokenizers, so captions that differ by one word differ by one token.
CAPTION_WORDS: tuple[str, ...] = tuple(
    """
    a an the one two three four five six seven eight nine ten single pair of and with without or
    red green blue yellow purple orange pink brown black white gray grey cyan magenta violet gold silver
    circle circles square squares triangle triangles star stars rectangle rectangles hexagon hexagons
    diamond diamonds ellipse ellipses heart hearts cross crosses dot dots shape shapes ring rings
    left right above below under over beside next to near far top bottom middle center centre corner
    on in at by behind front between around inside outside side sides upper lower
    small large big tiny huge little medium tall wide thin thick bright dark light pale
    background foreground image picture photo drawing painting scene canvas plain
    is are there has have it its this that these those some many few no not only
    """.split()
)
CHAT_WORDS: tuple[str, ...] = ("user", "assistant", "system")
PUNCTUATION: tuple[str, ...] = tuple(".,:;?!'\"-()/#")  # the LLaVA tokenizer splits every punctuation mark apart


def _question_words() -> list[str]:
    words: list[str] = []
    for q in QUESTIONS:
        for w in q.replace("{caption}", " ").lower().split():
            w = w.strip(".,:;?!'\"()")
            if w:
                words.append(w)
    return words


def _template_words() -> list[str]:
    """Words of the MLLM conversation texts (e.g. the LLaVA v0 system sentence)."""

    text = " ".join(t for t in TEMPLATES.values() if t).replace("{question}", " ").replace("<image>", " ")
    return re.findall(r"[a-z0-9]+", text.lower())


def vocabulary_words() -> list[str]:
    """Deterministic, de-duplicated word list shared by the tiny tokenizers."""

    seen: dict[str, None] = {}
    for w in [*CAPTION_WORDS, *vocabulary(), *CHAT_WORDS, *_question_words(), *INSTRUCTION_WORDS]:
        seen.setdefault(w.lower(), None)
    return list(seen)


def llava_vocabulary_words() -> list[str]:
    """``vocabulary_words()`` plus the words of the MLLM conversation texts (the tiny LLaVA tokenizer's words)."""
    return list(dict.fromkeys([*vocabulary_words(), *_template_words()]))


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny flavour. Real sizes are in the comments."""

    flavour: str
    seed: int = 0
    # IP-Adapter image encoder, CLIPVisionModelWithProjection. Real: ViT-H/14, 1280 wide, 32 layers, 224 px.
    ip_image_size: int = 64
    ip_patch: int = 8  # 64 px / 8 = 8x8 patches + CLS = 65 tokens (ViT-H/14 at 224 px: 257); 16x cheaper attention
    ip_hidden: int = 32
    ip_layers: int = 3  # hidden_states[-2] (the IP-Adapter Plus input) is then a real mid layer
    ip_heads: int = 4
    ip_projection: int = 32
    # IP-Adapter Plus resampler (IPAdapterPlusImageProjection). Real: 16 queries, 20 heads x 64 = 1280 wide, depth 4.
    ip_tokens: int = 16
    resampler_heads: int = 1  # width = heads x 64: diffusers' loader infers heads as to_q rows // 64
    # SDXL: two CLIP text encoders whose widths add up to D (real: 768 + 1280 = 2048).
    text_hidden: int = 32
    text_layers: int = 2
    unet_channels: tuple[int, int] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 32, 64)  # 3 blocks: latents are image_size / 4
    image_size: int = 64  # generation size in px (real SDXL: 1024)
    # LLaVA: tiny Llama + tiny CLIP vision tower. Real 13B: 5120 wide, 40 layers; ViT-L/14-336.
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_intermediate: int = 128
    mllm_image_size: int = 64
    mllm_patch: int = 8  # (64 / 8)^2 = 64 image tokens in the sequence (real: 576)
    mllm_vision_hidden: int = 32
    mllm_vision_layers: int = 3
    # Pre-training of the IP encoder + resampler on the shapes world (img.models.tiny_pretrain); the trained tower is
    # also LLaVA's vision tower when the two towers have the same sizes.
    pretrain: bool = True
    pretrain_steps: int = 600
    mllm_pretrain_steps: int = 800

    @property
    def ip_dim(self) -> int:
        """D: IP token width = UNet cross-attention width = sum of the two text encoder widths."""
        return 2 * self.text_hidden

    @property
    def clip_tokens(self) -> int:
        return (self.ip_image_size // self.ip_patch) ** 2 + 1

    @property
    def mllm_image_tokens(self) -> int:
        return (self.mllm_image_size // self.mllm_patch) ** 2

    @property
    def shared_vision(self) -> bool:
        """LLaVA's vision tower is the pre-trained IP encoder's (same sizes)."""
        return self.pretrain and (self.ip_image_size, self.ip_patch, self.ip_hidden, self.ip_layers, self.ip_heads) == (
            self.mllm_image_size, self.mllm_patch, self.mllm_vision_hidden, self.mllm_vision_layers, 4)

    def fingerprint(self) -> str:
        blob = json.dumps(
            {
                "spec": dataclasses.asdict(self),
                "version": TINY_VERSION,
                "words": llava_vocabulary_words(),
                "recipe": hashlib.sha256(b"".join((Path(__file__).parents[1] / f).read_bytes()
                                                  for f in _RECIPE_FILES)).hexdigest(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


FLAVOURS: dict[str, TinySpec] = {
    "tiny": TinySpec("tiny"),
    # Same classes, wider: a few tens of ms of real compute per pair on one CPU core.
    "bench": TinySpec(
        "bench",
        ip_image_size=112,
        ip_patch=14,
        ip_hidden=256,
        ip_layers=4,
        ip_heads=4,
        ip_projection=128,
        resampler_heads=4,
        text_hidden=128,
        text_layers=2,
        llm_hidden=384,
        llm_layers=4,
        llm_heads=6,
        llm_intermediate=1024,
        mllm_image_size=112,
        mllm_patch=14,
        mllm_vision_hidden=256,
        mllm_vision_layers=4,
        pretrain=False,  # throughput only: random weights do the same work
    ),
}


def cache_dir() -> Path:
    """``$IMG_CACHE`` or ``~/.cache/img``."""
    return Path(os.environ.get("IMG_CACHE") or Path.home() / ".cache" / "img").expanduser()


def tiny_dir(flavour: str) -> Path:
    """Where ``flavour`` is (or will be) built; does not build."""
    spec = get_spec(flavour)
    return cache_dir() / "tiny" / f"{flavour}-v{TINY_VERSION}-{spec.fingerprint()}"


def get_spec(flavour: str) -> TinySpec:

    if flavour not in FLAVOURS:
        raise UserError(f"unknown tiny flavour {flavour!r}. Known flavours: {', '.join(FLAVOURS)}.")
    return FLAVOURS[flavour]


def tiny_root(flavour: str = "tiny") -> Path:
    """The built tiny model folder for ``flavour``; builds it atomically on first use."""
    spec = get_spec(flavour)
    return atomic_build(tiny_dir(flavour), lambda tmp: build_tiny(spec, tmp), what=f"tiny models {flavour!r}")


def atomic_build(final: Path, build: Callable[[Path], Any], what: str = "tiny models") -> Path:
    """``final`` if it holds a finished build (``BUILD.json``); else ``build(tmp)`` into a temporary sibling
    folder, renamed into place at the end (a crash never leaves a half-built cache; of two concurrent
    builders, one copy wins). ``build`` must write ``BUILD.json`` last."""
    if (final / "BUILD.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("building %s into %s", what, final)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "BUILD.json").is_file():  # not a concurrent winner: a real failure
                raise
            log.info("another process built %s first; using its copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- builders
def _seed(spec: TinySpec, offset: int) -> None:
    import torch

    torch.manual_seed(spec.seed * 1000 + offset)


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned from ``words`` (each counted once) until every word is one symbol.

    Plain BPE training with CLIP's end-of-word marker: repeatedly merge the most frequent adjacent pair,
    ties broken by the pair's text, so the result never depends on hash order or library version.
    """
    from collections import Counter

    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for sym in corpus:
            counts.update(zip(sym, sym[1:]))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        joined = pair[0] + pair[1]
        new_corpus = []
        for sym in corpus:
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
                    out.append(joined)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_corpus.append(tuple(out))
        corpus = new_corpus


def build_clip_tokenizer(words: list[str]):
    """A byte-level BPE ``CLIPTokenizer`` (vocab + merges made in code) in which every word of ``words`` is one token."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for sym in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(sym, len(vocab))
    merges = bpe_merges([w.lower() for w in words])
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_llava_tokenizer(words: list[str]):
    """A WordLevel tokenizer (lower-cased words, each punctuation mark on its own) with ``<image>`` as a special
    token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in [*words, *PUNCTUATION]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=4096,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _build_sdxl(spec: TinySpec, out: Path) -> Any:
    """Tiny ``StableDiffusionXLPipeline`` (diffusers' own test recipe, sized from ``spec``); returns the UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(vocabulary_words())
    scale = 2 ** (len(spec.vae_channels) - 1)
    time_dim = 8
    _seed(spec, 1)
    unet = UNet2DConditionModel(
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        sample_size=spec.image_size // scale,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        # SDXL: 6 micro-conditioning numbers x time_dim + the pooled text_encoder_2 projection
        projection_class_embeddings_input_dim=6 * time_dim + spec.text_hidden,
        cross_attention_dim=spec.ip_dim,
        norm_num_groups=8,
    )
    _seed(spec, 2)
    vae = AutoencoderKL(
        block_out_channels=list(spec.vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=spec.image_size,
        scaling_factor=0.13025,
    )
    text_cfg = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=spec.text_hidden,
        intermediate_size=4 * spec.text_hidden,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=spec.text_layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=spec.text_hidden,
    )
    _seed(spec, 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    _seed(spec, 4)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    # SDXL base's scheduler settings.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return unet


def resampler_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``IPAdapterPlusImageProjection`` keys -> the original IP-Adapter ``Resampler`` keys.

    The inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` (Plus branch): ``ln0/ln1`` ->
    ``0.norm1/0.norm2``, ``attn.to_q`` -> ``0.to_q``, ``attn.to_k`` + ``attn.to_v`` -> ``0.to_kv`` (stacked),
    ``attn.to_out.0`` -> ``0.to_out``, ``ff.0`` -> ``1.0``, ``ff.1.net.0.proj`` -> ``1.1``, ``ff.1.net.2`` -> ``1.3``.
    """
    import torch

    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("attn.to_v"):
            continue  # stacked with to_k below
        mapping = {
            "ln0.": "0.norm1.",
            "ln1.": "0.norm2.",
            "attn.to_q.": "0.to_q.",
            "attn.to_out.0.": "0.to_out.",
            "ff.0.": "1.0.",
            "ff.1.net.0.proj.": "1.1.",
            "ff.1.net.2.": "1.3.",
        }
        if rest.startswith("attn.to_k."):
            suffix = rest[len("attn.to_k.") :]
            out[f"layers.{i}.0.to_kv.{suffix}"] = torch.cat([value, state[f"layers.{i}.attn.to_v.{suffix}"]], dim=0)
            continue
        for src, dst in mapping.items():
            if rest.startswith(src):
                out[f"layers.{i}.{dst}{rest[len(src):]}"] = value
                break
        else:
            raise KeyError(f"unexpected resampler key {key}")
    return out


def _build_ip_adapter(spec: TinySpec, out: Path, unet: Any) -> tuple[Any, dict[str, Any] | None]:
    """Tiny ``h94/IP-Adapter`` layout: image encoder + Plus weights in the original safetensors format.

    Returns the image encoder and the pre-training report (None without pre-training)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _seed(spec, 5)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=spec.ip_hidden,
            intermediate_size=4 * spec.ip_hidden,
            num_hidden_layers=spec.ip_layers,
            num_attention_heads=spec.ip_heads,
            image_size=spec.ip_image_size,
            patch_size=spec.ip_patch,
            projection_dim=spec.ip_projection,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
    )
    _seed(spec, 6)
    resampler = IPAdapterPlusImageProjection(
        embed_dims=spec.ip_hidden,
        output_dims=spec.ip_dim,
        hidden_dims=spec.resampler_heads * 64,
        depth=4,
        dim_head=64,
        heads=spec.resampler_heads,
        num_queries=spec.ip_tokens,
    )
    report = None
    if spec.pretrain:
        from img.models.tiny_pretrain import PretrainSpec, pretrain_encoders  # heavy: torch (builds only)

        report = pretrain_encoders(encoder, resampler, PretrainSpec(seed=spec.seed, steps=spec.pretrain_steps),
                                   ip_tokens=spec.ip_tokens, ip_dim=spec.ip_dim)
        log.info("pre-trained the tiny IP encoder + resampler in %.0f s; held-out accuracy (tokens): %s",
                 report["seconds"], report["heldout_accuracy"]["tokens"])
    encoder.save_pretrained(out / IP_ENCODER_SUBFOLDER, safe_serialization=True)
    tensors = {f"image_proj.{k}": v for k, v in resampler_to_original(resampler.state_dict()).items()}
    # ip_adapter layers, numbered like the original: the index of each processor in unet.attn_processors;
    # only cross-attention (attn2) processors carry to_k_ip / to_v_ip, initialised from to_k / to_v as in
    # IP-Adapter training.
    for idx, name in enumerate(unet.attn_processors.keys()):
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        tensors[f"ip_adapter.{idx}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        tensors[f"ip_adapter.{idx}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    path = out / IP_WEIGHT_SUBFOLDER / IP_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return encoder, report


def _build_llava(spec: TinySpec, out: Path, ip_encoder: Any = None) -> dict[str, Any] | None:
    """Tiny ``llava-hf`` layout. With ``spec.shared_vision`` its vision tower is ``ip_encoder``'s (pre-trained) and
    the projector + language model are instruction-tuned (``img.models.tiny_pretrain.pretrain_mllm``); returns that report."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_llava_tokenizer(llava_vocabulary_words())
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=spec.mllm_vision_hidden,
        intermediate_size=4 * spec.mllm_vision_hidden,
        num_hidden_layers=spec.mllm_vision_layers,
        num_attention_heads=4,
        image_size=spec.mllm_image_size,
        patch_size=spec.mllm_patch,
        projection_dim=spec.mllm_vision_hidden,
        hidden_act="gelu" if spec.shared_vision else "quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.llm_hidden,
        intermediate_size=spec.llm_intermediate,
        num_hidden_layers=spec.llm_layers,
        num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=spec.mllm_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _seed(spec, 7)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(spec.mllm_image_size),
        tokenizer=tokenizer,
        patch_size=spec.mllm_patch,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token the "default" strategy drops
    )
    report = None
    if spec.shared_vision and ip_encoder is not None:
        tower = model.model.vision_tower  # a CLIPVisionModel: in transformers 5 its modules sit at the top level
        tower = getattr(tower, "vision_model", tower)
        tower.load_state_dict(ip_encoder.vision_model.state_dict())
        from img.models.tiny_pretrain import MllmPretrainSpec, pretrain_mllm  # heavy: torch (builds only)

        report = pretrain_mllm(model, processor, MllmPretrainSpec(seed=spec.seed, steps=spec.mllm_pretrain_steps),
                               prompt=lambda q: TEMPLATES["llava_v0"].format(question=q))  # the tiny profile's template
        log.info("instruction-tuned the tiny LLaVA in %.0f s; held-out accuracy: %s", report["seconds"],
                 report["heldout_accuracy"])
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return report


def build_tiny(spec: TinySpec, out: str | Path) -> Path:
    """Build every tiny component of ``spec`` into ``out`` (non-atomic; use ``tiny_root``)."""
    import diffusers
    import torch
    import transformers


    quiet_loading()
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        unet = _build_sdxl(spec, out / "sdxl")
        encoder, report = _build_ip_adapter(spec, out / "ip_adapter", unet)
        mllm_report = _build_llava(spec, out / "llava", encoder)
    seconds = round(time.perf_counter() - t0, 1)
    trained = (report["seconds"] if report else 0) + (mllm_report["seconds"] if mllm_report else 0)
    log.info("built tiny models %r in %.0f s%s", spec.flavour, seconds,
             f" ({trained:.0f} s of it pre-training)" if trained else "")
    info = {
        "build_seconds": seconds,
        "pretrain": report,
        "pretrain_mllm": mllm_report,
        "flavour": spec.flavour,
        "version": TINY_VERSION,
        "fingerprint": spec.fingerprint(),
        "spec": dataclasses.asdict(spec),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }
    (out / "BUILD.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return out
