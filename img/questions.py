"""The misalignment question asked to the MLLM, one paraphrase per pair.

The paper picks one of about 100 questions like "How can the image be changed
to match the prompt: {prompt}?" at random per sample. Ours are built from 26
openings x 4 endings (104 distinct templates). The pick is deterministic: a
SHA-256 of ``key`` and ``seed`` (never Python's salted ``hash()``), so the embed
job and a re-run give the same question for the same pair::

    from img.questions import question_for, QUESTIONS
    question_for("a red circle left of a blue star", key="pair-000123", seed=0)
    # -> 'What edits would make this picture fit this caption: a red circle left of a blue star?'
"""
from __future__ import annotations

import hashlib
import logging

log = logging.getLogger(__name__)

# Each opening is followed directly by an ending below; all are questions about the image.
_OPENINGS: tuple[str, ...] = (
    "How should this image change to match",
    "How can this image be changed to match",
    "How could this image be edited to match",
    "What should change in this image so that it matches",
    "What edits would make this image match",
    "What edits would make this picture fit",
    "How should this picture be changed to fit",
    "What would need to change in this image for it to match",
    "How can the image be adjusted to agree with",
    "What is missing or wrong in this image compared with",
    "How could this picture be fixed to match",
    "Which changes would bring this image in line with",
    "How would you edit this image so it matches",
    "What should be added, removed or moved in this image to match",
    "How can this picture be made to match",
    "What differs between this image and",
    "How should the image be corrected to follow",
    "What must change for this image to depict",
    "How can the picture be modified so that it shows",
    "What would you change in this picture to match",
    "How does this image need to change to match",
    "In what ways should this image change to match",
    "How could the image be revised to fit",
    "What adjustments would make this image agree with",
    "How should this image be altered to follow",
    "Which edits would make the picture match",
)

_ENDINGS: tuple[str, ...] = (
    ": {caption}?",
    " the prompt: {caption}?",
    " this caption: {caption}?",
    " the description: {caption}?",
)

QUESTIONS: tuple[str, ...] = tuple(o + e for o in _OPENINGS for e in _ENDINGS)
"""All question templates; each contains ``{caption}`` once."""


def question_index(key: str, seed: int) -> int:
    """Index into ``QUESTIONS`` for ``key`` (e.g. a pair id) and ``seed``; stable across processes."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % len(QUESTIONS)


def question_for(caption: str, key: str, seed: int = 0) -> str:
    """The question about ``caption`` for the pair ``key``; the same inputs always give the same text."""
    return QUESTIONS[question_index(key, seed)].format(caption=caption.strip())
