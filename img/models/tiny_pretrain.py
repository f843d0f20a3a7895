"""Pre-training of the tiny encoders on the shapes world, so that the tiny world sees every kind of break.

Randomly initialised tiny encoders respond to colour (a pixel average) but hardly
to shape, count or relation, so an aligner trained on their tokens can only learn
colour breaks. Real IP-Adapter tokens come from a trained CLIP ViT-H and a
resampler trained to carry the image's content, and the paper's MLLM is a LLaVA
fine-tuned to say how an image should change. This module gives the tiny twins
the same properties at shapes-world scale, once, when the tiny models are built
(``img.models.tiny``)::

    from img.models.tiny_pretrain import MllmPretrainSpec, PretrainSpec, pretrain_encoders, pretrain_mllm
    report = pretrain_encoders(encoder, resampler, PretrainSpec(), ip_tokens=16, ip_dim=64)
    report["seconds"], report["heldout_accuracy"], report["heldout_break_over_jitter"]
    report = pretrain_mllm(llava, processor, MllmPretrainSpec(), prompt=lambda q: chat_prompt(processor, q))

**Image encoder: supervised scene reading.** Every shapes-world image has an exact
description (the scene ``describe`` reads back). The CLIP vision tower
(``CLIPVisionModelWithProjection``) and the IP-Adapter Plus resampler on top of
its penultimate states are trained together with three terms:

1. read the scene: for each of the two group slots (canonical order) its colour,
   shape and count, and the relation, through linear read-outs of the projected CLS
   embedding and of the resampler's N x D tokens (the tokens the aligner works on);
2. ``jitter_ratio``: two drawings of one scene (other layout jitter) must be close
   next to drawings of different scenes;
3. ``break_spread``: a scene and its broken twin must be ``break_band`` (3-6) times
   further apart than two drawings of one scene, whatever the kind of break, so
   that colour (which moves every pixel of a shape) does not drown the other kinds
   in the aligner's distance.

The read-outs are thrown away. The position embedding starts from a 2D sine-cosine
table (as in MAE) rather than CLIP's near-zero random init, so position (needed
for relations) is visible from the first step.

Why not CLIP's contrastive loss: we tried it first (a tiny text tower, captions of
a scene and its broken twin in every batch as hard negatives). In 600-1,500
steps it learned colour, shape and count but left relation at chance (held-out
retrieval of the right caption against its relation-broken twin: 0.50-0.54),
because both towers must bind words or patches to positions, the known
bag-of-words weakness of contrastive image-text models. Reading the scene
directly learns relations in about 200 steps. Shape is the weakest element
(held-out read-out accuracy about 0.4-0.6 per group after 600 steps).

**MLLM: instruction tuning.** See :func:`pretrain_mllm`.

Training images are scenes and their broken twins (each kind in turn) drawn like
the sample's pairs (shared background, own layout jitter), at the sample's size and
through the same CLIP preprocessing as the embed job. Everything is seeded and
runs on one thread, so a build is reproducible for a given torch version.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from img.data import shapes_world as sw
from img.models.processors import clip_image_processor
from img.questions import question_for

log = logging.getLogger(__name__)

COLOURS = list(sw.COLOURS)
SHAPES = list(sw.SHAPES)
RELATIONS = list(sw.RELATIONS)
MAX_COUNT = 3
# (name, number of classes): class 0 means "no such group" / "no relation".
HEADS: tuple[tuple[str, int], ...] = tuple(
    (f"{slot}_{what}", n + 1)
    for slot in ("a", "b")
    for what, n in (("colour", len(COLOURS)), ("shape", len(SHAPES)), ("count", MAX_COUNT))
) + (("relation", len(RELATIONS) + 1),)


@dataclass(frozen=True)
class PretrainSpec:
    """Size of the pre-training: ~1 minute of one CPU core."""

    chunk: int = 4096  # scenes (each with a broken twin) rendered at a time
    chunk_epochs: int = 3  # passes over a chunk before the next one is rendered
    heldout: int = 256  # scenes (and twins) for the accuracy report only
    steps: int = 600
    batch: int = 64  # images per step: 32 scenes, each drawn twice
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 30
    position_scale: float = 1.0  # scale of the 2D sine-cosine position init
    invariance: float = 1.0  # weight of the jitter term (``jitter_ratio`` of the tokens of two drawings)
    balance: float = 1.0  # weight of the break-size term (``break_spread``)
    break_band: tuple[float, float] = (3.0, 6.0)  # a break moves the tokens lo..hi x as far as a redrawing
    seed: int = 0
    image_size: int = sw.SIZE  # rendered at the sample's size; the CLIP processor resizes


def scene_labels(scene: sw.Scene) -> list[int]:
    """The scene as one class index per head (``HEADS`` order); canonical group order."""
    scene = scene.canonical()
    out: list[int] = []
    for slot in range(2):
        if slot < len(scene.groups):
            g = scene.groups[slot]
            out += [COLOURS.index(g.colour) + 1, SHAPES.index(g.shape) + 1, min(g.count, MAX_COUNT)]
        else:
            out += [0, 0, 0]
    out.append(RELATIONS.index(scene.relation) + 1 if scene.relation else 0)
    return out


def sincos_positions(grid: int, dim: int, with_cls: bool = True) -> torch.Tensor:
    """2D sine-cosine position table (MAE), unit amplitude: (1 + grid^2, dim); the CLS row is zero."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for c in (xs.flatten(), ys.flatten()):
        a = c[:, None] * omega[None]
        parts += [a.sin(), a.cos()]
    pe = torch.cat(parts, dim=1)
    pe = torch.cat([pe, pe.new_zeros(len(pe), dim - pe.shape[1])], dim=1)
    if with_cls:
        pe = torch.cat([pe.new_zeros(1, dim), pe])
    return pe.float()


