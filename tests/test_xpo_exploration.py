"""The XPO bonus forms against exact expectations over every completion of a tiny tabular policy.

The policy and the reference are autoregressive tables over a vocabulary of V tokens, token 0 is
EOS, completions have at most two tokens: (EOS) or (y1, y2) with y1 != EOS. Every completion and
every pair of completions is enumerated, so expectations are sums, not samples:

    E[grad bonus] = sum over pairs (y_a, y_b) of q(y_a) q(y_b) grad bonus(y_a, y_b)

with q the sampling distribution (the policy at temperature T). The 'kl' form must give
2 * alpha * grad KL(q || pi_ref); upstream's formula does not (zero at T = 1); the paper form,
alpha * log pi(y_ref) with y_ref ~ pi_ref, must give alpha * sum_y pi_ref(y) grad log pi(y), whose
closed form for softmax tables is alpha * (pi_ref - pi) per context.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_xpo_plugin.xpo_trainer import xpo_kl_bonus, xpo_kl_upstream, xpo_paper_term

V = 4
COMPLETIONS = [(0,)] + [(a, b) for a in range(1, V) for b in range(V)]
TOKENS = mx.array([list(c) + [0] * (2 - len(c)) for c in COMPLETIONS])  # [N, 2]
MASK = mx.array([[1.0] * len(c) + [0.0] * (2 - len(c)) for c in COMPLETIONS])


def tables(seed):
    rng = np.random.default_rng(seed)
    return {
        "first": mx.array(rng.normal(0, 1.5, V).astype(np.float32)),
        "second": mx.array(rng.normal(0, 1.5, (V, V)).astype(np.float32)),
    }


def token_logps(p, temperature=1.0):
    """[N, 2] masked log-probs of every completion's tokens under softmax(logits / T)."""
    lp1 = p["first"] / temperature - mx.logsumexp(p["first"] / temperature)
    rows = p["second"][TOKENS[:, 0]] / temperature
    lp2 = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    first = lp1[TOKENS[:, 0]]
    second = mx.take_along_axis(lp2, TOKENS[:, 1:2], axis=-1).squeeze(-1)
    return mx.stack([first, second], axis=1) * MASK


def all_pairs():
    """Row indices of (a, b) for every ordered pair of completions, as the trainer lays out rows:
    P first completions, then their P partners."""
    idx = list(itertools.product(range(len(COMPLETIONS)), repeat=2))
    a, b = mx.array([i for i, _ in idx]), mx.array([j for _, j in idx])
    return a, b, mx.concatenate([a, b])


def exact_kl_grad(policy, ref, temperature, alpha):
    """grad of 2 * alpha * KL(q || pi_ref), q = the policy at temperature T, by enumeration."""
    ref_lp = token_logps(ref).sum(-1)

    def kl(p):
        lq = token_logps(p, temperature).sum(-1)
        return 2 * alpha * (mx.exp(lq) * (lq - ref_lp)).sum()

    return mx.grad(kl)(policy)


def expected_grad(bonus_of_pairs, policy, temperature):
    """sum over pairs of q(a) q(b) grad bonus(a, b), q the sampling distribution."""
    a, b, _ = all_pairs()
    q = mx.stop_gradient(mx.exp(token_logps(policy, temperature).sum(-1)))
    w = q[a] * q[b]
    return mx.grad(lambda p: (w * bonus_of_pairs(p)).sum())(policy)


def flat(g):
    return np.concatenate([np.array(g["first"]).ravel(), np.array(g["second"]).ravel()])


def kl_form(ref, temperature, alpha, reward_to_go=True):
    _, _, rows = all_pairs()
    ref_tok = token_logps(ref)[rows]

    def bonus(p):
        pol = token_logps(p)[rows]
        sample = token_logps(p, temperature)[rows] if temperature != 1.0 else None
        return xpo_kl_bonus(pol, ref_tok, MASK[rows], alpha, sample, reward_to_go)

    return bonus


def upstream_form(ref, alpha):
    a, b, _ = all_pairs()
    ref_s = token_logps(ref).sum(-1)

    def bonus(p):
        s = token_logps(p).sum(-1)
        return xpo_kl_upstream(s[a], s[b], ref_s[a], ref_s[b], alpha)

    return bonus


@pytest.mark.parametrize("temperature", [1.0, 0.8, 1.3])
@pytest.mark.parametrize("reward_to_go", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_form_expected_gradient_is_the_kl_gradient(temperature, reward_to_go, seed):
    policy, ref, alpha = tables(seed), tables(seed + 100), 0.5
    want = flat(exact_kl_grad(policy, ref, temperature, alpha))
    got = flat(expected_grad(kl_form(ref, temperature, alpha, reward_to_go), policy, temperature))
    assert np.linalg.norm(want) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.linalg.norm(want))


