"""Python-function judge: ``judge: module:callable`` or ``judge: path/to/file.py:callable``.

The callable takes one of three forms.

* Pairwise (default): ``fn(prompt, completion_a, completion_b)`` returns

  - ``0`` (a is better) or ``1`` (b is better), ints or numpy ints;
  - ``None``: no preference, a tie;
  - a float ``p`` in [0, 1], the probability that the SECOND completion (b) is better:
    ``p > 0.5`` -> winner 1 with confidence ``p``, ``p < 0.5`` -> winner 0 with confidence
    ``1 - p``, ``p == 0.5`` -> tie.

  Anything else is an invalid verdict, never a label: ``2``, ``-1``, ``"1"``, ``True`` /
  ``False`` (ambiguous: does True mean "a wins"?), NaN, a float outside [0, 1], or an exception
  the function raised (caught per pair, counted as ``judge/errors/<ExceptionClass>`` and shown
  on the step's line; see loop/faults.py for when errors stop a run). ``Verdict.raw`` keeps the
  returned value (or the exception text) for debugging.

* Batched (``judge_config: {batched: true}`` or the attribute ``fn.batched = True``):
  ``fn(prompts, pairs) -> list`` with one answer per pair, read as above. A call that raises or
  returns a list of the wrong length makes every verdict of that call invalid (an exception
  counts as an error for each pair of the call).

* Pointwise (``judge_config: {pointwise: true}`` or ``fn.pointwise = True``): a reward function
  ``fn(prompt, completion) -> float``. The higher score wins, equal scores tie, and
  ``Verdict.scores = (score_a, score_b)``; the confidence is the Bradley-Terry probability
  ``sigmoid(|score_a - score_b|)``. A score that is not a finite real number (or an exception)
  makes the verdict invalid. Pointwise and batched together: ``fn(prompts, completions) ->
  list[float]``, called once with every prompt twice (all a's, then all b's).

A function that computes nothing with MLX (and touches no state of the training loop but
``random`` and ``numpy.random``), such as one that calls a remote service, may declare
``fn.concurrent = True``: the loop then calls it in another thread while the reference pass
computes (contracts.Judge). One that uses MLX itself must not: MLX would compute in two threads.

A file is loaded with ``importlib.util.spec_from_file_location``; while it runs, its folder is on
``sys.path`` so that it may import its neighbours. A function judge is plain code, so pairs are
shown in their given order (no shuffling). Checkpoints keep the global ``random`` and
``numpy.random`` states, so a function drawing from them resumes exactly; a callable with random
state of its own declares it with ``get_state()`` / ``set_state(state)`` attributes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mlx_xpo_plugin.config import Setting
from mlx_xpo_plugin.contracts import Judge, JudgeContext, Verdict
from mlx_xpo_plugin.errors import ConfigError, did_you_mean
from mlx_xpo_plugin.judges.common import options, resolve_options
from mlx_xpo_plugin.judges.parse import quote

OPTIONS = options(
    Setting("batched", "bool", None, "call the function once with every pair (default: detected)"),
    Setting("pointwise", "bool", None, "the function scores one completion (default: detected)"),
)

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def split_spec(spec: str) -> Optional[tuple[str, str]]:
    """(module or file, attribute) for a ``module:callable`` / ``file.py:callable`` spec, else None."""
    if not isinstance(spec, str) or "://" in spec or ":" not in spec:
        return None
    left, right = spec.rsplit(":", 1)
    left, right = left.strip(), right.strip()
    if not left or not _DOTTED.match(right):
        return None
    if left.endswith(".py") or _DOTTED.match(left):
        return left, right
    return None


def matches(spec: str) -> bool:
    return split_spec(spec) is not None


_FILE_MODULES: dict = {}


def _load_file(path: Path, spec: str):
    key = (str(path), path.stat().st_mtime_ns)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    name = "_mlx_xpo_judge_" + re.sub(r"\W", "_", path.stem) + "_" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    mspec = importlib.util.spec_from_file_location(name, str(path))
    if mspec is None or mspec.loader is None:
        raise ConfigError("judge", spec, f"cannot load {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ConfigError("judge", spec, f"running {str(path)!r} failed", f"{type(e).__name__}: {e}") from e
    finally:
        if added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass
    _FILE_MODULES[key] = module
    return module


def _import_with_cwd(name: str):
    """``importlib.import_module(name)``, with the working directory importable (last on the path,
    for the import only) as it is for ``python -c`` but not for a console script."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass


