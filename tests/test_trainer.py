"""The shared online loop: gradient scaling, invalid verdicts, updates, learning, resume."""

import json
import os

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import RuleJudge
from mlx.utils import tree_flatten, tree_unflatten

from mlx_xpo_plugin.commands.data import load_prompts
from mlx_xpo_plugin.compute.reference import Reference
from mlx_xpo_plugin.compute.rollout import Completion
from mlx_xpo_plugin.contracts import Verdict
from mlx_xpo_plugin.loop import evaluation
from mlx_xpo_plugin.loop import trainer as trainer_module
from mlx_xpo_plugin.loop.pair_loss import pack_pairs
from mlx_xpo_plugin.loop.pairs import Pair, apply_missing_eos_penalty
from mlx_xpo_plugin.loop.prompts import PromptSet
from mlx_xpo_plugin.loop.settings import LoopSettings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer
from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO
from mlx_xpo_plugin.xpo_trainer import XPO


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def make_trainer(lora_model, data_dir, judge=None, lr=1e-3, mode="online_dpo", **kw):
    model, tok, ad = lora_model
    tr = load_prompts(data_dir, "train", tok, 200)
    va = load_prompts(data_dir, "valid", tok, 200)
    s = LoopSettings(
        **{
            **dict(
                iters=4,
                batch_size=2,
                max_completion_length=8,
                temperature=1.0,
                steps_per_report=2,
                steps_per_eval=1000,
                save_every=1000,
                adapter_path=ad,
                progress=False,
            ),
            **kw,
        }
    )
    method = {"online_dpo": OnlineDPO, "xpo": XPO}[mode](s)
    return OnlineTrainer(
        s,
        method,
        model,
        tok,
        Reference(model),
        judge or RuleJudge(),
        optim.SGD(learning_rate=lr),
        tr,
        va,
        log=lambda m: None,
    )