@pytest.mark.parametrize("seed", [0, 1])
def test_upstream_form_expected_gradient_is_zero_at_temperature_one(seed):
    policy, ref, alpha = tables(seed), tables(seed + 100), 0.5
    want = flat(exact_kl_grad(policy, ref, 1.0, alpha))
    got = flat(expected_grad(upstream_form(ref, alpha), policy, 1.0))
    assert np.linalg.norm(got) < 1e-5 * np.linalg.norm(want)  # zero: no exploration in expectation
    assert not np.allclose(got, want, rtol=0.1)


def test_upstream_form_at_another_temperature_is_not_the_kl_gradient():
    policy, ref, alpha = tables(2), tables(102), 0.5
    want = flat(exact_kl_grad(policy, ref, 0.8, alpha))
    got = flat(expected_grad(upstream_form(ref, alpha), policy, 0.8))
    cos = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
    assert np.linalg.norm(got) > 1e-3 and cos < 0.9  # a temperature artefact, not grad KL


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_form_expected_gradient_matches_its_closed_form(seed):
    policy, ref, alpha = tables(seed), tables(seed + 100), 0.5
    p_ref = np.exp(np.array(token_logps(ref).sum(-1)))  # y_ref is sampled from the reference

    def expected_term(p):
        return (mx.array(p_ref) * xpo_paper_term(token_logps(p).sum(-1), alpha)).sum()

    got = flat(mx.grad(expected_term)(policy))
    # closed form: alpha * (pi_ref(.) - pi(.)) for the first token; for the second token after y1,
    # alpha * pi_ref(y1) * (pi_ref(. | y1) - pi(. | y1)) (the EOS row is never reached)
    sm = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    pr1, pp1 = sm(np.array(ref["first"])), sm(np.array(policy["first"]))
    pr2, pp2 = sm(np.array(ref["second"])), sm(np.array(policy["second"]))
    want_first = alpha * (pr1 - pp1)
    want_second = alpha * pr1[:, None] * (pr2 - pp2)
    want_second[0] = 0.0
    np.testing.assert_allclose(got, np.concatenate([want_first, want_second.ravel()]), atol=1e-6)


def test_kl_form_one_token_case():
    """One-token completions (every first token is EOS-free and ends the completion)."""
    rng = np.random.default_rng(7)
    pol_logits = mx.array(rng.normal(0, 2, 6).astype(np.float32))
    ref_lp = mx.array(np.log(np.full(6, 1 / 6)).astype(np.float32))
    alpha = 1.0
    idx = list(itertools.product(range(6), repeat=2))
    a, b = mx.array([i for i, _ in idx]), mx.array([j for _, j in idx])
    rows = mx.concatenate([a, b])

    def lp(x):
        return x - mx.logsumexp(x)

    q = mx.stop_gradient(mx.exp(lp(pol_logits)))
    w = q[a] * q[b]
    mask = mx.ones((rows.shape[0], 1))

    def kl_bonus(x):
        tok = lp(x)[rows][:, None]
        return (w * xpo_kl_bonus(tok, ref_lp[rows][:, None], mask, alpha)).sum()

    def upstream_bonus(x):
        s = lp(x)
        return (w * xpo_kl_upstream(s[a], s[b], ref_lp[a], ref_lp[b], alpha)).sum()

    def exact(x):
        return 2 * alpha * (mx.exp(lp(x)) * (lp(x) - ref_lp)).sum()

    want = np.array(mx.grad(exact)(pol_logits))
    np.testing.assert_allclose(np.array(mx.grad(kl_bonus)(pol_logits)), want, rtol=1e-4, atol=1e-6)
    assert np.abs(np.array(mx.grad(upstream_bonus)(pol_logits))).max() < 1e-5 * np.abs(want).max()