def load_callable(spec: str) -> Callable:
    """Import the callable a spec names; ConfigError with a one-line reason when it can't."""
    parts = split_spec(spec)
    if parts is None:
        raise ConfigError("judge", spec, "use 'module:callable' or 'path/to/file.py:callable'")
    where, attr = parts
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError("judge", spec, f"the file {where!r} does not exist", f"working directory: {os.getcwd()}")
        module = _load_file(path.resolve(), spec)
    else:
        try:
            module = _import_with_cwd(where)
        except Exception as e:
            as_file = where.replace(".", "/") + ".py"
            raise ConfigError(
                "judge",
                spec,
                f"cannot import the module {where!r}",
                f"{type(e).__name__}: {e}; for a file, write 'path/to/{as_file}:{attr}'",
            ) from e
    obj: Any = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError("judge", spec, f"{where!r} has no attribute {name!r}", did_you_mean(name, names))
        obj = getattr(obj, name)
    if not callable(obj):
        raise ConfigError("judge", spec, f"{attr!r} is not callable (it is a {type(obj).__name__})")
    return obj


# ---------------------------------------------------------------------------------------------
# reading the user's answers


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def not_an_answer(ans) -> Verdict:
    """The invalid verdict of an answer outside the contract, with the answer quoted in its reason."""
    shown = quote(ans) if isinstance(ans, str) else quote(repr(ans))[1:-1]
    return Verdict.bad(ans, f"answer {shown} (not 0, 1, None or a probability in [0, 1])")


def answer_to_verdict(ans) -> Verdict:
    """Read one pairwise answer (see the module docstring); never raises."""
    if ans is None:
        return Verdict.tied(raw=None)
    if isinstance(ans, bool):
        return not_an_answer(ans)
    if isinstance(ans, numbers.Integral):
        return Verdict(int(ans), None, ans) if int(ans) in (0, 1) else not_an_answer(ans)
    if _is_real(ans):
        p = float(ans)
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            return not_an_answer(ans)
        if p > 0.5:
            return Verdict(1, p, ans)
        if p < 0.5:
            return Verdict(0, 1.0 - p, ans)
        return Verdict.tied(raw=ans)
    return not_an_answer(ans)


def scores_to_verdict(sa, sb) -> Verdict:
    """Two pointwise scores -> verdict: higher wins, equal ties; non-finite / non-real -> invalid."""
    why = f"scores {quote(repr(sa))[1:-1]} and {quote(repr(sb))[1:-1]} (not two finite numbers)"
    if not (_is_real(sa) and _is_real(sb)):
        return Verdict.bad((sa, sb), why)
    fa, fb = float(sa), float(sb)
    if not (math.isfinite(fa) and math.isfinite(fb)):
        return Verdict.bad((sa, sb), why)
    if fa == fb:
        return Verdict.tied(raw=(sa, sb), scores=(fa, fb))
    conf = 1.0 / (1.0 + math.exp(-min(abs(fa - fb), 700.0)))
    return Verdict(0 if fa > fb else 1, conf, (sa, sb), False, (fa, fb))


