"""A concurrent judge (endpoint, human, a function that declares it) answers in a thread while the
reference pass computes: the same verdicts, metrics and adapters, bit for bit, as the sequential
order, and the same stops (judge failures, the human judge's 'q', Ctrl-C)."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from fake_endpoint import FakeEndpoint
from mlx.utils import tree_unflatten
from test_trainer import make_trainer, params

from mlx_xpo_plugin.contracts import Judge, Verdict, as_judge
from mlx_xpo_plugin.errors import StopTraining
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.judges.function import FunctionJudge
from mlx_xpo_plugin.judges.http import HTTPJudge
from mlx_xpo_plugin.judges.human import HumanJudge
from mlx_xpo_plugin.judges.llm import LLMJudge
from mlx_xpo_plugin.loop import overlap
from mlx_xpo_plugin.loop import trainer as trainer_module
from mlx_xpo_plugin.loop.faults import GuardedJudge
from mlx_xpo_plugin.loop.overlap import judge_while

_SHOWN = re.compile(r"Response 0:\n(.*?)\n\nResponse 1:\n(.*?)\n\nBetter response", re.DOTALL)
TIMES = ("time/", "step_seconds", "tokens_per_second", "peak_memory_gb", "val_seconds", "judge/seconds")


def slow_endpoint(delay: float) -> FakeEndpoint:
    """An endpoint that answers after ``delay`` seconds: "0" or "1" for the response with more 'e',
    an unparseable "?" when they have as many (invalid)."""

    def answer(body):
        a, b = _SHOWN.search(body["messages"][1]["content"]).groups()
        time.sleep(delay)
        return "?" if a.count("e") == b.count("e") else ("0" if a.count("e") > b.count("e") else "1")

    return FakeEndpoint(answer)


@pytest.fixture
def endpoint():
    server = slow_endpoint(delay=0.2)
    yield server
    server.close()


def train(lora_model, data_dir, judge, start, mode="online_dpo", iters=3, validate=True, **kw):
    """A run from the adapters ``start``: (its trainer, result, metrics rows, completions rows)."""
    model = lora_model[0]
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in start.items()]))
    t = make_trainer(lora_model, data_dir, judge=judge, mode=mode, iters=iters, batch_size=4, steps_per_report=1, **kw)
    t.opt.learning_rate = 0.05
    if not validate:
        t.valid_set = None
    mx.random.seed(0)  # the step-0 validation's samples (each step seeds its own)
    result = t.train()
    ad = t.settings.adapter_path

    def rows(name):
        return [json.loads(line) for line in open(os.path.join(ad, name))]

    return t, result, rows("metrics.jsonl"), rows("completions.jsonl")


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMES)} for r in rows]


def assert_same_run(a, b):
    (ta, ra, ma, ca), (tb, rb, mb, cb) = a, b
    assert without_times([ra]) == without_times([rb])
    assert ca == cb  # every pair's verdict, in the same order
    assert without_times(ma) == without_times(mb)
    pa, pb = params(ta.model), params(tb.model)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def judge_first(monkeypatch):
    """The sequential order of a concurrent judge's step: the judge answers, then the reference
    pass scores the same passes (as the policy pass asks for them)."""
    monkeypatch.setattr(trainer_module, "judge_while", lambda judge, reference_pass: (judge(), 0.0))


def three_orders(lora_model, data_dir, make_judge, monkeypatch, **kw):
    """Runs from the same adapters: the judge not concurrent (the reference pass on the pairs
    kept, after the verdicts), concurrent but answering first, concurrent beside the reference pass."""
    start = params(lora_model[0])
    judge = make_judge(False)
    before = train(lora_model, data_dir, judge, start, **kw)
    with monkeypatch.context() as m:
        judge_first(m)
        sequential = train(lora_model, data_dir, make_judge(True), start, **kw)
    overlapped = train(lora_model, data_dir, make_judge(True), start, **kw)
    return before, sequential, overlapped


@pytest.mark.parametrize(
    "mode,kw",
    [("online_dpo", {}), ("xpo", {"alpha": 1e-3, "gradient_accumulation_steps": 2, "micro_batch_size": 2})],
)
def test_an_endpoint_judge_beside_the_reference_pass_trains_as_in_the_sequential_order(
    lora_model, prompt_data_dir, endpoint, monkeypatch, mode, kw
):
    def make_judge(concurrent):
        judge = HTTPJudge(endpoint.url, seed=0)
        judge.concurrent = concurrent
        return judge

    before, sequential, overlapped = three_orders(lora_model, prompt_data_dir, make_judge, monkeypatch, mode=mode, **kw)
    assert_same_run(sequential, overlapped)
    # the tests' BLAS (MLX as shipped) computes a row alike wherever it sits in a batch: the
    # reference pass in the samples' order gives the numbers of the pass on the kept pairs
    assert_same_run(before, overlapped)
    assert all(r.get("time/overlapped", 0) == 0 for r in before[2] + sequential[2])
    assert all(r["time/overlapped"] > 0 for r in overlapped[2] if "loss" in r)  # the judge waited on the server
    assert sum(r["judge/invalid"] for r in overlapped[2] if "loss" in r) > 0  # ties ("?") were among the pairs


def test_a_concurrent_function_judge_runs_in_a_thread_while_the_reference_pass_computes(
    lora_model, prompt_data_dir, monkeypatch
):
    """The function draws from the global random generators, as a judge may; in a thread it
    answers only once the reference pass has started, so the two surely ran at once. Each pass
    is scored once, ahead of the verdicts or after them."""
    started = threading.Event()
    seen, passes = [], []
    real = overlap.reference_logps

    def reference_logps(*args):
        started.set()
        passes[-1] += 1
        return real(*args)

    monkeypatch.setattr(overlap, "reference_logps", reference_logps)
    monkeypatch.setattr(trainer_module, "reference_logps", reference_logps)

    def prefer_e(prompts, pairs):
        if threading.current_thread() is not threading.main_thread():
            seen.append(started.wait(timeout=10))
            started.clear()
        draw = [random.random() + np.random.random() for _ in pairs]
        e = [(a.count("e"), b.count("e")) for a, b in pairs]
        return [None if ca == cb and d < 1 else int(ca < cb) for (ca, cb), d in zip(e, draw)]

    def make_judge(concurrent):
        random.seed(1)
        np.random.seed(1)
        seen.clear()
        passes.append(0)
        prefer_e.concurrent = concurrent
        return FunctionJudge(prefer_e, batched=True)

    kw = dict(mode="xpo", alpha=1e-3, iters=4, validate=False)
    runs = three_orders(lora_model, prompt_data_dir, make_judge, monkeypatch, **kw)
    assert seen == [True] * 4  # the last run's 4 steps, each judged in a thread
    assert passes[0] == passes[1] == passes[2] > 0
    for run in runs[:2]:
        assert_same_run(run, runs[2])


def test_the_human_judge_answers_at_the_terminal_while_the_reference_pass_computes(
    lora_model, prompt_data_dir, monkeypatch
):
    """Two steps answered, then 'q' in the third: the same questions on the screen, the same
    adapters and the same stop, whether the person answers before or during the reference pass."""
    start = params(lora_model[0])
    runs, screens = [], []
    for concurrent in (False, True):
        screen = io.StringIO()
        judge = HumanJudge(stdin=io.StringIO("1\n2\n2\n1\nb\na\ns\n2\n1\nq\n"), stdout=screen, shuffle=True)
        judge.concurrent = concurrent
        runs.append(train(lora_model, prompt_data_dir, judge, start, iters=4, validate=False))
        screens.append(screen.getvalue())
        assert runs[-1][1]["stop_reason"] == "stopped by the judge (the human judge quit)"
        assert runs[-1][1]["stopped_at"] == 3
    assert screens[0] == screens[1] and screens[0].count("Pair 1 of 4") == 3
    assert_same_run(*runs)


class Failing(Judge):
    """A plugin's judge: answers by the letter e, and on call ``at`` raises ``error``."""

    def __init__(self, concurrent: bool, at: int, error: BaseException, signal_self: bool = False):
        self.concurrent, self.at, self.error, self.calls = concurrent, at, error, 0
        self.signal_self = signal_self

    def judge(self, prompts, pairs):
        self.calls += 1
        if self.calls == self.at:
            if self.signal_self:  # Ctrl-C while the judge works
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            else:
                raise self.error
        return [Verdict(int(a.count("e") < b.count("e"))) for a, b in pairs]