def test_tempered_scores_are_log_softmax_of_logits_over_temperature(tiny_model):
    from mlx_xpo_plugin.compute.scoring import completion_logps, pack

    model, _ = tiny_model
    inputs, targets, mask = pack([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]])
    sc = completion_logps(model, inputs, targets, mask, temperature=0.7, start=0)
    logits = np.array(model(inputs)).astype(np.float64) / 0.7
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = np.take_along_axis(logp, np.array(targets)[..., None], -1)[..., 0] * np.array(mask)
    np.testing.assert_allclose(np.array(sc.tempered), want, atol=2e-5)
    assert completion_logps(model, inputs, targets, mask, temperature=1.0).tempered is None


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_trainer_kl_forms_report_what_they_estimate_and_differ_in_the_update(lora_model, prompt_data_dir, temperature):
    from mlx.utils import tree_unflatten
    from test_trainer import FixedPairs, make_trainer, params, some_pairs

    model, tok, _ = lora_model
    start = params(model)
    rng = np.random.default_rng(0)  # adapters away from zero, so policy != reference
    start = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in start.items()}
    res = {}
    for form in ("kl", "kl_upstream"):
        model.update(tree_unflatten([(k, mx.array(v)) for k, v in start.items()]))
        t = make_trainer(
            lora_model,
            prompt_data_dir,
            mode="xpo",
            alpha=1.0,
            xpo_bonus=form,
            lr=0.1,
            micro_batch_size=4,
            max_completion_length=8,
            temperature=temperature,
        )
        t.collect_pairs = FixedPairs(some_pairs(tok))
        t.step = 1
        m = {}
        loss = t.train_step(m)
        res[form] = (loss, m["exploration_bonus"], params(model), m)
    (l1, b1, p1, m1), (l2, b2, p2, m2) = res["kl"], res["kl_upstream"]
    # the 'kl' bonus is 2 alpha times the sampled distribution's KL estimate, upstream's 2 alpha
    # times the untempered log-ratio; the same number at temperature 1
    assert b1 == pytest.approx(2 * m1["objective/kl"], rel=1e-5) and b1 != 0
    assert b2 == pytest.approx(2 * m2["objective/log_ratio"], rel=1e-5)
    if temperature == 1.0:
        assert l1 == pytest.approx(l2, rel=1e-5) and b1 == pytest.approx(b2, rel=1e-5)
        assert m1["objective/kl"] == pytest.approx(m1["objective/log_ratio"], rel=1e-6)
    else:
        assert abs(m1["objective/kl"] - m1["objective/log_ratio"]) > 1e-3
    assert max(np.abs(p1[k] - p2[k]).max() for k in p1) > 1e-4


# ---------------------------------------------------------------- ties, and what is logged


def exact_kl(policy, ref, temperature):
    lq, lr = token_logps(policy, temperature).sum(-1), token_logps(ref).sum(-1)
    return float((mx.exp(lq) * (lq - lr)).sum())