def _text(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


class FunctionJudge(Judge):
    """A PairwiseJudge around a user's Python callable (see the module docstring)."""

    def __init__(self, fn: Callable, batched: bool = False, pointwise: bool = False, name: str = ""):
        self.fn, self.batched, self.pointwise = fn, bool(batched), bool(pointwise)
        self.concurrent = bool(getattr(fn, "concurrent", False))  # declared by the function (docstring)
        self.name = name or getattr(fn, "__name__", repr(fn))
        self.last_metrics: dict = {}
        self.last_error: Optional[str] = None  # "Class: message" of the last exception of a call

    # resume (see faults.py): the wrapper keeps no state; the global random / numpy.random draws of
    # the callable are in every checkpoint; a callable with its own state gives get_state/set_state
    @property
    def stateless(self) -> bool:
        return not (hasattr(self.fn, "get_state") and hasattr(self.fn, "set_state"))

    def get_state(self):
        return None if self.stateless else self.fn.get_state()

    def set_state(self, state) -> None:
        if not self.stateless:
            self.fn.set_state(state)

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        if len(prompts) != len(pairs):
            raise ValueError(f"{len(prompts)} prompts but {len(pairs)} pairs")
        self._errors: dict = {}
        self.last_error = None
        if self.pointwise:
            out = (
                self._pointwise_batched(prompts, pairs)
                if self.batched
                else [self._pointwise_one(p, a, b) for p, (a, b) in zip(prompts, pairs)]
            )
        elif self.batched:
            out = self._pairwise_batched(prompts, pairs)
        else:
            out = [self._pairwise_one(p, a, b) for p, (a, b) in zip(prompts, pairs)]
        self.last_metrics = {f"judge/errors/{k}": n for k, n in sorted(self._errors.items())}
        return out

    def _failed(self, e: Exception, pairs: int = 1) -> str:
        """Count an exception against ``pairs`` pairs; the raw text of their verdicts."""
        name = type(e).__name__
        self._errors[name] = self._errors.get(name, 0) + pairs
        self.last_error = _text(e)
        return "error: " + self.last_error

    def _pairwise_one(self, prompt, a, b) -> Verdict:
        try:
            ans = self.fn(prompt, a, b)
        except Exception as e:
            return Verdict.bad(raw=self._failed(e))
        return answer_to_verdict(ans)

    def _call_batched(self, *args, n: int, pairs: int) -> Optional[list]:
        """The batched call's list of ``n`` answers, or None (and raw text in ``self._why``, the
        reason in ``self._reason``: None for an exception, an error)."""
        self._reason = None
        try:
            res = self.fn(*args)
        except Exception as e:
            self._why = self._failed(e, pairs)
            return None
        try:
            res = list(res)
        except TypeError:
            self._why = self._reason = f"batched judge returned {type(res).__name__}, not a list"
            return None
        if len(res) != n:
            self._why = self._reason = f"batched judge returned {len(res)} answers for {n} inputs"
            return None
        return res

    def _pairwise_batched(self, prompts, pairs) -> list[Verdict]:
        res = self._call_batched(list(prompts), [tuple(p) for p in pairs], n=len(pairs), pairs=len(pairs))
        if res is None:
            return [Verdict.bad(self._why, self._reason) for _ in pairs]
        return [answer_to_verdict(r) for r in res]

    def _pointwise_one(self, prompt, a, b) -> Verdict:
        try:
            sa, sb = self.fn(prompt, a), self.fn(prompt, b)
        except Exception as e:
            return Verdict.bad(raw=self._failed(e))
        return scores_to_verdict(sa, sb)

    def _pointwise_batched(self, prompts, pairs) -> list[Verdict]:
        n = len(pairs)
        res = self._call_batched(list(prompts) * 2, [a for a, _ in pairs] + [b for _, b in pairs], n=2 * n, pairs=n)
        if res is None:
            return [Verdict.bad(self._why, self._reason) for _ in pairs]
        return [scores_to_verdict(res[i], res[n + i]) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# factory functions


def _modes(fn, opts) -> tuple[bool, bool]:
    batched = opts["batched"] if opts["batched"] is not None else bool(getattr(fn, "batched", False))
    pointwise = opts["pointwise"] if opts["pointwise"] is not None else bool(getattr(fn, "pointwise", False))
    return batched, pointwise


def check(spec: str, ctx: JudgeContext) -> None:
    resolve_options("function", ctx.judge_config, OPTIONS)
    load_callable(spec)


def build(spec: str, ctx: JudgeContext) -> FunctionJudge:
    opts = resolve_options("function", ctx.judge_config, OPTIONS)
    fn = load_callable(spec)
    batched, pointwise = _modes(fn, opts)
    return FunctionJudge(fn, batched=batched, pointwise=pointwise, name=spec)
