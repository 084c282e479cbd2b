"""Exact resume: interrupted at step k and resumed == uninterrupted, with the same seed."""

import json
import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from conftest import RuleJudge
from mlx.utils import tree_flatten, tree_unflatten

from mlx_xpo_plugin.commands.data import load_prompts
from mlx_xpo_plugin.compute.reference import Reference
from mlx_xpo_plugin.loop.checkpoints import load_resume
from mlx_xpo_plugin.loop.settings import LoopSettings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer
from mlx_xpo_plugin.xpo_trainer import XPO


class StopAt:
    def __init__(self, step):
        self.step, self.trainer = step, None

    def on_train_loss_report(self, info):
        if info["iteration"] == self.step:
            self.trainer.stop_requests = 1

    def on_val_loss_report(self, info):
        pass


def trainer_for(lora_model, data_dir, ad, start, callback=None):
    model, tok, _ = lora_model
    model.update(tree_unflatten(start))
    s = LoopSettings(
        iters=6,
        batch_size=2,
        alpha=[1e-3, 1e-4],
        steps_per_report=1,
        steps_per_eval=1000,
        save_every=1000,
        adapter_path=ad,
        progress=False,
        max_completion_length=8,
        temperature=1.0,
    )
    tr = load_prompts(data_dir, "train", tok, 200)
    t = OnlineTrainer(
        s,
        XPO(s),
        model,
        tok,
        Reference(model),
        RuleJudge(),
        optim.Adam(learning_rate=1e-2),
        tr,
        None,
        callback,
        log=lambda m: None,
    )
    return t


def test_interrupted_and_resumed_run_matches_uninterrupted(lora_model, prompt_data_dir, tmp_path):
    model = lora_model[0]
    start = [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]

    mx.random.seed(0)
    full = trainer_for(lora_model, prompt_data_dir, str(tmp_path / "full"), start)
    full.train()
    want = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    want_rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]

    mx.random.seed(0)
    stop = StopAt(3)
    part = trainer_for(lora_model, prompt_data_dir, str(tmp_path / "part"), start, stop)
    stop.trainer = part
    res = part.train()
    assert res["interrupted"] and res["step"] == 3
    state = json.load(open(tmp_path / "part" / "checkpoint" / "state.json"))
    assert state["step"] == 3 and state["position"] == 6

    mx.random.seed(999)  # the checkpoint's RNG state must win over whatever the new process has
    resumed = trainer_for(lora_model, prompt_data_dir, str(tmp_path / "part"), start)
    resumed.train(load_resume(str(tmp_path / "part"), types.SimpleNamespace()))
    got = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    assert max(np.abs(got[k] - want[k]).max() for k in want) < 1e-5
    rows = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows]
    for a, b in zip(rows, want_rows):
        assert ("loss" in a) == ("loss" in b) and abs(a.get("loss", 0) - b.get("loss", 0)) < 1e-4
        assert a["alpha"] == b["alpha"]


def test_a_checkpoint_torn_between_files_is_refused(lora_model, prompt_data_dir, tmp_path):
    import pytest

    from mlx_xpo_plugin.errors import ConfigError

    model = lora_model[0]
    start = [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]
    t = trainer_for(lora_model, prompt_data_dir, str(tmp_path / "ad"), start)
    t.settings.iters = 2
    t.train()
    d = tmp_path / "ad" / "checkpoint"
    name = json.load(open(d / "state.json"))["files"]["adapters"]
    weights, _ = mx.load(str(d / name), return_metadata=True)
    mx.save_safetensors(str(d / name), weights, metadata={"step": "3"})  # newer than state
    with pytest.raises(ConfigError, match="incomplete .*adapters from step 3, state from step 2"):
        load_resume(str(tmp_path / "ad"), types.SimpleNamespace())