def _scenes(n: int, seed: int, start: int = 0) -> tuple[list[sw.Scene], list[str]]:
    """``2n`` scenes: drawn scenes ``start`` to ``start + n - 1`` and their broken twins (kinds in turn), interleaved."""
    scenes, kinds = [], []
    for i in range(start, start + n):
        kind = sw.BROKEN_KINDS[i % len(sw.BROKEN_KINDS)]
        rng = np.random.default_rng([seed, 11, i])
        scene = sw.sample_scene(rng, groups=2 if kind == "relation" else None)
        scenes += [scene, sw.break_scene(scene, kind, rng)]
        kinds += [kind, kind]
    return scenes, kinds


def _pixels(scenes: list[sw.Scene], seed: int, processor: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scene drawn twice, each drawing with its own layout jitter, CLIP-preprocessed: two (n, 3, S, S)
    float16 tensors (the drawings A and B). A scene and its broken twin (``scenes[2i]``, ``scenes[2i + 1]``)
    share a background, as a sample pair does."""
    out = []
    for stream in (12, 13):
        images = []
        for i, scene in enumerate(scenes):
            bg = sw.sample_background(np.random.default_rng([seed, 14, i // 2]))
            images.append(sw.render(scene, np.random.default_rng([seed, stream, i]), background=bg, size=size))
        out.append(processor(images=images, return_tensors="pt").pixel_values.half())
    return out[0], out[1]


def break_spread(a: torch.Tensor, b: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """How far the breaks of a batch fall outside ``band`` x the jitter distance.

    ``a``, ``b``: tokens of two drawings of a batch laid out (scene, twin, scene, twin, ...). For each pair
    r = log ||a(scene) - b(twin)||^2 / mean ||a(x) - b(x)||^2 (a break, against two drawings of one scene);
    the loss is the mean squared distance of r from [log lo, log hi]. Zero when every kind of break moves the
    tokens by lo to hi times what redrawing does; scale-free, so shrinking the tokens cannot meet it.
    """
    fa, fb = a.flatten(1), b.flatten(1)
    jitter = (fa - fb).pow(2).sum(1).mean()
    r = torch.log((fa[0::2] - fb[1::2]).pow(2).sum(1) / jitter + 1e-8)
    lo, hi = math.log(band[0]), math.log(band[1])
    return (F.relu(lo - r) + F.relu(r - hi)).pow(2).mean()


def jitter_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean ||a_i - b_i||^2 (two drawings of scene i) over mean ||a_i - b_j||^2 (different scenes), i != j."""
    a, b = a.flatten(1), b.flatten(1)
    d = torch.cdist(a, b).pow(2)
    n = len(a)
    same = d.diagonal().mean()
    other = (d.sum() - d.diagonal().sum()) / (n * n - n)
    return same / other


class _ReadOut(nn.Module):
    """One linear layer to the logits of every head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, sum(n for _, n in HEADS))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the heads."""
        logits = self.linear(x).split([n for _, n in HEADS], dim=-1)
        return sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits)) / len(HEADS)

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, heads) bool."""
        logits = self.linear(x).split([n for _, n in HEADS], dim=-1)
        return torch.stack([lg.argmax(-1) == y[:, i] for i, lg in enumerate(logits)], dim=1)


def _features(encoder: nn.Module, resampler: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(pixels, output_hidden_states=True)
    tokens = resampler(out.hidden_states[-2])  # exactly what img.features.IPTokenEncoder computes
    return out.image_embeds, tokens.flatten(1)


def pretrain_encoders(encoder: nn.Module, resampler: nn.Module, spec: PretrainSpec, *, ip_tokens: int,
                      ip_dim: int) -> dict[str, Any]:
    """Train ``encoder`` and ``resampler`` in place (left in eval mode); returns a JSON-able report."""

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible, and polite on a shared machine; the ops are tiny anyway
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            processor = clip_image_processor(encoder.config.image_size)
            emb = encoder.vision_model.embeddings
            grid = encoder.config.image_size // encoder.config.patch_size
            emb.position_embedding.weight.data.copy_(spec.position_scale * sincos_positions(grid, emb.embed_dim))
            heads = _ReadOut(encoder.config.projection_dim), _ReadOut(ip_tokens * ip_dim)  # CLS, tokens
            losses, seen, t_data = _train_encoders(encoder, resampler, heads, spec, processor)
            encoder.eval(), resampler.eval()
            held, tok, tok_b, t_held = _heldout_encoders(encoder, resampler, heads, spec, processor)
            t_data += t_held
    finally:
        torch.set_num_threads(threads)
    return {"method": "supervised scene reading", "seconds": round(time.perf_counter() - t0, 1),
            "data_seconds": round(t_data, 1), "first_loss": round(float(np.mean(losses[:10])), 4),
            "final_loss": round(float(np.mean(losses[-50:])), 4), "scenes_seen": 2 * seen,
            "heldout_images": held["images"],
            "heldout_jitter_ratio": round(float(jitter_ratio(tok, tok_b)), 4),
            "heldout_break_over_jitter": held["break_over_jitter"],
            "heldout_accuracy": held["accuracy"], "spec": asdict(spec)}


def _chunk(spec: PretrainSpec, processor: Any, start: int,
           n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], float]:
    """Scenes ``start`` .. ``start + n - 1`` and their twins, drawn twice: (drawings A, drawings B, labels, kinds,
    seconds spent rendering)."""
    t = time.perf_counter()
    scenes, kinds = _scenes(n, spec.seed, start)
    pa, pb = _pixels(scenes, spec.seed + start, processor, spec.image_size)
    seconds = time.perf_counter() - t
    return pa, pb, torch.tensor([scene_labels(s) for s in scenes]), kinds, seconds


def _train_encoders(encoder: nn.Module, resampler: nn.Module, heads: tuple[_ReadOut, _ReadOut], spec: PretrainSpec,
                    processor: Any) -> tuple[list[float], int, float]:
    """``spec.steps`` AdamW steps (warm-up, cosine) over chunks of scenes, each chunk ``chunk_epochs`` times:
    (losses, scenes seen, seconds spent rendering)."""
    cls_head, tok_head = heads
    params = [*encoder.parameters(), *resampler.parameters(), *cls_head.parameters(), *tok_head.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    encoder.train(), resampler.train()
    gen = torch.Generator().manual_seed(spec.seed)
    losses, ratios, spreads = [], [], []
    quarter = spec.batch // 4
    pos, seen, epochs, t_data = spec.chunk, 0, spec.chunk_epochs, 0.0
    for step in range(spec.steps):
        if pos + quarter > spec.chunk:
            if epochs == spec.chunk_epochs:  # a fresh chunk of scenes
                pix_a, pix_b, labels, _, dt = _chunk(spec, processor, seen, spec.chunk)
                seen, epochs, t_data = seen + spec.chunk, 0, t_data + dt
            order, pos, epochs = torch.randperm(spec.chunk, generator=gen), 0, epochs + 1
        pair = order[pos: pos + quarter]
        pos += quarter
        idx = torch.stack([2 * pair, 2 * pair + 1], dim=1).flatten()  # scene, twin, scene, twin, ...
        loss, ratio, spread = _encoder_loss(encoder, resampler, heads, pix_a[idx], pix_b[idx], labels[idx], spec)
        ratios.append(ratio.item())
        spreads.append(spread.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("tiny encoder pre-training: step %d/%d loss %.4f (jitter ratio %.3f, break spread %.3f)",
                     step + 1, spec.steps, float(np.mean(losses[-100:])), float(np.mean(ratios[-100:])),
                     float(np.mean(spreads[-100:])))
    return losses, seen, t_data


def _encoder_loss(encoder: nn.Module, resampler: nn.Module, heads: tuple[_ReadOut, _ReadOut], pix_a: torch.Tensor,
                  pix_b: torch.Tensor, labels: torch.Tensor,
                  spec: PretrainSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, jitter ratio, break spread) of a batch: both read-outs on both drawings, plus the two token terms."""
    cls_head, tok_head = heads
    half = spec.batch // 2
    cls, tok = _features(encoder, resampler, torch.cat([pix_a, pix_b]).float())
    y = torch.cat([labels, labels])
    ratio = jitter_ratio(tok[:half], tok[half:])
    spread = break_spread(tok[:half], tok[half:], spec.break_band)
    loss = (cls_head.loss(cls, y) + tok_head.loss(tok, y) + spec.invariance * ratio
            + spec.balance * spread)
    return loss, ratio, spread


