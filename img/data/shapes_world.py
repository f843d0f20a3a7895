"""Shapes world: captions about coloured shapes, and the images that draw them.

The bundled sample (``img data sample``) is made of these. A caption names one
or two groups of shapes (1 to 3 shapes in all) and, for two groups, how they
sit relative to each other::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, groups=2)       # Scene(groups=(Group('red', 'circle', 1), ...), relation='left of')
    scene.caption()                           # 'a red circle to the left of two blue squares'
    bad = break_scene(scene, "colour", rng)   # exactly one element changed
    bg = sample_background(rng)
    seed = int(rng.integers(2**63))
    good_img = render(scene, np.random.default_rng(seed), background=bg)   # 128x128 RGB PIL image
    bad_img = render(bad, np.random.default_rng(seed), background=bg)      # differs in the break only
    describe(good_img) == scene.canonical()   # True: read the scene back from pixels

Shapes are large, axis-aligned and filled with saturated colours on dull,
darkish backgrounds, so that a tiny randomly initialised CLIP can tell a
faithful image from a broken one, and so that ``describe`` can read a scene
back exactly (the oracle the tests use).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well separated in RGB (smallest pairwise distance ~116).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 50, 200),
    "cyan": (20, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
# Relation key -> caption phrase. "A <phrase> B".
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BROKEN_KINDS: tuple[str, ...] = ("colour", "shape", "count", "relation")
MAX_SHAPES = 3  # shapes a caption names, in all

SIZE = 128  # output image side, pixels
_SUPERSAMPLE = 2  # draw at 2x and box-reduce: smooth edges
_MARGIN = 0.05  # canvas border, unit coordinates
_GAP = 0.06  # gap between the two halves of a two-group scene
_CROSS_JITTER = 0.05  # cap on jitter across the relation axis, so the relation stays unambiguous
_STAR_INNER = 0.4  # inner/outer radius of the 5-point star


@dataclass(frozen=True)
class Group:
    """``count`` shapes of one colour and kind."""

    colour: str
    shape: str
    count: int

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Scene:
    """One group, or two groups with ``relation`` read as "groups[0] <relation> groups[1]"."""

    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 groups, got {len(self.groups)}")
        if (len(self.groups) == 2) != (self.relation is not None):
            raise ValueError("a relation is needed exactly when there are two groups")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {list(RELATIONS)}")
        for g in self.groups:
            if g.colour not in COLOURS or g.shape not in SHAPES or g.count not in COUNT_WORDS:
                raise ValueError(f"group out of vocabulary: {g}")

    def caption(self) -> str:
        if self.relation is None:
            return self.groups[0].phrase()
        a, b = self.groups
        return f"{a.phrase()} {RELATIONS[self.relation]} {b.phrase()}"

    def canonical(self) -> "Scene":
        """The same scene with its groups in sorted order ("A left of B" == "B right of A")."""
        if self.relation is None:
            return self
        a, b = self.groups
        if (b.colour, b.shape, b.count) < (a.colour, a.shape, a.count):
            return Scene((b, a), OPPOSITE[self.relation])
        return self


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (for building tiny tokenizers)."""
    words: set[str] = set(COUNT_WORDS.values()) | set(COLOURS)
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    for phrase in RELATIONS.values():
        words |= set(phrase.split())
    return sorted(words)


_NUM = {w: n for n, w in COUNT_WORDS.items()}
_GROUP_RE = r"(a|two|three) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")s?"
_CAPTION_RE = re.compile(
    rf"^{_GROUP_RE}(?: ({'|'.join(RELATIONS.values())}) {_GROUP_RE})?$"
)


def parse_caption(caption: str) -> Scene:
    """Inverse of ``Scene.caption``; raises ``ValueError`` for text outside the shapes world."""
    m = _CAPTION_RE.match(caption.strip())
    if not m:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    a = Group(m.group(2), m.group(3), _NUM[m.group(1)])
    if m.group(4) is None:
        return Scene((a,))
    relation = {v: k for k, v in RELATIONS.items()}[m.group(4)]
    return Scene((a, Group(m.group(6), m.group(7), _NUM[m.group(5)])), relation)


