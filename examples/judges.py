"""Example Python judges. Use one as ``judge: examples/judges.py:keyword_judge``.

A pairwise judge returns 0 (the first completion is better), 1 (the second is better), None (a
tie) or a float p in [0, 1], the probability that the SECOND completion is better. A pointwise
reward function (``reward.pointwise = True``) returns a score per completion; the higher wins.
Anything else a judge returns, or raises, becomes an invalid verdict and is dropped, never a label.
"""

from __future__ import annotations

import os

#: the keyword ``keyword_judge`` counts; change it with the environment variable JUDGE_KEYWORD
KEYWORD = os.environ.get("JUDGE_KEYWORD", "happy")


def length_judge(prompt: str, completion_a: str, completion_b: str):
    """Prefers the LONGER completion (by characters, surrounding whitespace ignored); equal
    lengths tie. A toy preference that makes a policy's answers grow."""
    la, lb = len(completion_a.strip()), len(completion_b.strip())
    if la == lb:
        return None
    return 0 if la > lb else 1


def keyword_judge(prompt: str, completion_a: str, completion_b: str):
    """Prefers the completion with more case-insensitive occurrences of :data:`KEYWORD`; equal
    counts tie."""
    k = KEYWORD.lower()
    ca, cb = completion_a.lower().count(k), completion_b.lower().count(k)
    if ca == cb:
        return None
    return 0 if ca > cb else 1


def reward(prompt: str, completion: str) -> float:
    """A pointwise reward: +1 per exclamation mark (at most 3), +0.5 per occurrence of
    :data:`KEYWORD`, minus 0.01 per character beyond 200."""
    score = min(completion.count("!"), 3) + 0.5 * completion.lower().count(KEYWORD.lower())
    return float(score - 0.01 * max(0, len(completion) - 200))


reward.pointwise = True
