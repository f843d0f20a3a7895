"""Shapes-world edits: a scene, an instruction, and the scene the instruction makes.

The fine-tuning data teaches the MLLM to name what must change in an image to
match a caption. In the shapes world that is exact: ``edit_scene`` changes one
thing and says how, in InstructPix2Pix's imperative style::

    rng = np.random.default_rng(0)
    scene = sw.sample_scene(rng)                      # a red circle to the left of a blue square
    edited, instruction = edit_scene(scene, "colour", rng)
    instruction                                       # 'make the circle green'
    edited.caption()                                  # 'a green circle to the left of a blue square'

Kinds: ``colour`` ("make the circles red"), ``shape`` ("turn the red circle into
a star"), ``count`` ("add two red circles", "remove a red circle"), ``add`` (a
new group: "add a blue square"), ``remove`` ("remove the blue squares") and
``relation`` ("move the red circle to the right of the blue square").
"""
from __future__ import annotations

import dataclasses

import numpy as np

from img.data import shapes_world as sw

EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "count", "add", "remove", "relation")
INSTRUCTION_WORDS: tuple[str, ...] = ("make", "turn", "into", "add", "remove", "move", "the")
"""Words of the instructions beyond the caption vocabulary (the tiny tokenizers have one token each)."""


def applicable(scene: sw.Scene) -> list[str]:
    """The edit kinds that can change ``scene`` while keeping it a valid shapes-world scene."""
    kinds = ["colour", "shape", "count"]  # every scene has at most MAX_SHAPES shapes, so some count can change
    if len(scene.groups) == 1 and scene.groups[0].count < sw.MAX_SHAPES:
        kinds.append("add")
    if len(scene.groups) == 2:
        kinds += ["remove", "relation"]
    return [k for k in EDIT_KINDS if k in kinds]


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _the(g: sw.Group, colour: bool = True) -> str:
    """'the red circles' / 'the circle' (in a scene, shapes and colours of the two groups differ)."""
    return f"the {g.colour + ' ' if colour else ''}{_noun(g.shape, g.count)}"


def edit_scene(scene: sw.Scene, kind: str, rng: np.random.Generator) -> tuple[sw.Scene, str]:
    """(edited scene, instruction) for one edit of ``kind``; ``ValueError`` if it does not apply."""
    if kind not in applicable(scene):
        raise ValueError(f"edit {kind!r} does not apply to {scene.caption()!r}; applicable: {applicable(scene)}")
    groups = list(scene.groups)
    gi = int(rng.integers(len(groups)))
    g = groups[gi]
    if kind == "colour":
        used = {x.colour for x in groups}
        new = str(rng.choice([c for c in sw.COLOURS if c not in used]))
        groups[gi] = dataclasses.replace(g, colour=new)
        return sw.Scene(tuple(groups), scene.relation), f"make {_the(g, colour=False)} {new}"
    if kind == "shape":
        used = {x.shape for x in groups}
        new = str(rng.choice([s for s in sw.SHAPES if s not in used]))
        groups[gi] = dataclasses.replace(g, shape=new)
        target = f"a {new}" if g.count == 1 else _noun(new, g.count)
        return sw.Scene(tuple(groups), scene.relation), f"turn {_the(g)} into {target}"
    if kind == "count":
        others = sum(x.count for i, x in enumerate(groups) if i != gi)
        choices = [n for n in sw.COUNT_WORDS if n != g.count and n + others <= sw.MAX_SHAPES]
        if not choices:  # (1, 2): only the group of two can change
            gi, g = 1 - gi, groups[1 - gi]
            others = sum(x.count for i, x in enumerate(groups) if i != gi)
            choices = [n for n in sw.COUNT_WORDS if n != g.count and n + others <= sw.MAX_SHAPES]
        n = int(rng.choice(choices))
        groups[gi] = dataclasses.replace(g, count=n)
        k = abs(n - g.count)
        verb = "add" if n > g.count else "remove"
        return (sw.Scene(tuple(groups), scene.relation),
                f"{verb} {sw.COUNT_WORDS[k]} {g.colour} {_noun(g.shape, k)}")
    if kind == "add":
        colour = str(rng.choice([c for c in sw.COLOURS if c != g.colour]))
        shape = str(rng.choice([s for s in sw.SHAPES if s != g.shape]))
        count = int(rng.integers(1, sw.MAX_SHAPES - g.count + 1)) if g.count == 1 else 1
        new = sw.Group(colour, shape, count)
        relation = str(rng.choice(list(sw.RELATIONS)))
        return sw.Scene((g, new), relation), f"add {new.phrase()}"
    if kind == "remove":
        return sw.Scene((groups[1 - gi],)), f"remove {_the(g)}"
    # relation: the groups swap sides
    a, b = groups
    flipped = sw.OPPOSITE[scene.relation]
    return sw.Scene((a, b), flipped), f"move {_the(a)} {sw.RELATIONS[flipped]} {_the(b)}"