# ---------------------------------------------------------------- sampling
def _choice(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def sample_scene(rng: np.random.Generator, groups: int | None = None) -> Scene:
    """A random scene naming 1 to 3 shapes. ``groups`` forces 1 or 2 groups (default: 40% / 60%).

    Two groups always differ in both colour and shape, so that every one of
    the four breaks is visible.
    """
    if groups is None:
        groups = 1 if rng.random() < 0.4 else 2
    colours, shapes = list(COLOURS), list(SHAPES)
    if groups == 1:
        return Scene((Group(_choice(rng, colours), _choice(rng, shapes), int(rng.integers(1, 4))),))
    ci = rng.choice(len(colours), size=2, replace=False)
    si = rng.choice(len(shapes), size=2, replace=False)
    counts = _choice(rng, [(1, 1), (1, 2), (2, 1)])
    a = Group(colours[ci[0]], shapes[si[0]], counts[0])
    b = Group(colours[ci[1]], shapes[si[1]], counts[1])
    return Scene((a, b), _choice(rng, list(RELATIONS)))


def break_scene(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    """The scene with exactly one element broken.

    colour / shape: one group takes a colour / shape the scene does not use.
    count: one group takes another count in 1..3. relation: the opposite
    relation (groups swap sides). Relation breaks need a two-group scene.
    """
    if kind not in BROKEN_KINDS:
        raise ValueError(f"unknown break {kind!r}; expected one of {BROKEN_KINDS}")
    if kind == "relation":
        if scene.relation is None:
            raise ValueError("a relation break needs a two-group scene")
        return Scene(scene.groups, OPPOSITE[scene.relation])
    gi = int(rng.integers(len(scene.groups)))
    g = scene.groups[gi]
    if kind == "colour":
        used = {x.colour for x in scene.groups}
        g = dataclasses.replace(g, colour=_choice(rng, [c for c in COLOURS if c not in used]))
    elif kind == "shape":
        used = {x.shape for x in scene.groups}
        g = dataclasses.replace(g, shape=_choice(rng, [s for s in SHAPES if s not in used]))
    else:
        g = dataclasses.replace(g, count=_choice(rng, [n for n in COUNT_WORDS if n != g.count]))
    groups = list(scene.groups)
    groups[gi] = g
    return Scene(tuple(groups), scene.relation)


@dataclass(frozen=True)
class Background:
    """A vertical gradient between two dull colours."""

    top: tuple[int, int, int]
    bottom: tuple[int, int, int]


def sample_background(rng: np.random.Generator) -> Background:
    """A dark-to-mid grey with a slight tint and a gentle vertical gradient."""
    level = int(rng.integers(35, 115))
    tint = rng.integers(-10, 11, size=3)
    delta = int(rng.integers(-15, 16))
    top = tuple(int(v) for v in np.clip(level + tint, 0, 255))
    bottom = tuple(int(v) for v in np.clip(level + tint + delta, 0, 255))
    return Background(top, bottom)  # type: ignore[arg-type]


# ---------------------------------------------------------------- drawing
def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, float, float, float]]:
    """Place every shape: (colour, shape, cx, cy, size) in unit coordinates."""
    lo, hi = _MARGIN, 1.0 - _MARGIN
    mid_lo, mid_hi = 0.5 - _GAP / 2, 0.5 + _GAP / 2
    if scene.relation is None:
        regions = [(lo, lo, hi, hi)]
        arrangement = _choice(rng, ["row", "column", "diagonal"])
        arrangements = [arrangement]
        cross_cap = 1.0
    else:
        first, second = {
            "left of": ((lo, lo, mid_lo, hi), (mid_hi, lo, hi, hi)),
            "right of": ((mid_hi, lo, hi, hi), (lo, lo, mid_lo, hi)),
            "above": ((lo, lo, hi, mid_lo), (lo, mid_hi, hi, hi)),
            "below": ((lo, mid_hi, hi, hi), (lo, lo, hi, mid_lo)),
        }[scene.relation]
        regions = [first, second]
        horizontal = scene.relation in ("left of", "right of")
        # Stack shapes across the relation axis, keep the stack aligned.
        arrangements = ["column" if horizontal else "row"] * 2
        cross_cap = _CROSS_JITTER
    placed = []
    # One generator per group slot: a scene with one element broken, drawn from
    # the same rng, keeps every other shape exactly where it was.
    for group, (x0, y0, x1, y1), arrangement, rng in zip(scene.groups, regions, arrangements, rng.spawn(2)):
        n = group.count
        w, h = x1 - x0, y1 - y0
        cw, ch = (w / n, h) if arrangement == "row" else (w, h / n) if arrangement == "column" else (w / n, h / n)
        size = min(cw, ch) * float(rng.uniform(0.62, 0.8))
        size = min(size, 0.45)
        for k in range(n):
            if arrangement == "row":
                cx, cy = x0 + cw * (k + 0.5), y0 + ch / 2
            elif arrangement == "column":
                cx, cy = x0 + cw / 2, y0 + ch * (k + 0.5)
            else:
                cx, cy = x0 + cw * (k + 0.5), y0 + ch * (k + 0.5)
            jx = (cw - size) / 2 * 0.8
            jy = (ch - size) / 2 * 0.8
            if scene.relation in ("left of", "right of"):
                jy = min(jy, cross_cap)
            elif scene.relation in ("above", "below"):
                jx = min(jx, cross_cap)
            cx += float(rng.uniform(-jx, jx))
            cy += float(rng.uniform(-jy, jy))
            placed.append((group.colour, group.shape, cx, cy, size))
    return placed


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    # Centre the star's bounding box on (cx, cy): it spans r*(1+cos36) vertically.
    cy = cy + r * (1 - math.cos(math.pi / 5)) / 2
    for i in range(10):
        rad = r if i % 2 == 0 else r * _STAR_INNER
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill: tuple[int, int, int]) -> None:
    r = s / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        q = r * 0.9  # a square reads bigger than a circle of the same width
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    else:  # pragma: no cover - guarded by Scene
        raise ValueError(shape)


