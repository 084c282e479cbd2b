"""The one lenient parser of a judge's short text answer, shared by the LLM judge's ``generate``
mode and the HTTP endpoint judge.

The label strings are the digits ``"0"`` (the first response shown is better) and ``"1"`` (the
second is better). An answer is accepted when, after dropping ``<think>...</think>`` blocks,
quotes, markdown and punctuation, it is short and holds exactly one number, that number is ``0``
or ``1``, and every other word is filler such as "answer", "output", "is", "the", "model",
"response", "better" ("Answer: 1", "Output 0", "The answer is 1.", "**0**", "Response 1 is
better"). Anything else is invalid and returns None: no digit, two digits ("0 or 1", "1 then 0"),
another number ("2", "10", "1.5", "1st", "-1"), letters ("A", "B", "yes"), a negation ("not 1") or a
long text. Invalid answers are never turned into labels.
"""

from __future__ import annotations

import re
from typing import Optional

#: the label strings a judge is asked to answer with: index = winner
LABELS = ("0", "1")

#: the most characters (after stripping) an answer may have to be read at all
MAX_ANSWER_CHARS = 60

#: words that may surround the single digit of an accepted answer
FILLER = frozenset(
    """answer answers output final my the is it i d pick picks choose chooses chose select
    selected choice winner best better model identifier id response responses option number
    label verdict result prefer preferred one says would""".split()
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SIGNED = re.compile(r"[-+\u2212]\s*\d")  # "-1", "+1": a signed number is not a label
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits (any script); everything else separates


#: the most characters of an answer a run's line quotes
QUOTED_CHARS = 40


def quote(text, limit: int = QUOTED_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (then "..."), in double quotes."""
    s = " ".join(str(text).split())
    return '"' + (s[:limit].rstrip() + "..." if len(s) > limit else s) + '"'


def unparsed(text) -> str:
    """The reason of an answer :func:`parse_answer` did not accept: ``unparsed answer "I think..."``."""
    return "unparsed answer " + quote(text)


def parse_answer(text) -> Optional[int]:
    """0 or 1 for an accepted short answer (see the module docstring), None for anything else."""
    if not isinstance(text, str):
        return None
    text = _THINK.sub(" ", text).strip()
    if not text or len(text) > MAX_ANSWER_CHARS:
        return None
    if _SIGNED.search(text):
        return None
    words = _WORD.findall(text.lower())
    numbers = [w for w in words if any(c.isdigit() for c in w)]
    if len(numbers) != 1 or numbers[0] not in LABELS:
        return None
    if any(w not in FILLER for w in words if w != numbers[0]):
        return None
    return LABELS.index(numbers[0])