@torch.no_grad()
def _heldout_encoders(encoder: nn.Module, resampler: nn.Module, heads: tuple[_ReadOut, _ReadOut],
                      spec: PretrainSpec, processor: Any) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, float]:
    """On held-out scenes, never trained on: read-out accuracy and break / jitter distance per kind
    ({images, accuracy, break_over_jitter}, tokens of drawings A and B, seconds spent rendering)."""
    pix_a, pix_b, y, kinds, t_data = _chunk(spec, processor, 10**7, spec.heldout)
    cls, tok = _features(encoder, resampler, pix_a.float())
    tok_b = _features(encoder, resampler, pix_b.float())[1]
    # per kind: break distance (scene vs twin, each drawn with its own jitter) / jitter distance (same scene)
    d_break = (tok[0::2] - tok_b[1::2]).pow(2).sum(1)
    d_jit = (tok - tok_b).pow(2).sum(1).mean()
    held_kinds = kinds[0::2]
    response = {k: round(float(d_break[[i for i, kk in enumerate(held_kinds) if kk == k]].mean() / d_jit), 2)
                for k in sw.BROKEN_KINDS}
    accuracy = {}
    for name, head, x in (("cls", heads[0], cls), ("tokens", heads[1], tok)):
        ok = head.correct(x, y)
        accuracy[name] = {h: round(float(ok[:, i].float().mean()), 3) for i, (h, _) in enumerate(HEADS)}
        accuracy[name]["all"] = round(float(ok.all(dim=1).float().mean()), 3)
    return {"images": int(len(y)), "accuracy": accuracy, "break_over_jitter": response}, tok, tok_b, t_data


