"""A model judge naming the policy's own model shares its weights; grad_checkpoint is applied."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_xpo_plugin.compute.reference import BaseView
from mlx_xpo_plugin.contracts import JudgeContext
from mlx_xpo_plugin.host.registry import build_judge


def test_judge_on_the_base_view_matches_a_separately_loaded_base(lora_model, tiny_model, tiny_model_path):
    model, tok, _ = lora_model
    base, base_tok = tiny_model
    # adapters that change the policy's outputs: the judge must not see them
    model.update(tree_unflatten([(k, mx.ones_like(v) * 0.05) for k, v in tree_flatten(model.trainable_parameters())]))
    cfg = {"shuffle": False}
    shared = build_judge(
        tiny_model_path,
        JudgeContext(
            judge_config=cfg,
            reference_model=BaseView(model),
            reference_tokenizer=tok,
            reference_model_path=tiny_model_path,
        ),
    )
    own = build_judge(tiny_model_path, JudgeContext(judge_config=cfg))
    prompts = ["Tell me about snow.", "A fact about tea?", "Describe bread."]
    pairs = [("cold and white", "warm"), ("green", "tea is a drink made from leaves"), ("crust", "soft")]
    a, b = shared.judge(prompts, pairs), own.judge(prompts, pairs)
    assert [v.winner for v in a] == [v.winner for v in b]
    np.testing.assert_allclose([v.confidence for v in a], [v.confidence for v in b], atol=1e-4)
    # and the base view's parameters are the frozen base arrays, identical across calls
    p1 = [v for _, v in tree_flatten(BaseView(model).parameters())]
    p2 = [v for _, v in tree_flatten(BaseView(model).parameters())]
    assert all(x is y for x, y in zip(p1, p2)) and not any(
        "lora" in k for k, _ in tree_flatten(BaseView(model).parameters())
    )


def test_run_with_the_policy_as_judge_loads_no_extra_copy(
    tiny_model_path, prompt_data_dir, tmp_path, capsys, monkeypatch
):
    from mlx_xpo_plugin.xpo_trainer import train_xpo

    monkeypatch.setenv("MLX_XPO_VERBOSE", "1")  # upstream's loading lines and ours are detail lines
    out = tmp_path / "ad"
    rc = train_xpo(
        {
            "model": tiny_model_path,
            "data": prompt_data_dir,
            "adapter_path": str(out),
            "iters": 2,
            "batch_size": 2,
            "judge": tiny_model_path,
            "max_completion_length": 6,
            "max_seq_length": 512,
            "steps_per_report": 1,
            "steps_per_eval": 100,
        },
        progress=False,
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "judge: shares the reference's weights" in text
    assert text.count(f"Loading model {tiny_model_path}") == 1


GC_SCRIPT = """
import json, sys
from mlx_xpo_plugin.online_dpo_trainer import train_online_dpo
model, data, out, gc = sys.argv[1:5]
train_online_dpo({"model": model, "data": data, "adapter_path": out, "iters": 2, "batch_size": 2,
                   "judge": "mlx_xpo_plugin.rules:prefer_letter_e", "max_completion_length": 8,
                   "max_seq_length": 128, "steps_per_report": 1, "steps_per_eval": 100,
                   "grad_checkpoint": gc == "1"}, progress=False)
"""


def test_grad_checkpoint_is_applied_and_changes_no_numbers(tiny_model_path, prompt_data_dir, tmp_path):
    losses, outs = {}, {}
    for gc in ("0", "1"):
        out = tmp_path / f"gc{gc}"
        r = subprocess.run(
            [sys.executable, "-c", GC_SCRIPT, tiny_model_path, prompt_data_dir, str(out), gc],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outs[gc] = r.stdout
        losses[gc] = [row.get("loss") for row in map(json.loads, open(out / "metrics.jsonl")) if "judge/pairs" in row]
    assert "gradient checkpointing: on" in outs["1"] and "gradient checkpointing" not in outs["0"]
    assert len(losses["0"]) == 2
    np.testing.assert_allclose([x or 0 for x in losses["1"]], [x or 0 for x in losses["0"]], rtol=1e-4)