def render(scene: Scene, rng: np.random.Generator, *, background: Background | None = None,
           size: int = SIZE) -> Image.Image:
    """Draw ``scene`` with positions and sizes jittered from ``rng``; returns an RGB image.

    Two scenes that differ in one element, rendered from generators in the same
    state with the same background, differ in that element only (a relation
    break moves the groups to the opposite sides, keeping their jitter).
    """
    if background is None:
        background = sample_background(rng)
    big = size * _SUPERSAMPLE
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    top = np.asarray(background.top, np.float32)
    bottom = np.asarray(background.bottom, np.float32)
    column = np.rint(top + t * (bottom - top)).astype(np.uint8)  # (big, 1, 3)
    img = Image.fromarray(column, "RGB").resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for colour, shape, cx, cy, s in _layout(scene, rng):
        _draw(draw, shape, cx * big, cy * big, s * big, COLOURS[colour])
    return img.reduce(_SUPERSAMPLE)


# ---------------------------------------------------------------- reading back
@dataclass(frozen=True)
class Detected:
    """One connected blob of a palette colour: its colour, shape guess, centre (unit coords), area (px)."""

    colour: str
    shape: str
    x: float
    y: float
    area: int


_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components by min-label propagation (numpy only; fine for 128x128)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        prev = labels
        m = labels.copy()
        m[1:, :] = np.minimum(m[1:, :], labels[:-1, :])
        m[:-1, :] = np.minimum(m[:-1, :], labels[1:, :])
        m[:, 1:] = np.minimum(m[:, 1:], labels[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], labels[:, 1:])
        labels = np.where(mask, m, big)
        if np.array_equal(labels, prev):
            break
    uniq, inv = np.unique(labels[mask], return_inverse=True)
    out = np.full((h, w), -1, np.int64)
    out[mask] = inv
    return out, len(uniq)


def _shape_of(fill: float) -> str:
    # area / bounding-box area: square ~0.95, circle ~0.79, triangle ~0.5, star ~0.35
    if fill > 0.865:
        return "square"
    if fill > 0.65:
        return "circle"
    if fill > 0.455:
        return "triangle"
    return "star"


def detect(image: Image.Image, *, max_dist: float = 70.0, min_area: int = 30) -> list[Detected]:
    """Find the coloured shapes in an image drawn by ``render`` (after JPEG too)."""
    arr = np.asarray(image.convert("RGB"), np.float32)
    h, w, _ = arr.shape
    d = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = d.argmin(-1)
    close = d.min(-1) < max_dist
    found = []
    for ci, name in enumerate(_NAMES):
        mask = close & (nearest == ci)
        if mask.sum() < min_area:
            continue
        labels, n = _components(mask)
        for k in range(n):
            ys, xs = np.nonzero(labels == k)
            if len(xs) < min_area:
                continue
            bbox = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
            found.append(Detected(name, _shape_of(len(xs) / bbox), (xs.mean() + 0.5) / w,
                                  (ys.mean() + 0.5) / h, int(len(xs))))
    return found


def describe(image: Image.Image) -> Scene | None:
    """Read the scene back from an image, in canonical form; None if it is not 1 or 2 groups."""
    found = detect(image)
    groups: dict[tuple[str, str], list[Detected]] = {}
    for d in found:
        groups.setdefault((d.colour, d.shape), []).append(d)
    if not 1 <= len(groups) <= 2 or any(len(v) > 3 for v in groups.values()):
        return None
    keys = sorted(groups)
    gs = tuple(Group(c, s, len(groups[(c, s)])) for c, s in keys)
    if len(gs) == 1:
        return Scene(gs)
    (ax, ay), (bx, by) = [
        (float(np.mean([d.x for d in groups[k]])), float(np.mean([d.y for d in groups[k]]))) for k in keys
    ]
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        relation = "left of" if dx > 0 else "right of"
    else:
        relation = "above" if dy > 0 else "below"
    return Scene(gs, relation).canonical()
