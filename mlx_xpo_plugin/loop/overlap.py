"""The judge beside the reference pass.

A judge that computes nothing with MLX in this process declares ``concurrent = True`` (the
endpoint and human judges do; a function judge may: contracts.Judge). Its call then runs in a
thread while the main thread scores the sampled pairs under the reference (:func:`judge_while`),
so that a micro-batch costs max(judge, reference pass) instead of their sum.

For such a judge the reference pass does not depend on the verdicts (:class:`ReferenceRows`): it
scores every sampled pair of an accumulation micro-batch in the samples' order (rows a..., b...,
in passes of ``micro_batch_size`` pairs), and the policy pass takes each completion's row from
there, whichever side the verdict made it and whichever pairs are kept. A row's numbers are not
the same bit for bit at every place in a batch on every BLAS (under OpenBLAS a row moved within
the same batch can differ by float32 rounding), so a layout fixed before the verdicts is what
makes the run the same whether the judge answers before, during or after the reference pass. Passes
the judge's answer leaves unscored are scored after the verdicts, in the same layout (online
DPO skips those holding no decided pair). A judge that is not concurrent keeps the reference
pass after its verdicts, on the pairs the policy pass scores.

Randomness: the judge thread draws from the judge's own generator and, for a function judge, the
global ``random`` / ``numpy.random``, which the reference pass does not touch; every MLX draw
(sampling, dropout) stays on the main thread, in the same order as without the thread.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.compute.scoring import first_completion_position
from mlx_xpo_plugin.loop.pair_loss import pack_pairs, reference_logps
from mlx_xpo_plugin.loop.pairs import Pair


def judge_while(judge_call: Callable[[], object], reference_pass: Callable[[Callable[[], bool]], None]):
    """``judge_call()`` in a thread while ``reference_pass(judging)`` runs here (``judging()``:
    the judge has not answered yet). Returns (judge_call's result, seconds both ran at once).

    Exceptions are raised here as the sequential order (judge, then reference pass) raises them:
    the judge's (a JudgeFailure, the human judge's StopTraining, ...) once the reference pass has
    returned, and the judge's before the reference pass's when both fail. A KeyboardInterrupt or
    SystemExit of the reference pass is raised at once (the judge thread is a daemon)."""
    out: dict = {}

    def run() -> None:
        out["start"] = time.perf_counter()
        try:
            out["result"] = judge_call()
        except BaseException as e:  # raised on the main thread below
            out["error"] = e
        finally:
            out["end"] = time.perf_counter()

    thread = threading.Thread(target=run, name="judge", daemon=True)
    thread.start()
    t0 = time.perf_counter()
    failed: Optional[Exception] = None
    try:
        reference_pass(thread.is_alive)
    except Exception as e:
        failed = e
    t1 = time.perf_counter()
    while thread.is_alive():  # a timed join: signal handlers (Ctrl-C) run while the judge works
        thread.join(0.25)
    if "error" in out:
        raise out["error"]
    if failed is not None:
        raise failed
    return out["result"], max(0.0, min(t1, out["end"]) - max(t0, out["start"]))


def _rows(pairs):
    """(prompt ids, completion) of pack_pairs' rows: first sides..., second sides..."""
    return [(p.prompt_ids, p.chosen) for p in pairs] + [(p.prompt_ids, p.rejected) for p in pairs]


class ReferenceRows:
    """The reference's token log-probs of one step's sampled completions, scored in the samples'
    order (see the module docstring): ahead of the verdicts while the judge works, or when the
    policy pass asks for them."""

    def __init__(self, reference, pairs_per_pass: int):
        self.reference, self.pairs_per_pass = reference, pairs_per_pass
        self.waiting: dict = {}  # id(completion) -> its pass (pairs a, b), until scored
        self.scored: dict = {}  # id(completion) -> (completion, its tokens' log-probs [len(tokens)])

    def add(self, prompts, samples: list) -> list:
        """One accumulation micro-batch's samples, as the passes that will score them."""
        pairs = [Pair(pid, text, a, b) for pid, text, (a, b, _) in zip(prompts.ids, prompts.texts, samples)]
        passes = [pairs[i : i + self.pairs_per_pass] for i in range(0, len(pairs), self.pairs_per_pass)]
        for batch in passes:
            self.waiting.update((id(c), batch) for _, c in _rows(batch))
        return passes

    def score(self, batch) -> None:
        inputs, targets, mask = pack_pairs(batch)
        tok = np.array(reference_logps(self.reference, inputs, targets, mask))
        start = first_completion_position(mask)
        for r, (prompt, c) in enumerate(_rows(batch)):
            at = len(prompt) - 1 - start
            self.scored[id(c)] = (c, tok[r, at : at + len(c.tokens)])
            self.waiting.pop(id(c), None)

    def score_ahead(self, passes: list, judging: Callable[[], bool]) -> None:
        """Score ``passes`` (from :meth:`add`) while ``judging()``."""
        for batch in passes:
            if not judging():
                return
            self.score(batch)

    def tokens(self, pairs, mask: mx.array) -> Optional[mx.array]:
        """The token log-probs [2P, T] of a policy micro-batch (pack_pairs' rows and ``mask``),
        its passes scored first where they are not yet; None for a completion never added."""
        rows = _rows(pairs)
        for _, c in rows:
            if id(c) not in self.scored:
                if id(c) not in self.waiting:
                    return None
                self.score(self.waiting[id(c)])
        start = first_completion_position(mask)
        out = np.zeros((mask.shape[0], mask.shape[1] - start), np.float32)
        for r, (prompt, c) in enumerate(rows):
            at = len(prompt) - 1 - start
            out[r, at : at + len(c.tokens)] = self.scored[id(c)][1]
        return mx.array(out)
