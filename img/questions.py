"""The misalignment question asked to the MLLM, one paraphrase per pair.

The paper picks one of about 100 questions like "How can the image be changed
to match the prompt: {prompt}?" at random per sample. Ours are built from 26
openings x 4 endings (104 distinct templates). The pick is deterministic: a
SHA-256 of ``key`` and ``seed`` (never Python's salted ``hash()``), so the embed
job and a re-run give the same question for the same pair::

    from img.questions import question_for, QUESTIONS
    question_for("a red circle left of a blue star", key="pair-000123", seed=0)
    # -> 'In what ways should this image change to match: a red circle left of a blue star?'

Another pool, such as the authors' list of 100 questions (a JSON list of
strings, each with a ``{prompt}`` placeholder), is read with ``load_questions``
and passed as ``questions``::

    pool = load_questions("questions.json")
    question_for("a red circle", key="pair-1", questions=pool)
    questions_id(pool)            # "sha256:<16 hex>" of the pool, for fingerprints
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional, Sequence

from img.errors import UserError

PLACEHOLDERS: tuple[str, ...] = ("{caption}", "{prompt}")
"""Where the caption goes in a template: ``{caption}`` (our pool) or ``{prompt}`` (the authors' file)."""
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))


class QuestionFileError(UserError):
    """A questions file that is missing, not a JSON list of strings, or has an entry without ``{prompt}``."""

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


def question_index(key: str, seed: int, n: int = len(QUESTIONS)) -> int:
    """Index into a pool of ``n`` templates (default: ``QUESTIONS``) for ``key`` and ``seed``; the same in every
    process."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def fill(template: str, caption: str) -> str:
    """``template`` with ``caption`` in place of ``{caption}`` / ``{prompt}`` (plain replacement, as the authors do:
    other braces in a template or caption stay as they are)."""
    return _PLACEHOLDER_RE.sub(lambda _: caption, template)


def question_for(caption: str, key: str, seed: int = 0, questions: Optional[Sequence[str]] = None) -> str:
    """The question about ``caption`` for the pair ``key``; the same inputs always give the same text.

    ``questions``: the template pool (default ``QUESTIONS``; e.g. ``load_questions(path)``).
    """
    pool = QUESTIONS if questions is None else questions
    return fill(pool[question_index(key, seed, len(pool))], caption.strip())


def load_questions(path: str | Path) -> tuple[str, ...]:
    """The question templates of a JSON file holding a list of strings, each with a ``{prompt}`` placeholder
    (the format of the authors' 100-question list). ``QuestionFileError`` (a ``ValueError``) names the problem."""
    p = Path(path).expanduser()
    fix = 'Pass a JSON file holding a list of question strings, each with "{prompt}" where the caption goes.'
    if not p.is_file():
        raise QuestionFileError(f"questions file {str(p)!r} does not exist. {fix}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuestionFileError(f"questions file {str(p)!r} is not readable JSON ({e}). {fix}") from None
    if not isinstance(data, list) or not data:
        what = "an empty list" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        raise QuestionFileError(f"questions file {str(p)!r} holds {what}, not a list of strings. {fix}")
    for i, q in enumerate(data):
        if not isinstance(q, str):
            raise QuestionFileError(f"questions file {str(p)!r}: entry {i} is {json.dumps(q)[:60]}, not a string. "
                                    f"{fix}")
        if "{prompt}" not in q:
            raise QuestionFileError(f"questions file {str(p)!r}: entry {i} {q[:80]!r} has no {{prompt}} placeholder. "
                                    f"{fix}")
    return tuple(data)


def resolve_questions(path: Optional[str | Path]) -> Optional[tuple[str, ...]]:
    """``load_questions(path)``, or None (our pool) when ``path`` is None or empty."""
    return load_questions(path) if path else None


def questions_id(questions: Optional[Sequence[str]] = None) -> str:
    """``sha256:<16 hex>`` of a template pool's content (default: our pool), for fingerprints and provenance."""
    pool = QUESTIONS if questions is None else questions
    return "sha256:" + hashlib.sha256(json.dumps(list(pool)).encode()).hexdigest()[:16]