@pytest.mark.parametrize(
    "error,status",
    [(ValueError("the service said no"), Exit.JUDGE), (StopTraining("the human judge quit"), None)],
)
def test_a_concurrent_judges_failure_stops_the_run_as_in_the_sequential_order(
    lora_model, prompt_data_dir, error, status
):
    start = params(lora_model[0])
    runs = []
    for concurrent in (False, True):
        runs.append(
            train(lora_model, prompt_data_dir, Failing(concurrent, at=2, error=error), start, iters=4, validate=False)
        )
        t, result = runs[-1][:2]
        assert t.guard.status == status
        assert result["step"] == 1 and result["stopped_at"] == 2  # the failed step is redone on resume
        assert str(error) in result["stop_reason"]
    assert_same_run(*runs)


def test_ctrl_c_while_a_concurrent_judge_works_finishes_the_step_and_saves(lora_model, prompt_data_dir):
    start = params(lora_model[0])
    runs = []
    for concurrent in (False, True):
        judge = Failing(concurrent, at=2, error=None, signal_self=True)
        runs.append(train(lora_model, prompt_data_dir, judge, start, iters=4, validate=False))
        result = runs[-1][1]
        assert result["interrupted"] and result["step"] == result["stopped_at"] == 2
    assert_same_run(*runs)


