"""What the online loop does when its judge fails, and the judge's part of a resumable state.

* Judge state. A judge with internal randomness declares it with ``get_state()`` (JSON) and
  ``set_state(state)``; one without declares ``stateless = True``. Checkpoints also keep the
  global ``random`` and ``numpy.random`` states (what a function judge may draw from). A judge that
  declares neither is resumed with a warning saying the run may not repeat exactly.
* A judge that raises: :class:`GuardedJudge` turns the exception into :class:`JudgeFailure`; the
  loop rolls back to the start of the step (no update was made yet), saves that checkpoint and
  stops with :data:`..exits.Exit.JUDGE`.
* Errors on single pairs (a function judge's exception on one pair, an endpoint's failed
  request) are counted per pair as ``judge/errors/<kind>`` (the exception's class, or the
  endpoint's kind such as ``connection_refused``) and shown on the step's line; validation and
  evaluation count them the same way (``errors/<kind>``). An invalid answer (one the judge gave
  that is not a verdict) is shown with its reason quoted (``Verdict.reason``). A step in which
  every pair failed, before the judge has answered any pair of this run, stops the run at once
  with :data:`..exits.Exit.JUDGE` (the judge is broken from the start; the checkpoint is that step's start).
* A judge that answers nothing usable: after ``max_judgeless_steps`` consecutive steps without a
  valid pair the run stops with :data:`..exits.Exit.JUDGE`; its checkpoint is rolled back to the last step
  before that streak, so a resumed run redoes those steps (no prompt is lost).
* A run that ends without a single update is never a success (see the runner).
* Validation draws judge randomness without consuming the training stream's (state restored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from typing import Callable, Optional

import numpy as np

from mlx_xpo_plugin.contracts import Judge, Verdict, as_judge
from mlx_xpo_plugin.errors import StopTraining
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.judges.parse import quote
from mlx_xpo_plugin.loop.win_rate import error_kinds, errors_text, invalid_text


class PeerLost(RuntimeError):
    """Data parallel: a collective operation failed because another process is gone."""

    def __init__(self, step: int, rank: int, world: int, cause: BaseException):
        self.step, self.rank, self.world = step, rank, world
        who = f"process {1 - rank}" if world == 2 else "another process"
        super().__init__(f"{who} of {world} was lost during step {step} ({' '.join(str(cause).split())[:200]})")


def is_peer_loss(world: int, e: BaseException) -> bool:
    """A RuntimeError of MLX's distributed backends about a lost connection (ring, mpi, jaccl)."""
    text = str(e).lower()
    words = ("peer", "[ring]", "[mpi]", "[jaccl]", "connection", "socket", "recv", "send")
    return world > 1 and isinstance(e, RuntimeError) and any(w in text for w in words)


@contextlib.contextmanager
def peer_lost_in(step: int, rank: int, world: int):
    """A collective that fails because another process is gone raises :class:`PeerLost` naming
    ``step`` (the step that cannot be completed); every other error passes unchanged."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, (PeerLost, JudgeFailure)) or not is_peer_loss(world, e):
            raise
        raise PeerLost(step, rank, world, e) from None


class JudgeFailure(RuntimeError):
    """The judge raised an exception; ``str()`` is the one-line message a user sees."""


class GuardedJudge(Judge):
    """The trainer's judge: calls the user's judge, turns its exceptions into JudgeFailure (a
    StopTraining passes through) and remembers the last invalid answer and error for messages."""

    def __init__(self, inner, name: Optional[str] = None):
        self.inner = as_judge(inner)
        self.name = name or getattr(inner, "name", None) or type(inner).__name__
        self.last_invalid: Optional[str] = None  # the reason of the last invalid answer (not an error)
        self.step_invalid: Optional[str] = None  # ... given since the step began (Guard.begin_step)
        self.last_error: Optional[str] = None  # "Class: message" of the last per-pair error
        self.errors = 0  # pairs it failed on, every call together (judge/errors/<kind> summed)

    def judge(self, prompts, pairs):
        try:
            verdicts = self.inner.judge(prompts, pairs)
        except StopTraining:
            raise
        except Exception as e:
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise JudgeFailure(f"the judge {self.name!r} raised {msg}") from e
        self.last_error = getattr(self.inner, "last_error", None) or self.last_error
        failed = error_count(self.inner.last_metrics or {})
        self.errors += failed
        example = invalid_example(verdicts, failed)
        if example is not None:
            self.last_invalid = self.step_invalid = example
        return verdicts

    @property
    def last_metrics(self):
        return self.inner.last_metrics

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)

    @property
    def stateless(self) -> bool:
        return self.inner.stateless

    @property
    def concurrent(self) -> bool:
        return self.inner.concurrent

    def declares_state(self) -> bool:
        return self.inner.declares_state()

    def close(self):
        self.inner.close()


def error_count(metrics: dict) -> int:
    """Pairs the judge failed on (``judge/errors/<kind>`` summed)."""
    return int(sum(v for k, v in metrics.items() if k.startswith("judge/errors/") and isinstance(v, (int, float))))


def invalid_example(verdicts: list[Verdict], failed: int) -> Optional[str]:
    """The reason of the last invalid answer among ``verdicts`` (errors, the ``failed`` pairs, have
    none); a judge that gives no reasons (a plugin's) is quoted by its raw answer when the call had no
    error, so that an answer is never mistaken for an error's text."""
    for v in reversed(verdicts):
        if v.invalid and v.reason:
            return v.reason
    bad = [v for v in verdicts if v.invalid]
    return f"answer {quote(bad[-1].raw)}" if bad and not failed else None


def _unwrap(judge) -> Judge:
    judge = as_judge(judge)
    while isinstance(judge, GuardedJudge):
        judge = judge.inner
    return getattr(judge, "inner", judge)  # a plugin's object: named by its own type


def capture(judge) -> dict:
    """The judge's declared state plus the global random states, as JSON."""
    j = as_judge(judge)
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "judge": j.get_state(),
        "declared": j.declares_state(),
        "kind": type(_unwrap(j)).__name__,
        "python_random": [py[0], list(py[1]), py[2]],
        "numpy_random": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
    }