# ---------------------------------------------------------------- the tiny MLLM
MLLM_HEADS: tuple[tuple[str, int], ...] = (
    *((f"caption_{n}", k) for n, k in HEADS), *((f"image_{n}", k) for n, k in HEADS),
    ("broken", len(sw.BROKEN_KINDS) + 1),
)


@dataclass(frozen=True)
class MllmPretrainSpec:
    """The tiny LLaVA's instruction tuning: ~40 s of one CPU core."""

    pairs: int = 3072  # (image, question) samples; a quarter show the faithful scene, the rest a broken twin
    heldout: int = 256
    steps: int = 800
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 30
    seed: int = 0
    image_size: int = sw.SIZE


def _llava_samples(spec: MllmPretrainSpec) -> tuple[list[Any], list[str], torch.Tensor]:
    """(images, captions, labels): the image of a scene or its broken twin, the scene's caption, MLLM_HEADS labels."""
    scenes, kinds = _scenes(spec.pairs + spec.heldout, spec.seed + 1)
    images, captions, labels = [], [], []
    for i in range(0, len(scenes), 2):
        scene, twin, kind = scenes[i], scenes[i + 1], kinds[i]
        faithful = (i // 2) % 4 == 3
        shown = scene if faithful else twin
        rng = np.random.default_rng([spec.seed, 21, i])
        images.append(sw.render(shown, rng, background=sw.sample_background(rng), size=spec.image_size))
        captions.append(scene.caption())
        labels.append(scene_labels(scene) + scene_labels(shown) + [0 if faithful else sw.BROKEN_KINDS.index(kind) + 1])
    return images, captions, torch.tensor(labels)


def pretrain_mllm(model: nn.Module, processor: Any, spec: MllmPretrainSpec, prompt: Any) -> dict[str, Any]:
    """Instruction-tune a tiny ``LlavaForConditionalGeneration`` in place (projector + language model).

    The paper fine-tunes LLaVA so that, shown an image and asked how it should change to match a caption, it
    states the edit. The tiny analogue: from the last-layer hidden state at the prompt's last position (the
    states the guidance is made of), linear read-outs must give the caption's scene, the image's scene and
    which element differs (nothing, colour, shape, count or relation). The vision tower stays as it is (the
    pre-trained IP encoder's); the read-outs are thrown away. ``prompt(question)`` is the chat text the
    embed job builds. Returns a JSON-able report.
    """

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            inputs, labels = _mllm_inputs(model, processor, spec, prompt)
            t_data = time.perf_counter() - t0
            readout = nn.Linear(model.config.text_config.hidden_size, sum(n for _, n in MLLM_HEADS))
            states = _last_states(model, inputs)
            losses = _train_mllm(model, readout, states, labels, spec)
            model.eval()
            with torch.no_grad():
                held = torch.arange(spec.pairs, spec.pairs + spec.heldout)
                logits = readout(states(held)).split([n for _, n in MLLM_HEADS], dim=-1)
                ok = torch.stack([lg.argmax(-1) == labels[held, i] for i, lg in enumerate(logits)], dim=1)
            accuracy = {h: round(float(ok[:, i].float().mean()), 3) for i, (h, _) in enumerate(MLLM_HEADS)}
    finally:
        torch.set_num_threads(threads)
    return {"method": "read caption, image and their difference from the last hidden state",
            "seconds": round(time.perf_counter() - t0, 1), "data_seconds": round(t_data, 1),
            "first_loss": round(float(np.mean(losses[:10])), 4), "final_loss": round(float(np.mean(losses[-50:])), 4),
            "heldout_samples": spec.heldout, "heldout_accuracy": accuracy, "spec": asdict(spec)}


def _mllm_inputs(model: nn.Module, processor: Any, spec: MllmPretrainSpec,
                 prompt: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every sample's prompt tokens, the frozen vision tower's features (computed once) and the labels:
    ({ids, mask, last, feats, image_pos}, MLLM_HEADS labels)."""
    images, captions, labels = _llava_samples(spec)
    texts = [prompt(question_for(c, key=f"tiny-mllm-{i}", seed=spec.seed)) for i, c in enumerate(captions)]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    last = mask.sum(1) - 1  # right padding: the prompt's last position
    cfg = model.config
    with torch.no_grad():  # the vision tower is frozen: its features once
        out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
    image_pos = ids == cfg.image_token_id
    return {"ids": ids, "mask": mask, "last": last, "feats": feats, "image_pos": image_pos}, labels


def _last_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """``states(idx)``: the language model's last hidden state at each sample's last prompt position, with the
    projected image features in place of the image tokens (as LLaVA's forward does)."""
    inner, width = model.model, model.config.text_config.hidden_size
    ids, mask, last, feats, image_pos = (inputs[k] for k in ("ids", "mask", "last", "feats", "image_pos"))

    def states(idx: torch.Tensor) -> torch.Tensor:
        emb = inner.get_input_embeddings()(ids[idx])
        img = inner.multi_modal_projector(feats[idx]).reshape(-1, width)
        emb = emb.masked_scatter(image_pos[idx][..., None].expand_as(emb), img)
        h = inner.language_model(inputs_embeds=emb, attention_mask=mask[idx].long()).last_hidden_state
        return h[torch.arange(len(idx)), last[idx]]

    return states


def _train_mllm(model: nn.Module, readout: nn.Linear, states: Any, labels: torch.Tensor,
                spec: MllmPretrainSpec) -> list[float]:
    """``spec.steps`` AdamW steps (warm-up, cosine) of the projector, language model and read-out; the losses."""
    inner = model.model
    params = [*inner.multi_modal_projector.parameters(), *inner.language_model.parameters(),
              *readout.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    sizes = [n for _, n in MLLM_HEADS]
    model.train()
    gen = torch.Generator().manual_seed(spec.seed)
    n_train = spec.pairs
    order, pos, losses = torch.randperm(n_train, generator=gen), 0, []
    for step in range(spec.steps):
        if pos + spec.batch > n_train:
            order, pos = torch.randperm(n_train, generator=gen), 0
        idx = order[pos: pos + spec.batch]
        pos += spec.batch
        logits = readout(states(idx)).split(sizes, dim=-1)
        loss = sum(F.cross_entropy(lg, labels[idx, i]) for i, lg in enumerate(logits)) / len(sizes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("tiny MLLM instruction tuning: step %d/%d loss %.4f", step + 1, spec.steps,
                     float(np.mean(losses[-100:])))
    return losses
