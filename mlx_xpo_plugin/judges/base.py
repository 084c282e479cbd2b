"""The pairwise-judge protocol, its Verdict, and how a ``judge`` setting becomes a judge.

A judge sees prompts and completion pairs as text and returns one Verdict per pair:
``winner`` 0 (first completion better), 1 (second better) or None. None is either a tie
(``tie=True``) or an invalid answer; the trainer drops both and counts them. No invalid
answer ever becomes a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Verdict:
    winner: Optional[int]  # 0, 1, or None (tie or invalid)
    confidence: Optional[float] = None  # in [0, 1], where the judge knows one
    raw: Any = None  # the judge's raw answer, for debugging
    tie: bool = False  # True: a genuine tie; False with winner None: an invalid answer
    scores: Optional[tuple[float, float]] = None  # pointwise scores, for reward-function judges

    def __post_init__(self):
        if self.winner not in (0, 1, None):
            raise ValueError(f"Verdict.winner must be 0, 1 or None, got {self.winner!r}")
        if self.tie and self.winner is not None:
            raise ValueError("a tie has no winner")
        if self.confidence is not None and not (0.0 <= self.confidence <= 1.0):
            raise ValueError(f"Verdict.confidence must be in [0, 1], got {self.confidence!r}")

    @property
    def invalid(self) -> bool:
        return self.winner is None and not self.tie

    @classmethod
    def tied(cls, raw=None, scores=None) -> "Verdict":
        return cls(None, None, raw, True, scores)

    @classmethod
    def bad(cls, raw=None) -> "Verdict":
        return cls(None, None, raw, False)


@runtime_checkable
class PairwiseJudge(Protocol):
    """``judge(prompts, pairs)``: ``pairs[i] = (completion_a, completion_b)`` for ``prompts[i]``.

    A judge may set ``last_metrics`` (a dict of extra ``judge/...`` numbers for the last call,
    e.g. ``judge/position_consistency``) and may define ``close()``.
    """

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]: ...


@dataclass
class JudgeContext:
    """What a judge factory may use when it builds a judge."""

    judge_system: Optional[str] = None
    judge_config: dict = field(default_factory=dict)
    reference_model: Any = None  # frozen reference (shared when the judge names the same path)
    reference_tokenizer: Any = None
    reference_model_path: Optional[str] = None
    seed: int = 0
    compute_dtype: str = "auto"  # the precision policy of a judge that loads its own model


@dataclass(frozen=True)
class JudgeFactory:
    """One kind of judge. ``matches(spec)`` says whether a ``judge`` setting is of this kind;
    ``check(spec, ctx)`` validates cheaply before any model is loaded (raise ConfigError);
    ``build(spec, ctx)`` makes the judge. Higher ``priority`` is tried first."""

    name: str
    matches: Callable[[str], bool]
    build: Callable[[str, JudgeContext], PairwiseJudge]
    check: Optional[Callable[[str, JudgeContext], None]] = None
    priority: int = 0


def verdict_metrics(verdicts: Sequence[Verdict], seconds: float) -> dict:
    """Counts every judge reports: ``judge/pairs``, ``judge/invalid``, ``judge/ties``, ``judge/seconds``
    and, when pointwise scores are present, ``objective/scores_margin`` (mean |score_a - score_b|
    over the ``judge/scored_pairs`` pairs that have scores)."""
    m = {
        "judge/pairs": len(verdicts),
        "judge/invalid": sum(v.invalid for v in verdicts),
        "judge/ties": sum(v.tie for v in verdicts),
        "judge/seconds": seconds,
    }
    scored = [v.scores for v in verdicts if v.scores is not None]
    if scored:
        m["objective/scores_margin"] = sum(abs(a - b) for a, b in scored) / len(scored)
        m["judge/scored_pairs"] = len(scored)
    return m