def restore(judge, state: Optional[dict], log: Callable[[str], None] = print) -> None:
    """Put back what :func:`capture` returned; says so when the judge's state cannot be restored."""
    j = as_judge(judge)
    kind = type(_unwrap(j)).__name__
    if not isinstance(state, dict) or "python_random" not in state:
        if not j.stateless:
            log(
                "resume: this checkpoint has no judge state (an older version made it): a judge "
                "that shuffles or samples may not repeat the uninterrupted run exactly"
            )
        return
    v, internal, g = state["python_random"]
    random.setstate((v, tuple(internal), g))
    name, keys, pos, has_gauss, gauss = state["numpy_random"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state.get("judge") is not None:
        if j.declares_state():
            j.set_state(state["judge"])
        else:
            log(
                f"resume: the checkpoint holds a judge state ({state.get('kind')}) but this judge "
                f"({kind}) has no set_state: the run may not repeat exactly"
            )
    elif not j.declares_state():
        log(
            f"resume: the judge ({kind}) declares no state (neither get_state/set_state "
            "nor stateless = True): if it draws random numbers of its own, this run will not "
            "repeat the uninterrupted one exactly"
        )


class Guard:
    """The loop's fault handling (see the module docstring); one per OnlineTrainer."""

    def __init__(self, trainer, judge_name: Optional[str] = None):
        self.t = trainer
        trainer.judge = GuardedJudge(trainer.judge, judge_name)
        self.status: Optional[int] = None  # the exit status a stop asks for (None: the default)
        self._snap: Optional[dict] = None  # the state at the start of the current step
        self._streak_start: Optional[dict] = None  # ... of the first step of a judgeless streak
        self._streak: dict = {}
        self._rollback: Optional[dict] = None
        self.answered = False  # the judge answered (valid, tie or invalid answer) a pair of this run
        self.judgeless = 0  # steps of this run without a valid pair

    # -- the resumable state at a step boundary
    def snapshot(self) -> dict:
        t = self.t
        return {"state": dataclasses.replace(t.state), "judge": capture(t.judge)}

    def _apply(self, snap: dict) -> None:
        t = self.t
        t.state.set(snap["state"])
        t.order.begin_step()
        restore(t.judge, snap["judge"], log=lambda m: None)

    def begin_step(self) -> None:
        self._snap = self.snapshot()
        self.t.judge.step_invalid = None

    def before_final_save(self) -> None:
        """Roll back to the step a stop asked for (its checkpoint is the one saved next)."""
        if self._rollback is not None:
            self._apply(self._rollback)
            self._rollback = None

    def roll_back_step(self) -> None:
        """The step in progress stops before its update: its checkpoint is the step's start
        (step, data position and judge state), so that a resumed run redoes the step."""
        self._rollback = self._snap

    # -- a judge that raised
    def judge_crashed(self, e: JudgeFailure) -> None:
        """The step in progress made no update: roll back to its start, stop with Exit.JUDGE."""
        step = self.t.step
        self.roll_back_step()
        self.status = Exit.JUDGE
        self.t.stop_reason = f"{e} at step {step}; the checkpoint is the state before that step"

    def validate(self, evaluate: Callable[[], dict]) -> Optional[dict]:
        """Run a validation without consuming the training stream's judge randomness; a judge
        that raises stops the run (the step's update is kept), returning None."""
        before = capture(self.t.judge)
        try:
            return evaluate()
        except JudgeFailure as e:
            self.status = Exit.JUDGE
            self.t.stop_reason = f"{e} during the validation of step {self.t.step}"
            return None
        except StopTraining as e:  # e.g. the human judge's 'q'
            self.t.stop_reason = f"stopped by the judge ({e or 'q'})"
            return None
        finally:
            restore(self.t.judge, before, log=lambda m: None)

    # -- the failure budget
    def judged(self, pairs: int, errors: int) -> None:
        """Note a step's pairs and the pairs the judge failed on (all processes together)."""
        if errors < pairs:
            self.answered = True

    def error_line(self, pairs: int, errors: int, metrics: Optional[dict] = None) -> str:
        """'4 errors: ZeroDivisionError: ...' for a step's line (several kinds: by kind), or ''."""
        return errors_text(errors, error_kinds(metrics or {}, "judge/errors/"), self.t.judge.last_error)

    def verdict_counts(self, metrics: dict, pairs: int, errors: int) -> str:
        """The verdicts of a step without a valid pair, for its line: ``2 invalid: unparsed answer
        "I think the first answer is more...", 0 ties`` (errors first, where there were any)."""
        failed = self.error_line(pairs, errors, metrics)
        invalid = int(metrics.get("judge/invalid", 0)) - error_count(metrics)
        words = invalid_text(invalid, self.t.judge.step_invalid)
        return f"{failed + '; ' if failed else ''}{words}, {int(metrics.get('judge/ties', 0))} ties"

    def valid_pair(self) -> None:
        self._streak, self._streak_start = {}, None

    def no_valid_pair(self, metrics: dict, pairs: int, errors: int) -> None:
        """Count a step without a valid pair; after max_judgeless_steps in a row, stop. A step
        whose every pair failed, before the judge answered any pair of this run, stops at once."""
        self.judgeless += 1
        if pairs and errors >= pairs and not self.answered:
            self.roll_back_step()
            self.status = Exit.JUDGE
            self.t.stop_reason = (
                f"the judge {self.t.judge.name!r} failed on every pair of step {self.t.step} "
                f"({self.error_line(pairs, errors, metrics)}) and has answered none yet; the checkpoint "
                f"is the state before step {self.t.step}"
            )
            return
        if not self._streak:
            self._streak_start = self._snap
        k = self._streak
        k["steps"] = k.get("steps", 0) + 1
        for key, v in metrics.items():
            if key.startswith("judge/") and key != "judge/seconds" and isinstance(v, (int, float)):
                k[key] = k.get(key, 0) + v
        limit = self.t.settings.max_judgeless_steps
        if not limit or k["steps"] < limit:
            return
        self.status = Exit.JUDGE
        self._rollback = self._streak_start
        self.t.stop_reason = self.describe_streak()

    def describe_streak(self) -> str:
        k, t = self._streak, self.t
        first = (self._streak_start["state"].step if self._streak_start else t.step - 1) + 1
        pairs, invalid, ties = (int(k.get(f"judge/{x}", 0)) for x in ("pairs", "invalid", "ties"))
        kinds = {key.split("/", 2)[2]: int(v) for key, v in k.items() if key.startswith("judge/errors/") and v}
        errors = sum(kinds.values())
        kind_text = (
            (" (" + ", ".join(f"{c} {n.replace('_', ' ')}" for n, c in sorted(kinds.items())) + ")") if kinds else ""
        )
        answers = max(0, invalid - errors)
        last = f" (last: {t.judge.last_invalid})" if answers and t.judge.last_invalid else ""
        err = f"; last error: {t.judge.last_error}" if errors and t.judge.last_error else ""
        return (
            f"the judge {t.judge.name!r} gave no valid pair in {k['steps']} consecutive steps "
            f"(steps {first}-{t.step}, max_judgeless_steps={t.settings.max_judgeless_steps}): "
            f"{pairs} pairs, {errors} errors{kind_text}, {answers} invalid answers{last}, {ties} ties{err}"
            + f"; the checkpoint is the state after step {first - 1}, so a resumed run "
            "redoes those steps"
        )


def intact_checkpoint(adapter_path: str, then: str = "make room, then resume") -> str:
    """After a failed save or a lost process: which checkpoint is there to resume from, in words."""
    path = os.path.join(adapter_path, "checkpoint", "state.json")
    try:
        with open(path) as f:
            step = json.load(f)["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint had been saved yet"
    return f"the checkpoint of step {step} ({os.path.dirname(path)}) is intact: {then}"
