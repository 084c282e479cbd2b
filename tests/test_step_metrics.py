"""Numbers that mean what their names say: judge metrics over micro-batches, ipo reward metrics,
the schedule's epoch, sampling filters and the missing-EOS confidence."""

import types
from fractions import Fraction

import mlx.core as mx
import numpy as np
import pytest
from test_trainer import FixedPairs, make_trainer, some_pairs

from mlx_xpo_plugin.commands.runner import plan_steps
from mlx_xpo_plugin.compute.rollout import Completion, SamplingConfig, sample_completions
from mlx_xpo_plugin.contracts import Verdict
from mlx_xpo_plugin.loop.metrics import MetricsWindow, merge_step_metrics
from mlx_xpo_plugin.loop.pair_loss import PairLoss, pair_metrics
from mlx_xpo_plugin.loop.pairs import apply_missing_eos_penalty
from mlx_xpo_plugin.loop.prompts import PromptOrder, PromptSet
from mlx_xpo_plugin.loop.schedule import get_current_alpha


class CallScriptedJudge:
    """Call k returns the verdicts and last_metrics of script[k]."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def judge(self, prompts, pairs):
        verdicts, self.last_metrics = self.script[self.calls % len(self.script)]
        self.calls += 1
        return verdicts[: len(pairs)]


def test_judge_ratios_are_averaged_over_accumulation_micro_batches(lora_model, prompt_data_dir):
    scored = lambda a, b: Verdict(0, None, None, False, (a, b))  # noqa: E731
    judge = CallScriptedJudge(
        [
            (
                [scored(1.0, 0.0), scored(0.5, 0.0)],  # margins 1.0, 0.5
                {"judge/position_consistency": 1.0, "judge/both_orders_valid": 2},
            ),
            (
                [scored(0.0, 0.25), Verdict.bad("?")],  # margin 0.25 on the one scored pair
                {"judge/position_consistency": 0.0, "judge/both_orders_valid": 1},
            ),
        ]
    )
    t = make_trainer(lora_model, prompt_data_dir, judge=judge, batch_size=2, gradient_accumulation_steps=2, lr=0.0)
    t.step = 1
    m = {}
    t.train_step(m)
    assert judge.calls == 2
    assert m["objective/scores_margin"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert m["judge/position_consistency"] == pytest.approx(2 / 3)
    assert (m["judge/pairs"], m["judge/invalid"], m["judge/both_orders_valid"]) == (4, 1, 3)


def test_judge_ratios_are_weighted_by_their_counts_over_a_report_window():
    w = MetricsWindow()
    w.add({"judge/position_consistency": 1.0, "judge/both_orders_valid": 3})
    w.add({"judge/position_consistency": 0.0, "judge/both_orders_valid": 1})
    out = w.report()
    assert out["judge/position_consistency"] == pytest.approx(0.75)
    assert out["judge/both_orders_valid"] == 4


def test_merge_of_a_ratio_without_earlier_value_takes_the_new_one():
    m = merge_step_metrics({}, {"objective/scores_margin": 0.3, "judge/scored_pairs": 2})
    assert m == {"objective/scores_margin": 0.3, "judge/scored_pairs": 2}


def test_ipo_reward_metrics_are_on_per_token_means():
    """A chosen 8-token completion 2 nats above the reference and a 1-token rejected one 1 nat
    above it: the summed margin is positive, the per-token margin (what ipo compares) negative."""
    s, ref_s, counts = mx.array([-8.0, -1.0]), mx.array([-10.0, -2.0]), mx.array([8.0, 1.0])
    m = pair_metrics([PairLoss(mx.zeros(1), mx.zeros(1), s, ref_s, counts, None)], 0.1, "ipo")
    assert m["rewards/accuracies"] == 0.0
    assert m["rewards/margins"] == pytest.approx(0.1 * (0.25 - 1.0))


def test_schedule_follows_the_data_epoch_when_prompts_do_not_divide(lora_model, prompt_data_dir):
    """10 prompts, 3 per step: step 8 starts at prompt 21, in the third pass over the data."""
    model, tok, _ = lora_model
    t = make_trainer(
        lora_model, prompt_data_dir, mode="xpo", batch_size=3, lr=0.0, alpha=[0.0, 1.0, 2.0, 3.0], iters=12
    )
    t.train_set = PromptSet(t.train_set.ids[:10], t.train_set.texts[:10])
    t.order = PromptOrder(10, seed=0, batch_size=3)
    t.collect_pairs = FixedPairs(some_pairs(tok, 1))
    alphas = []
    for step in range(1, 9):
        t.step = step
        first = t.order.position
        m = {}
        t.train_step(m)
        alphas.append((first // 10, m["alpha"]))
    assert [a for _, a in alphas] == [float(e) for e, _ in alphas]
    assert alphas[-1] == (2, 2.0)


def test_steps_per_epoch_count_every_process_of_a_launch_group():
    cfg = types.SimpleNamespace(batch_size=2, gradient_accumulation_steps=3, iters=None, epochs=2)
    assert plan_steps(cfg, 60, world=1) == (20, 10, 6)
    assert plan_steps(cfg, 60, world=2) == (10, 5, 12)


def test_top_k_at_least_the_vocabulary_means_off(lora_model):
    model, tok, _ = lora_model
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    out = []
    for k in (0, 100_000):
        mx.random.seed(5)
        out.append(
            [
                c.tokens
                for c in sample_completions(
                    model, tok, [prompt], 2, SamplingConfig(max_tokens=6, temperature=1.0, top_k=k)
                )[0]
            ]
        )
    assert out[0] == out[1]


def test_a_winner_flipped_by_the_missing_eos_penalty_flips_the_confidence():
    a, b = Completion([1], "a", True), Completion([2], "b", False)
    flipped = apply_missing_eos_penalty(Verdict(1, 0.6), a, b, 0.5)
    assert (flipped.winner, flipped.confidence) == (0, pytest.approx(0.4))
    kept = apply_missing_eos_penalty(Verdict(1, 0.9), a, b, 0.5)
    assert (kept.winner, kept.confidence) == (1, 0.9)


@pytest.mark.parametrize("value", [np.float32(1e-4), np.float64(1e-4), np.int64(2), np.array(3e-4)])
def test_get_current_alpha_accepts_numpy_scalars(value):
    assert get_current_alpha(5, 10, value) == pytest.approx(float(value))
    assert get_current_alpha(5, 10, [value, value], steps_per_epoch=2) == pytest.approx(float(value))


@pytest.mark.parametrize(
    "n_prompts,batch,world,accum", [(10, 3, 1, 1), (12, 3, 1, 1), (10, 2, 1, 2), (7, 2, 2, 1), (11, 1, 3, 2)]
)
def test_trainer_schedule_is_get_current_alpha_with_prompts_per_step(
    lora_model, prompt_data_dir, n_prompts, batch, world, accum
):
    """At every step the trainer's (beta, alpha) is get_current_alpha(step, total, schedule,
    prompts / prompts per step), with a float and a Fraction alike, and it is the value of the
    data epoch of the step's first prompt (processes simulated by the data order's stride)."""
    sched, betas = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 0.25, 0.125]
    t = make_trainer(
        lora_model,
        prompt_data_dir,
        mode="xpo",
        batch_size=batch,
        gradient_accumulation_steps=accum,
        alpha=sched,
        beta=betas,
        iters=30,
    )
    t.train_set = PromptSet(t.train_set.ids[:n_prompts], t.train_set.texts[:n_prompts])
    t.world = world
    t.order = PromptOrder(n_prompts, seed=0, batch_size=batch, rank=0, world=world, state=t.state)
    per_step = batch * world * accum
    for step in range(1, 31):
        t.step = step
        t.order.begin_step()
        first = t.order.position
        for _ in range(accum):
            t.order.take()
        beta, alpha = t.schedule()
        for spe in (n_prompts / per_step, Fraction(n_prompts, per_step)):
            assert alpha == get_current_alpha(step, 30, sched, spe)
            assert beta == get_current_alpha(step, 30, betas, spe)
        assert alpha == float(min(first // n_prompts, 5))


def test_logged_alpha_is_get_current_alpha_at_every_step(lora_model, prompt_data_dir):
    model, tok, _ = lora_model
    sched = [0.0, 1.0, 2.0, 3.0]
    t = make_trainer(
        lora_model,
        prompt_data_dir,
        mode="xpo",
        batch_size=2,
        gradient_accumulation_steps=2,
        lr=0.0,
        alpha=sched,
        iters=9,
    )
    t.train_set = PromptSet(t.train_set.ids[:10], t.train_set.texts[:10])
    t.order = PromptOrder(10, seed=0, batch_size=2, state=t.state)
    t.collect_pairs = FixedPairs(some_pairs(tok, 1))
    for step in range(1, 10):
        t.step = step
        m = {}
        t.train_step(m)
        assert (
            m["alpha"] == get_current_alpha(step, 9, sched, 10 / 4) == get_current_alpha(step, 9, sched, Fraction(5, 2))
        )


def test_a_judges_label_mass_is_a_mean_over_micro_batches_and_steps_not_a_sum():
    m = merge_step_metrics({}, {"judge/label_mass": 0.9, "judge/pairs": 2})
    merge_step_metrics(m, {"judge/label_mass": 0.6, "judge/pairs": 1})
    assert m["judge/label_mass"] == pytest.approx(0.8)
    w = MetricsWindow()
    w.add(m)
    w.add({"judge/label_mass": 0.2, "judge/pairs": 1})
    assert w.report()["judge/label_mass"] == pytest.approx((0.8 * 3 + 0.2) / 4)


def test_exploration_metrics_are_weighted_by_the_scored_pairs_over_a_window():
    w = MetricsWindow()
    w.add({"objective/kl": 1.0, "loss/xpo": -2.0, "pairs/scored": 3, "pairs/valid": 1})
    w.add({"objective/kl": 5.0, "loss/xpo": 2.0, "pairs/scored": 1, "pairs/valid": 1})
    out = w.report()
    assert out["objective/kl"] == pytest.approx(2.0) and out["loss/xpo"] == pytest.approx(-1.0)
    assert (out["pairs/scored"], out["pairs/valid"]) == (4, 2)


@pytest.mark.parametrize("mode,form", [("online_dpo", "kl"), ("xpo", "paper")])
def test_logged_kl_and_entropy_at_temperature_07_use_the_tempered_policy(lora_model, prompt_data_dir, mode, form):
    """objective/kl = mean over the policy's samples of s_q - s_ref with q = softmax(logits / 0.7),
    objective/entropy = mean of -s_q, objective/log_ratio = mean of s_theta - s_ref; in the paper
    form the reference's sample (here: every pair's second completion) is left out."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_xpo_plugin.compute.reference import Reference
    from mlx_xpo_plugin.compute.scoring import completion_logps
    from mlx_xpo_plugin.loop.pair_loss import pack_pairs
    from mlx_xpo_plugin.loop.pairs import Pair

    model, tok, _ = lora_model
    rng = np.random.default_rng(2)
    flat = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, v + mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))) for k, v in flat]))
    pairs = [
        Pair(p.prompt_ids, p.prompt_text, p.chosen, p.rejected, False if form == "paper" else None)
        for p in some_pairs(tok, 3)
    ]
    t = make_trainer(lora_model, prompt_data_dir, mode=mode, xpo_bonus=form, alpha=0.1, lr=0.0, temperature=0.7)
    t.collect_pairs = FixedPairs(pairs)
    t.step = 1
    m = {}
    t.train_step(m)
    inputs, targets, mask = pack_pairs(pairs)
    sc = completion_logps(model, inputs, targets, mask, temperature=0.7)
    with Reference(model).use() as ref_model:
        ref = np.array(completion_logps(ref_model, inputs, targets, mask).sum)
    s_q, s = np.array(sc.tempered.sum(-1)), np.array(sc.sum)
    rows = slice(0, 3) if form == "paper" else slice(0, 6)  # paper: rows 3-5 are y_ref
    assert m["objective/kl"] == pytest.approx((s_q - ref)[rows].mean(), rel=1e-4)
    assert m["objective/entropy"] == pytest.approx(-s_q[rows].mean(), rel=1e-4)
    assert m["objective/log_ratio"] == pytest.approx((s - ref)[rows].mean(), rel=1e-4)
    assert abs(m["objective/kl"] - m["objective/log_ratio"]) > 1e-2