class FixedPairs:
    """Replaces rollout+judge with a fixed list of pairs."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __call__(self, idx, metrics):
        metrics["judge/pairs"] = metrics.get("judge/pairs", 0) + len(self.pairs)
        return list(self.pairs)


def some_pairs(tok, n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = tok.apply_chat_template([{"role": "user", "content": f"Prompt {i}"}], add_generation_prompt=True)
        c = Completion([int(t) for t in rng.integers(3, 500, 3 + i)], "c", False)
        r = Completion([int(t) for t in rng.integers(3, 500, 6 - i)], "r", False)
        out.append(Pair(p, f"Prompt {i}", c, r))
    return out


def test_micro_batching_gives_the_same_update_as_one_batch(lora_model, prompt_data_dir):
    model, tok, _ = lora_model
    before = params(model)
    pairs = some_pairs(tok, 4)
    deltas = []
    for mb in (4, 1):
        model.update(
            __import__("mlx.utils", fromlist=["tree_unflatten"]).tree_unflatten(
                [(k, mx.array(v)) for k, v in before.items()]
            )
        )
        t = make_trainer(lora_model, prompt_data_dir, lr=1.0, micro_batch_size=mb)
        t.collect_pairs = FixedPairs(pairs)
        t.step = 1
        m = {}
        loss = t.train_step(m)
        after = params(model)
        deltas.append((loss, {k: after[k] - before[k] for k in before}))
    (l1, d1), (l2, d2) = deltas
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert max(np.abs(d1[k] - d2[k]).max() for k in d1) < 1e-5
    assert max(np.abs(d1[k]).max() for k in d1) > 1e-6  # an update did happen


def test_lr_zero_changes_nothing_and_lr_positive_changes_adapters(lora_model, prompt_data_dir):
    model, tok, _ = lora_model
    t = make_trainer(lora_model, prompt_data_dir, lr=0.0)
    t.collect_pairs = FixedPairs(some_pairs(tok))
    before = params(model)
    t.step = 1
    assert t.train_step({}) is not None
    assert all(np.array_equal(before[k], v) for k, v in params(model).items())
    t2 = make_trainer(lora_model, prompt_data_dir, lr=0.5)
    t2.collect_pairs = FixedPairs(some_pairs(tok))
    t2.step = 1
    t2.train_step({})
    assert any(not np.array_equal(before[k], v) for k, v in params(model).items())


class ScriptedJudge:
    def __init__(self, verdicts):
        self.verdicts = verdicts

    def judge(self, prompts, pairs):
        return [self.verdicts[i % len(self.verdicts)] for i in range(len(pairs))]


def test_invalid_and_tie_verdicts_are_dropped_and_counted(lora_model, prompt_data_dir):
    judge = ScriptedJudge([Verdict.bad("garbage"), Verdict.tied(), Verdict(1), Verdict.bad("x")])
    t = make_trainer(lora_model, prompt_data_dir, judge=judge, batch_size=4)
    m = {}
    t.step = 1
    pairs = t.collect_pairs([0, 1, 2, 3], m)
    assert len(pairs) == 1
    assert (m["judge/pairs"], m["judge/invalid"], m["judge/ties"]) == (4, 2, 1)


def test_a_batch_without_valid_pairs_makes_no_update_and_says_so(lora_model, prompt_data_dir):
    model, _, _ = lora_model
    logs = []
    t = make_trainer(lora_model, prompt_data_dir, judge=ScriptedJudge([Verdict.bad("?")]), lr=1.0)
    t.log = logs.append
    before = params(model)
    t.step = 1
    assert t.train_step({}) is None
    assert all(np.array_equal(before[k], v) for k, v in params(model).items())
    assert any("no valid pair" in line and "no update" in line for line in logs)


def test_missing_eos_penalty_looks_at_eos_and_keeps_invalid_invalid():
    a, b = Completion([1], "a", True), Completion([2], "b", False)
    assert apply_missing_eos_penalty(Verdict(1, 0.6), a, b, 0.5).winner == 0  # b lacked EOS
    assert apply_missing_eos_penalty(Verdict(1, 0.9), a, b, 0.5).winner == 1
    assert apply_missing_eos_penalty(Verdict.bad("?"), a, b, 5.0).invalid
    assert apply_missing_eos_penalty(Verdict(1), a, Completion([2], "b", True), 5.0).winner == 1


def run_loop(lora_model, data_dir, mode, iters, **kw):
    mx.random.seed(0)
    t = make_trainer(lora_model, data_dir, mode=mode, iters=iters, batch_size=4, lr=1e-3, **kw)
    t.opt = optim.Adam(learning_rate=3e-3)
    t.train()
    return t


@pytest.mark.parametrize(
    "mode,kw", [("online_dpo", {}), ("xpo", {"alpha": 1e-4}), ("xpo", {"alpha": 1e-4, "xpo_bonus": "paper"})]
)
def test_the_loop_learns_the_judges_preference(lora_model, prompt_data_dir, mode, kw):
    """A rule judge (more 'e' wins): after 30 steps the policy beats the frozen reference on
    held-out prompts well above chance."""
    model, tok, ad = lora_model
    t = run_loop(lora_model, prompt_data_dir, mode, 40, max_completion_length=16, temperature=1.0, **kw)
    test = load_prompts(prompt_data_dir, "test", tok, 200)
    test = PromptSet(test.ids * 3, test.texts * 3)  # 72 judged pairs: a tighter estimate
    mx.random.seed(123)
    res = t.evaluate(test)
    assert res["invalid"] == 0 and res["pairs"] == len(test)
    assert res["win_rate"] >= 0.65, res
    rows = [json.loads(line) for line in open(os.path.join(ad, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(2, 41, 2))
    for r in train_rows:
        assert 0.0 <= r["rewards/accuracies"] <= 1.0  # a mean, never a running sum
        assert r["judge/pairs"] == 2 * 4  # window of 2 steps x 4 prompts
        assert r["alpha"] == (kw.get("alpha", 0.0))
    assert os.path.isfile(os.path.join(ad, "adapters.safetensors"))


def test_same_seed_same_metrics(lora_model, prompt_data_dir):
    from mlx.utils import tree_unflatten

    model = lora_model[0]
    start = [(k, mx.array(v)) for k, v in params(model).items()]
    out = []
    for _ in range(2):
        model.update(tree_unflatten(start))
        t = run_loop(lora_model, prompt_data_dir, "xpo", 4, alpha=1e-3)
        rows = [json.loads(l) for l in open(os.path.join(t.settings.adapter_path, "metrics.jsonl"))]
        out.append([(r["loss"], r["rewards/margins"]) for r in rows if "loss" in r])
    assert len(out[0]) == 2 and out[0] == out[1]


def test_nonfinite_losses_skip_updates_and_stop_the_run(lora_model, prompt_data_dir, monkeypatch):
    model, tok, ad = lora_model
    logs = []
    t = make_trainer(lora_model, prompt_data_dir, lr=1.0, iters=10, max_nonfinite_steps=3)
    t.log = logs.append
    t.collect_pairs = FixedPairs(some_pairs(tok))
    monkeypatch.setattr(
        trainer_module, "reference_logps", lambda ref, inputs, targets, mask: mx.full(mask.shape, float("nan"))
    )
    before = params(model)
    res = t.train()
    assert res["step"] == 3 and "3 consecutive non-finite" in res["stop_reason"]
    assert all(np.array_equal(before[k], v) for k, v in params(model).items())
    rows = [json.loads(l) for l in open(os.path.join(ad, "metrics.jsonl"))]
    assert sum(r.get("train/nonfinite_steps", 0) for r in rows) == 3
    assert sum("update skipped" in line for line in logs) == 3


def test_entropy_coef_adds_the_token_entropy_bonus(lora_model, prompt_data_dir):
    model, tok, _ = lora_model
    pairs = some_pairs(tok, 2)
    losses = {}
    for coef in (0.0, 0.5):
        t = make_trainer(lora_model, prompt_data_dir, lr=0.0, entropy_coef=coef, micro_batch_size=2)
        t.collect_pairs = FixedPairs(pairs)
        t.step = 1
        losses[coef] = t.train_step({})
    inputs, targets, mask = pack_pairs(pairs)
    from mlx_xpo_plugin.compute.scoring import sequence_logps

    _, counts, ent = sequence_logps(model, inputs, targets, mask, with_entropy=True)
    tok_ent = np.array(ent) / np.array(counts)
    expected = -0.5 * np.mean(0.5 * (tok_ent[:2] + tok_ent[2:]))
    assert losses[0.5] - losses[0.0] == pytest.approx(expected, rel=1e-3)
    assert expected < 0


class FirstWins:
    def judge(self, prompts, pairs):
        return [Verdict(0, 1.0, None) for _ in pairs]


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_the_validation_loss_is_the_configured_loss(lora_model, prompt_data_dir, loss_type, monkeypatch):
    """ipo compares per-token mean log-probs (so long completions do not dominate); the validation
    loss is that same loss on the judged policy-vs-reference pairs."""
    from mlx_xpo_plugin.compute.reference import adapters_off
    from mlx_xpo_plugin.compute.scoring import pack, sequence_logps
    from mlx_xpo_plugin.loop.losses import dpo_loss

    model, tok, _ = lora_model
    rng = np.random.default_rng(1)
    model.update(
        tree_unflatten(
            [
                (k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                for k, v in tree_flatten(model.trainable_parameters())
            ]
        )
    )
    t = make_trainer(
        lora_model, prompt_data_dir, judge=FirstWins(), dpo_cpo_loss_type=loss_type, beta=0.5, batch_size=3
    )
    pairs = some_pairs(tok, n=3)  # chosen (the "policy" side) lengths 3, 4, 5; rejected 6, 5, 4
    monkeypatch.setattr(
        evaluation,
        "sample_policy_and_reference",
        lambda model, tok, ref, ids, cfg: [(p.chosen, p.rejected) for p in pairs],
    )
    res = t.evaluate(PromptSet([p.prompt_ids for p in pairs], [p.prompt_text for p in pairs]))
    inputs, targets, mask = pack(
        [p.prompt_ids for p in pairs] * 2, [p.chosen.tokens for p in pairs] + [p.rejected.tokens for p in pairs]
    )
    model.eval()
    s, n, _ = sequence_logps(model, inputs, targets, mask)
    with adapters_off(model) as base:
        r, _, _ = sequence_logps(base, inputs, targets, mask)
    if loss_type == "ipo":
        s, r = s / n, r / n
    want = float(dpo_loss(s[:3], s[3:], r[:3], r[3:], 0.5, loss_type).mean())
    assert res["wins"] == 3 and res["loss"] == pytest.approx(want, rel=1e-4)


def test_every_pair_marks_ties_and_invalid_verdicts_undecided_and_paper_ties_go_to_the_policy():
    from mlx_xpo_plugin.loop.pairs import every_pair

    prompts = PromptSet([[1], [2], [3]], ["p1", "p2", "p3"])
    pol, ref = Completion([5], "pol", True), Completion([6], "ref", True)
    verdicts = [Verdict.tied(), Verdict.bad("?"), Verdict(1)]
    plain = every_pair(prompts, [(pol, ref, None)] * 3, verdicts)
    assert [p.decided for p in plain] == [False, False, True]
    assert (plain[0].chosen, plain[0].rejected, plain[2].chosen) == (pol, ref, ref)
    paper = every_pair(prompts, [(pol, ref, 1)] * 3, verdicts, ties_to_policy=True)
    assert [p.decided for p in paper] == [True, False, True]  # TRL: policy_score >= ref_score
    assert (paper[0].chosen, paper[0].ref_is_chosen) == (pol, False)
    assert (paper[1].rejected, paper[1].ref_is_chosen) == (ref, False)  # the term finds y_ref
    assert (paper[2].chosen, paper[2].ref_is_chosen) == (ref, True)


@pytest.mark.parametrize("mode,scored", [("online_dpo", 2), ("xpo", 4)])
def test_xpo_scores_every_sampled_pair_online_dpo_the_decided_ones(lora_model, prompt_data_dir, mode, scored):
    judge = ScriptedJudge([Verdict.tied(), Verdict(1), Verdict.bad("x"), Verdict(0)])
    t = make_trainer(lora_model, prompt_data_dir, judge=judge, batch_size=4, mode=mode, alpha=1e-3)
    t.step = 1
    m = {}
    assert t.train_step(m) is not None
    assert (m["pairs/valid"], m["pairs/scored"]) == (2, scored)


def test_an_undecided_pairs_exploration_term_is_applied_over_the_scored_pairs(lora_model, prompt_data_dir):
    """With beta -> 0 only the exploration term moves the weights: a step whose third pair is a
    tie makes the same update as one in which it was decided (the term needs no verdict, and is
    averaged over the 3 scored pairs either way), and not the update of the two decided pairs."""
    model, tok, _ = lora_model
    rng = np.random.default_rng(0)
    start = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in params(model).items()}
    base = some_pairs(tok, 3)
    undecided = Pair(base[2].prompt_ids, base[2].prompt_text, base[2].chosen, base[2].rejected, decided=False)
    deltas = []
    for pairs in (base, base[:2] + [undecided], base[:2]):
        model.update(tree_unflatten([(k, mx.array(v)) for k, v in start.items()]))
        t = make_trainer(lora_model, prompt_data_dir, mode="xpo", alpha=1.0, beta=1e-9, lr=0.1, micro_batch_size=2)
        t.collect_pairs = FixedPairs(pairs)
        t.step = 1
        m = {}
        t.train_step(m)
        deltas.append(np.concatenate([(v - start[k]).ravel() for k, v in params(model).items()]))
    all_decided, one_tie, two_pairs = deltas
    assert np.abs(all_decided).max() > 1e-4
    np.testing.assert_allclose(one_tie, all_decided, rtol=1e-4, atol=1e-6 * np.abs(all_decided).max())
    assert np.abs(two_pairs - all_decided).max() > 1e-2 * np.abs(all_decided).max()


def test_policy_rows_leave_out_the_reference_sample_in_the_paper_form_only():
    flags = mx.array([True, False])  # pair 0: the reference's sample won; pair 1: the policy's
    rows = {}
    for form in ("paper", "kl"):
        s = LoopSettings(iters=1, xpo_bonus=form)
        rows[form] = np.array(XPO(s).policy_rows(flags)).tolist()
    assert rows["paper"] == [False, True, True, False]
    assert rows["kl"] == [True] * 4
    assert np.array(OnlineDPO(LoopSettings(iters=1)).policy_rows(flags)).tolist() == [True] * 4