def test_judge_while_raises_as_the_sequential_order_does():
    done = []

    def reference_pass(judging):
        time.sleep(0.05)
        done.append(judging())

    def fails():
        raise ValueError("judge")

    with pytest.raises(ValueError, match="judge"):  # after the reference pass
        judge_while(fails, reference_pass)
    assert done == [False]

    def ref_fails(judging):
        raise RuntimeError("reference")

    with pytest.raises(ValueError, match="judge"):  # the judge failed first in the sequential order
        judge_while(fails, ref_fails)
    with pytest.raises(RuntimeError, match="reference"):
        judge_while(lambda: [Verdict(0)], ref_fails)

    release = threading.Event()

    def interrupted(judging):
        raise KeyboardInterrupt

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):  # at once, while the judge still waits
        judge_while(lambda: release.wait(10), interrupted)
    assert time.perf_counter() - t0 < 5
    release.set()

    result, both = judge_while(lambda: (time.sleep(0.2), "verdicts")[1], lambda judging: time.sleep(0.2))
    assert result == "verdicts" and 0 < both <= 0.4


def test_which_judges_run_beside_the_reference_pass():
    assert HTTPJudge("http://127.0.0.1:9").concurrent
    assert HumanJudge(stdin=None, stdout=None).concurrent
    assert not LLMJudge.concurrent  # computes with MLX, on the same cores: stays sequential

    def f(prompt, a, b):
        return 0

    assert not FunctionJudge(f).concurrent
    f.concurrent = True
    assert FunctionJudge(f).concurrent and GuardedJudge(FunctionJudge(f)).concurrent

    class Plugin:
        def judge(self, prompts, pairs):
            return []

    assert not as_judge(Plugin()).concurrent
    Plugin.concurrent = True
    assert as_judge(Plugin()).concurrent and GuardedJudge(Plugin()).concurrent
