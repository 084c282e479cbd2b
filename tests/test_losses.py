"""Every DPO variant and both XPO terms against an independent NumPy computation."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_xpo_plugin.loop.losses import dpo_loss, dpo_scores, reward_stats
from mlx_xpo_plugin.xpo_trainer import xpo_kl_bonus, xpo_kl_upstream, xpo_paper_term


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def reference_numpy(pc, pr, rc, rr, beta, kind, delta):
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -np_logsig(beta * h)
    if kind == "hinge":
        return np.maximum(0, 1 - beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if kind == "dpop":
        return -np_logsig(beta * (h - delta * np.maximum(0, rc - pc)))


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "dpop"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_variants_match_numpy(kind, seed):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-40, 15, 64).astype(np.float32) for _ in range(4))
    beta, delta = float(rng.uniform(0.01, 1.0)), float(rng.uniform(0, 60))
    got = np.array(dpo_loss(*(mx.array(x) for x in (pc, pr, rc, rr)), beta, kind, delta))
    want = reference_numpy(*(x.astype(np.float64) for x in (pc, pr, rc, rr)), beta, kind, delta)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_dpop_penalty_only_when_policy_drops_below_reference():
    pc, pr = mx.array([-10.0, -10.0]), mx.array([-12.0, -12.0])
    rc, rr = mx.array([-12.0, -8.0]), mx.array([-12.0, -12.0])
    plain = np.array(dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid"))
    dpop = np.array(dpo_loss(pc, pr, rc, rr, 0.1, "dpop", delta=5.0))
    assert dpop[0] == pytest.approx(plain[0])  # policy above reference on chosen: no penalty
    assert dpop[1] > plain[1] + 0.5  # 2 nats below reference: penalised


def test_xpo_terms_match_numpy():
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (rng.normal(-30, 5, 16).astype(np.float32) for _ in range(4))
    alpha = 1e-3
    kl = np.array(xpo_kl_upstream(*(mx.array(x) for x in (pc, pr, rc, rr)), alpha))
    np.testing.assert_allclose(kl, alpha * ((pc - rc) + (pr - rr)), rtol=1e-5)
    paper = np.array(xpo_paper_term(mx.array(pc), alpha))
    np.testing.assert_allclose(paper, alpha * pc, rtol=1e-6)


def test_reward_stats():
    pc, pr, rc, rr = (mx.array(v) for v in ([-1.0, -5.0], [-2.0, -1.0], [-1.5, -4.0], [-1.5, -4.0]))
    r = {k: np.array(v) for k, v in reward_stats(pc, pr, rc, rr, 0.5).items()}
    np.testing.assert_allclose(r["rewards/chosen"], [0.25, -0.5])
    np.testing.assert_allclose(r["rewards/rejected"], [-0.25, 1.5])
    np.testing.assert_allclose(r["rewards/accuracies"], [1.0, 0.0])
    np.testing.assert_allclose(r["rewards/margins"], [0.5, -2.0])


def test_unknown_loss_type_is_a_clear_error():
    with pytest.raises(ValueError, match="dpo_cpo_loss_type.*sigmoid, hinge, ipo, dpop"):
        dpo_loss(mx.zeros(1), mx.zeros(1), mx.zeros(1), mx.zeros(1), 0.1, "nope")


def test_kl_bonus_value_is_the_sampled_distributions_kl_estimate_on_token_arrays():
    """The 'kl' form's value is alpha * sum over the pair of s_q - s_ref (q: the distribution
    sampled); without tempered log-probs (T = 1) it is upstream's number."""
    rng = np.random.default_rng(4)
    pol, ref, tmp = (rng.normal(-3, 1, (6, 5)).astype(np.float32) for _ in range(3))
    mask = (rng.uniform(size=(6, 5)) < 0.7).astype(np.float32)
    args = mx.array(pol * mask), mx.array(ref * mask), mx.array(mask), 1e-3
    got = np.array(xpo_kl_bonus(*args, mx.array(tmp * mask)))
    q, s, r = (tmp * mask).sum(-1), (pol * mask).sum(-1), (ref * mask).sum(-1)
    np.testing.assert_allclose(got, 1e-3 * ((q[:3] - r[:3]) + (q[3:] - r[3:])), rtol=1e-5)
    at_one = np.array(xpo_kl_bonus(*args))
    np.testing.assert_allclose(at_one, 1e-3 * ((s[:3] - r[:3]) + (s[3:] - r[3:])), rtol=1e-5)


