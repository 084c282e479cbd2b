"""Exact resume with every kind of judge: a judge's internal randomness (the pair-order shuffle of
the model and endpoint judges, a plugin's own RNG, the global random a function draws from) is
in the checkpoint; a judge that raises stops the run at the start of its step; a judge that
declares no state makes the resume say so."""

import json
import random
import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from fake_endpoint import FakeEndpoint
from mlx.utils import tree_flatten, tree_unflatten

from mlx_xpo_plugin.commands.data import load_prompts
from mlx_xpo_plugin.compute.reference import Reference
from mlx_xpo_plugin.contracts import Verdict
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.judges.function import FunctionJudge
from mlx_xpo_plugin.judges.http import HTTPJudge
from mlx_xpo_plugin.judges.llm import LLMJudge
from mlx_xpo_plugin.loop.checkpoints import load_resume
from mlx_xpo_plugin.loop.settings import LoopSettings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer
from mlx_xpo_plugin.xpo_trainer import XPO


def first_shown() -> FakeEndpoint:
    """An endpoint that always answers "0" (pure position bias: the shuffle decides the label)."""
    return FakeEndpoint(lambda body: "0")


class RandomPlugin:
    """A plugin judge with its own RNG: prefers the first completion with probability 1/2."""

    def __init__(self, declare=True, crash_on_call=None):
        self.rng, self.calls, self.crash_on_call = random.Random(0), 0, crash_on_call
        if declare:
            self.get_state = lambda: {"rng": [self.rng.getstate()[0], list(self.rng.getstate()[1]), None]}
            self.set_state = lambda s: self.rng.setstate((s["rng"][0], tuple(s["rng"][1]), None))

    def judge(self, prompts, pairs):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("judge backend lost")
        return [Verdict(int(self.rng.random() < 0.5)) for _ in pairs]


def coin(prompt, a, b):  # a function judge drawing from the global random module
    return 0 if random.random() < 0.5 else 1


class StopAt:
    def __init__(self, step):
        self.step, self.trainer = step, None

    def on_train_loss_report(self, info):
        if info["iteration"] == self.step:
            self.trainer.stop_requests = 1  # what SIGINT / SIGTERM do (run_loop.GracefulStop)

    def on_val_loss_report(self, info):
        pass


def make(lora_model, data_dir, ad, start, judge, callback=None, logs=None):
    model, tok, _ = lora_model
    model.update(tree_unflatten(start))
    s = LoopSettings(
        iters=6,
        batch_size=2,
        alpha=1e-3,
        steps_per_report=1,
        steps_per_eval=2,
        val_batches=1,
        save_every=1000,
        adapter_path=ad,
        progress=False,
        max_completion_length=8,
        temperature=1.0,
    )
    tr = load_prompts(data_dir, "train", tok, 200)
    va = load_prompts(data_dir, "valid", tok, 200)
    log = (lambda m: logs.append(m)) if logs is not None else (lambda m: None)
    return OnlineTrainer(
        s, XPO(s), model, tok, Reference(model), judge, optim.Adam(learning_rate=1e-2), tr, va, callback, log=log
    )


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


JUDGES = {
    "model": lambda tiny: LLMJudge(*tiny, seed=0),
    "endpoint": lambda tiny: HTTPJudge(tiny.url, seed=0, max_retries=0, timeout=10),
    "function": lambda tiny: FunctionJudge(coin),
    "plugin": lambda tiny: RandomPlugin(),
}


@pytest.mark.parametrize("kind", sorted(JUDGES))
def test_interrupted_and_resumed_equals_uninterrupted_for_every_judge(
    kind, lora_model, tiny_model, prompt_data_dir, tmp_path
):
    server = first_shown() if kind == "endpoint" else None
    arg = server if server else tiny_model
    try:
        start = [(k, mx.array(v)) for k, v in tree_flatten(lora_model[0].trainable_parameters())]
        random.seed(1)
        make(lora_model, prompt_data_dir, str(tmp_path / "full"), start, JUDGES[kind](arg)).train()
        want = weights(lora_model[0])

        random.seed(1)
        stop = StopAt(3)
        part = make(lora_model, prompt_data_dir, str(tmp_path / "part"), start, JUDGES[kind](arg), stop)
        stop.trainer = part
        assert part.train()["step"] == 3

        random.seed(12345)  # the new process's global state must not matter
        logs = []
        fresh = make(lora_model, prompt_data_dir, str(tmp_path / "part"), start, JUDGES[kind](arg), logs=logs)
        fresh.train(load_resume(str(tmp_path / "part"), types.SimpleNamespace()))
        got = weights(lora_model[0])
        assert all(np.array_equal(got[k], want[k]) for k in want), kind  # bit for bit
        assert not [m for m in logs if m.startswith("resume:")]  # every judge here declares its state
    finally:
        if server:
            server.close()


def test_a_judge_without_declared_state_makes_the_resume_say_so(lora_model, prompt_data_dir, tmp_path):
    start = [(k, mx.array(v)) for k, v in tree_flatten(lora_model[0].trainable_parameters())]
    stop = StopAt(2)
    part = make(lora_model, prompt_data_dir, str(tmp_path / "ad"), start, RandomPlugin(declare=False), stop)
    stop.trainer = part
    part.train()
    logs = []
    fresh = make(lora_model, prompt_data_dir, str(tmp_path / "ad"), start, RandomPlugin(declare=False), logs=logs)
    fresh.settings.iters = 3
    fresh.train(load_resume(str(tmp_path / "ad"), types.SimpleNamespace()))
    said = [m for m in logs if m.startswith("resume:")]
    assert len(said) == 1 and "RandomPlugin" in said[0] and "declares no state" in said[0]
    assert "will not repeat the uninterrupted one exactly" in said[0]


def test_a_judge_that_raises_stops_at_the_start_of_its_step_and_resumes_exactly(lora_model, prompt_data_dir, tmp_path):
    start = [(k, mx.array(v)) for k, v in tree_flatten(lora_model[0].trainable_parameters())]
    make(lora_model, prompt_data_dir, str(tmp_path / "full"), start, RandomPlugin()).train()
    want = weights(lora_model[0])

    # calls: 1 = validation of step 0, 2-3 = steps 1-2, 4 = validation of step 2, 5 = step 3
    t = make(lora_model, prompt_data_dir, str(tmp_path / "ad"), start, RandomPlugin(crash_on_call=5))
    res = t.train()
    assert res["step"] == 2 and t.guard.status == Exit.JUDGE
    assert "the judge 'RandomPlugin' raised RuntimeError: judge backend lost at step 3" in res["stop_reason"]
    state = json.load(open(tmp_path / "ad" / "checkpoint" / "state.json"))
    assert state["step"] == 2 and state["position"] == 4  # step 3's prompts are not consumed

    fresh = make(lora_model, prompt_data_dir, str(tmp_path / "ad"), start, RandomPlugin())
    fresh.train(load_resume(str(tmp_path / "ad"), types.SimpleNamespace()))
    got = weights(lora_model[0])
    assert all(np.array_equal(got[k], want[k]) for k in want)
