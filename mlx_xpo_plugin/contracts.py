"""What a plugin author needs, in one leaf module (re-exported by the package): the hook markers,
:class:`TrainMode`, and the pairwise-judge contract (:class:`Verdict`, :class:`PairwiseJudge` and
the :class:`Judge` base with its optional parts, :class:`JudgeFactory`, :class:`JudgeContext`).

A judge sees prompts and completion pairs as text and returns one Verdict per pair:
``winner`` 0 (first completion better), 1 (second better) or None. None is either a tie
(``tie=True``) or an invalid answer; the trainer drops both and counts them. No invalid
answer ever becomes a label.

This module imports nothing of this package: everything else may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import pluggy

#: pluggy's project name, shared with a patched mlx-lm-lora, and the entry-point group
PROJECT = "mlx_lm_lora"
ENTRY_POINT_GROUP = "mlx_lm_lora"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: upstream mlx-lm-lora 5.10.2's own --train-mode choices
BUILTIN_TRAIN_MODES = (
    "sft",
    "dpo",
    "dsla",
    "ftpo",
    "cpo",
    "orpo",
    "grpo",
    "klpo",
    "online_dpo",
    "xpo",
    "rlhf_reinforce",
    "ppo",
)


@dataclass
class TrainMode:
    """A train mode a plugin offers to ``mlx_lm_lora.train`` (the hook contract: docs/upstream.md).

    ``add_arguments(group)`` adds only the mode's own new options to ``group``, the argument group
    the host made for the plugin's distribution; modes sharing one callable get it called once. An
    option upstream already defines is never added again: the mode reads it from ``args`` as
    upstream parsed it. ``main(args, given)`` owns the whole run of the mode: ``args`` is upstream's
    namespace after its YAML/default merge, ``given`` the set of setting names the user gave (typed
    on the command line, keys of the dict passed to ``main``, or keys of the YAML config; never
    parser defaults); it validates before loading anything and returns an exit status.
    """

    name: str
    description: str
    main: Callable[[Any, set], int]
    add_arguments: Optional[Callable[[Any], None]] = None  # add the mode's own options to a group

    @property
    def replaces_builtin(self) -> bool:
        return self.name in BUILTIN_TRAIN_MODES


@dataclass(frozen=True)
class Verdict:
    winner: Optional[int]  # 0, 1, or None (tie or invalid)
    confidence: Optional[float] = None  # in [0, 1], where the judge knows one
    raw: Any = None  # the judge's raw answer, for debugging
    tie: bool = False  # True: a genuine tie; False with winner None: an invalid answer
    scores: Optional[tuple[float, float]] = None  # pointwise scores, for reward-function judges
    # why an invalid answer is invalid, in a few words with the answer quoted (the run's lines show
    # it: 'unparsed answer "I think..."'); None on a valid verdict and on a pair the judge failed on
    # (an error, counted in last_metrics as judge/errors/<kind>)
    reason: Optional[str] = None

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
    def bad(cls, raw=None, reason: Optional[str] = None) -> "Verdict":
        return cls(None, None, raw, False, reason=reason)


@runtime_checkable
class PairwiseJudge(Protocol):
    """``judge(prompts, pairs)``: ``pairs[i] = (completion_a, completion_b)`` for ``prompts[i]``;
    one Verdict per pair. That is all a judge must have; :class:`Judge` gives the loop the rest."""

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]: ...


class Judge:
    """A pairwise judge as the loop sees it: the required ``judge`` and the optional parts, each
    with a default. Built-in judges subclass it; :func:`as_judge` wraps any other object that has
    ``judge`` (a plugin's), taking whichever optional parts it defines.

    - ``last_metrics``: extra ``judge/...`` numbers of the last call (default: none);
    - ``get_state()`` / ``set_state(state)``: internal randomness a resumed run must restore
      (JSON), or ``stateless = True`` for a judge without any; a judge that declares neither
      is resumed with a warning that the run may not repeat exactly (:meth:`declares_state`);
    - ``close()``: release resources at the end of a run (default: nothing to release);
    - ``concurrent = True``: ``judge`` computes nothing with MLX in this process (it waits for a
      server or a person, or runs plain Python), and touches no state of the training loop but
      its own, ``random`` and ``numpy.random``. The loop may then call it in another thread
      while its reference pass computes; results stay bit-equal (default False: the loop waits).
    """

    last_metrics: dict = {}
    stateless: bool = False
    concurrent: bool = False

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        raise NotImplementedError

    def get_state(self) -> Any:
        return None

    def set_state(self, state: Any) -> None:
        pass

    def declares_state(self) -> bool:
        """No randomness of its own, or its state in get_state/set_state."""
        return bool(self.stateless) or type(self).get_state is not Judge.get_state

    def close(self) -> None:
        pass


class _Adapted(Judge):
    """Any object with ``judge``, seen as a :class:`Judge`."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def name(self) -> str:
        return getattr(self.inner, "name", None) or type(self.inner).__name__

    def judge(self, prompts, pairs):
        return self.inner.judge(prompts, pairs)

    @property
    def last_metrics(self) -> dict:
        return dict(getattr(self.inner, "last_metrics", None) or {})

    def get_state(self):
        return self.inner.get_state() if hasattr(self.inner, "get_state") else None

    def set_state(self, state) -> None:
        if hasattr(self.inner, "set_state"):
            self.inner.set_state(state)

    @property
    def stateless(self) -> bool:
        return bool(getattr(self.inner, "stateless", False))

    @property
    def concurrent(self) -> bool:
        return bool(getattr(self.inner, "concurrent", False))

    def declares_state(self) -> bool:
        return self.stateless or (hasattr(self.inner, "get_state") and hasattr(self.inner, "set_state"))

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


def as_judge(obj) -> Judge:
    """``obj`` itself when it is a :class:`Judge`, else ``obj`` wrapped as one. None gives a judge
    that cannot judge, for a loop whose pairs come from elsewhere."""
    if obj is None:
        return Judge()
    return obj if isinstance(obj, Judge) else _Adapted(obj)


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
    uses_judge_system: bool = True  # False: the judge_system setting means nothing to this kind