def test_ipo_reward_metrics_use_the_per_token_means_the_loss_uses():
    """Chosen long and rejected short: the summed margin is positive, the per-token one negative."""
    s, ref, n = mx.array([-8.0, -1.0]), mx.array([-10.0, -2.0]), mx.array([8.0, 1.0])
    pol, rf = dpo_scores(s, ref, n, "ipo")
    acc = float(reward_stats(pol[:1], pol[1:], rf[:1], rf[1:], 0.1)["rewards/accuracies"][0])
    acc_summed = float(reward_stats(s[:1], s[1:], ref[:1], ref[1:], 0.1)["rewards/accuracies"][0])
    assert (acc, acc_summed) == (0.0, 1.0)  # summed: 2 - 1 > 0; per token: 0.25 - 1 < 0


def trl_xpo_losses(model_logps_model, model_logps_ref, ref_logps_ref, ref_logps_model, chosen_mask, beta, alpha, kind):
    """TRL's XPOTrainer._compute_losses written out (trl/trainer/xpo_trainer.py), on summed
    completion log-probs: model_* of the policy, ref_* of the reference, on the policy's sample
    (…_model) and the reference's sample (…_ref); chosen_mask: the policy's sample won."""
    chosen = np.where(chosen_mask, model_logps_model, model_logps_ref) - np.where(
        chosen_mask, ref_logps_model, ref_logps_ref
    )
    rejected = np.where(~chosen_mask, model_logps_model, model_logps_ref) - np.where(
        ~chosen_mask, ref_logps_model, ref_logps_ref
    )
    logits = chosen - rejected
    dpo = -np_logsig(beta * logits) if kind == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    return (dpo + alpha * model_logps_ref).mean()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_paper_form_step_loss_against_trls_formula(lora_model, prompt_data_dir, kind):
    """The paper form's step loss is TRL's XPO loss for sigmoid; for ipo it is TRL's formula on
    per-token mean log-probs (the documented difference: TRL's XPO compares sums)."""
    from mlx.utils import tree_flatten, tree_unflatten
    from test_trainer import FixedPairs, make_trainer, some_pairs

    from mlx_xpo_plugin.compute.reference import Reference
    from mlx_xpo_plugin.compute.scoring import completion_logps
    from mlx_xpo_plugin.loop.pair_loss import pack_pairs
    from mlx_xpo_plugin.loop.pairs import Pair

    model, tok, _ = lora_model
    rng = np.random.default_rng(1)  # adapters away from zero: policy != reference
    model.update(
        tree_unflatten(
            [
                (k, v + mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                for k, v in tree_flatten(model.trainable_parameters())
            ]
        )
    )
    base = some_pairs(tok, 4, seed=3)  # chosen: the policy's sample, rejected: the reference's
    policy_won = np.array([True, False, True, False])
    pairs = [
        Pair(p.prompt_ids, p.prompt_text, *((p.chosen, p.rejected) if w else (p.rejected, p.chosen)), not w)
        for p, w in zip(base, policy_won)
    ]
    beta, alpha = 0.3, 0.05
    t = make_trainer(
        lora_model,
        prompt_data_dir,
        mode="xpo",
        xpo_bonus="paper",
        dpo_cpo_loss_type=kind,
        beta=beta,
        alpha=alpha,
        lr=0.0,
        micro_batch_size=3,
        temperature=0.7,
    )
    t.collect_pairs = FixedPairs(pairs)
    t.step = 1
    m = {}
    t.train_step(m)

    inputs, targets, mask = pack_pairs(base)  # rows: policy samples, then reference samples
    pol = completion_logps(model, inputs, targets, mask)
    with Reference(model).use() as ref_model:
        ref = completion_logps(ref_model, inputs, targets, mask)
    P = len(base)
    s, r, n = (np.array(x, np.float64) for x in (pol.sum, ref.sum, pol.counts))
    args = (s[:P], s[P:], r[P:], r[:P], policy_won, beta, alpha, kind)
    if kind == "sigmoid":
        assert m["loss"] == pytest.approx(trl_xpo_losses(*args), rel=1e-5)
    else:
        means = trl_xpo_losses(s[:P] / n[:P], s[P:] / n[P:], r[P:] / n[P:], r[:P] / n[:P], policy_won, beta, 0.0, kind)
        assert m["loss"] == pytest.approx(means + alpha * s[P:].mean(), rel=1e-5)
        assert abs(m["loss"] - trl_xpo_losses(*args)) > 1e-2  # completions of different lengths