def step_expected_grad(policy, ref, temperature, alpha, tied, accounting):
    """E[grad of a step's exploration loss] for steps of two independent sampled pairs, every
    combination of pairs enumerated. ``tied`` [pairs] marks the pairs the judge ties; a step in
    which both pairs tie makes no update. 'scored': the trainer's accounting (pair_loss.total:
    the term over every scored pair / the scored pairs); 'decided': the term over the decided
    pairs only / the decided pairs (what a loop that drops ties before scoring computes)."""
    from mlx_xpo_plugin.loop.pair_loss import PairLoss, total

    a, b, _ = all_pairs()
    n = a.shape[0]
    q = mx.stop_gradient(mx.exp(token_logps(policy, temperature).sum(-1)))
    w = q[a] * q[b]
    i, j = (mx.array(x.ravel()) for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    idx = mx.concatenate([i, j])  # the step's two pairs, first then second
    decided = mx.logical_not(mx.array(tied))[idx]
    n_decided = decided[: i.shape[0]].astype(mx.float32) + decided[i.shape[0] :].astype(mx.float32)
    n_decided = mx.concatenate([n_decided, n_decided])
    weight = mx.concatenate([w[i] * w[j]] * 2) * (n_decided > 0)  # no update without a decided pair
    bonus = kl_form(ref, temperature, alpha)

    def loss(p):
        x = -bonus(p)[idx]  # the exploration term added to the loss
        zeros = mx.zeros(x.shape)
        if accounting == "scored":
            res = PairLoss(zeros, x, None, None, None, None, decided)
            share = total(res, 0.0, mx.maximum(n_decided, 1.0), 2.0)
        else:
            share = mx.where(decided, x, 0.0) / mx.maximum(n_decided, 1.0)
        return (weight * share).sum()

    return flat(mx.grad(loss)(policy))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_term_expected_gradient_is_unchanged_when_the_judge_ties_identical_completions(temperature):
    """A judge that ties identical completions removes pairs whose bonus gradient is zero: the
    term over every scored pair keeps E[grad] = -2 alpha grad KL; over the decided pairs only it
    is inflated by 1 / P(decided)."""
    policy, ref, alpha = tables(3), tables(103), 0.5
    a, b, _ = all_pairs()
    identical = np.array(a) == np.array(b)
    want = -flat(exact_kl_grad(policy, ref, temperature, alpha))
    never = np.zeros_like(identical)
    got_no_ties = step_expected_grad(policy, ref, temperature, alpha, never, "scored")
    got_ties = step_expected_grad(policy, ref, temperature, alpha, identical, "scored")
    np.testing.assert_allclose(got_no_ties, want, rtol=1e-4, atol=1e-5 * np.linalg.norm(want))
    np.testing.assert_allclose(got_ties, want, rtol=1e-4, atol=1e-5 * np.linalg.norm(want))
    dropped = step_expected_grad(policy, ref, temperature, alpha, identical, "decided")
    q = np.exp(np.array(token_logps(policy, temperature).sum(-1)))
    assert (q**2).sum() > 0.1  # ties are frequent in this toy
    assert np.linalg.norm(dropped) > 1.05 * np.linalg.norm(want)


def test_kl_bonus_value_is_an_unbiased_estimate_of_the_sampled_kl():
    """E over sampled pairs of the 'kl' bonus = 2 alpha KL(q_T || pi_ref) at T = 0.7."""
    policy, ref, alpha, T = tables(4), tables(104), 0.5, 0.7
    a, b, _ = all_pairs()
    q = mx.exp(token_logps(policy, T).sum(-1))
    value = (q[a] * q[b] * kl_form(ref, T, alpha)(policy)).sum().item()
    assert value == pytest.approx(2 * alpha * exact_kl(policy, ref, T), rel=1e-4)


def test_logged_kl_and_entropy_are_those_of_the_distribution_sampled():
    """At T = 0.7: E[objective/kl] = KL(q_T || pi_ref) and E[objective/entropy] = H(q_T), exactly,
    for the two-policy-sample forms and for the paper form (policy sample vs reference sample);
    objective/log_ratio keeps E_q[s_theta - s_ref], neither of those KLs."""
    from mlx_xpo_plugin.loop.pair_loss import PairLoss, objective_terms

    policy, ref, T = tables(5), tables(105), 0.7
    a, b, rows = all_pairs()
    P = a.shape[0]
    lq, lp, lr = token_logps(policy, T).sum(-1), token_logps(policy).sum(-1), token_logps(ref).sum(-1)
    q, p_ref = np.exp(np.array(lq)), np.exp(np.array(lr))
    kl_t, h_t, kl_1 = exact_kl(policy, ref, T), float(-(q * np.array(lq)).sum()), exact_kl(policy, ref, 1.0)
    res = PairLoss(mx.zeros(P), mx.zeros(P), lp[rows], lr[rows], mx.ones(2 * P), None, None, lq[rows])
    terms = objective_terms(res)
    w = q[np.array(a)] * q[np.array(b)]
    assert (w * terms["objective/kl"]).sum() == pytest.approx(kl_t, rel=1e-5)
    assert (w * terms["objective/entropy"]).sum() == pytest.approx(h_t, rel=1e-5)
    log_ratio = (w * terms["objective/log_ratio"]).sum()
    assert log_ratio == pytest.approx(float((q * np.array(lp - lr)).sum()), rel=1e-5)
    assert abs(log_ratio - kl_t) > 0.05 and abs(kl_1 - kl_t) > 0.05  # three different numbers
    # paper form: row 2 of each pair is the reference's sample (weight pi_ref), not counted
    from_policy = mx.concatenate([mx.ones(P, dtype=mx.bool_), mx.zeros(P, dtype=mx.bool_)])
    terms = objective_terms(res._replace(from_policy=from_policy))
    w = q[np.array(a)] * p_ref[np.array(b)]
    assert (w * terms["objective/kl"]).sum() == pytest.approx(kl_t, rel=1e-5)
    assert (w * terms["objective/entropy"]).sum() == pytest.approx(h_t, rel=1e-5)


def test_upstream_form_direction_at_another_temperature_depends_on_the_model():
    """At T = 0.7 upstream's expected bonus gradient, E_q[grad s_theta], points along grad KL on
    one tiny model and against it on another: a bias, not an exploration term."""
    cos = []
    for seed in (0, 4):
        policy, ref, alpha = tables(seed), tables(seed + 100), 0.5
        want = flat(exact_kl_grad(policy, ref, 0.7, alpha))
        got = flat(expected_grad(upstream_form(ref, alpha), policy, 0.7))
        cos.append(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cos[0] < -0.5 and cos[1] > 0.9
