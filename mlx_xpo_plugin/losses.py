"""DPO variants and the XPO term, as pure functions of arrays.

Notation, per pair: s_theta(y), s_ref(y) = summed completion log-probs under the policy and the
reference (mean over completion tokens for ipo); r(y) = s_theta(y) - s_ref(y);
h = r(y_chosen) - r(y_rejected).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "dpop")


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid",
             delta: float = 50.0) -> mx.array:
    """Per-pair DPO loss.

    - sigmoid: -log sigmoid(beta * h)
    - hinge:   max(0, 1 - beta * h)
    - ipo:     (h - 1 / (2 beta))^2          (Azar et al. 2023; pass length-normalised s)
    - dpop:    -log sigmoid(beta * (h - delta * max(0, s_ref(y_c) - s_theta(y_c))))
               (Pal et al. 2024, "Smaug": the penalty inside the sigmoid)
    """
    h = (pol_c - ref_c) - (pol_r - ref_r)
    if loss_type == "sigmoid":
        return nn.softplus(-beta * h)  # = -log sigmoid(beta h), stable for large |h|
    if loss_type == "hinge":
        return mx.maximum(0.0, 1.0 - beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "dpop":
        penalty = mx.maximum(0.0, ref_c - pol_c)
        return nn.softplus(-beta * (h - delta * penalty))
    raise ValueError(f"dpo_cpo_loss_type: {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def xpo_kl_bonus(pol_tok, ref_tok, mask, alpha: float, sample_tok=None,
                 reward_to_go: bool = True) -> mx.array:
    """Per-pair exploration bonus of the 'kl' form (subtracted from the loss).

    Token arrays are [2P, T] with rows = P chosen completions, then their P rejected partners;
    ``mask`` marks completion tokens. With l_theta, l_ref the per-token log-probs of the policy and
    the reference, and l_q those of the distribution the completions were sampled from
    (``sample_tok``: the policy at the sampling temperature; ``pol_tok`` when None):

    value     bonus = alpha * (KL^(y_c) + KL^(y_r)),   KL^(y) = sum_t l_theta(y_t) - l_ref(y_t)
    gradient  alpha * sum_{i in (c, r)} sum_t (G_i(t) - G_j(t)) * grad l_q(y_i,t)
              G_i(t) = sum_{t' >= t} l_q(y_i,t') - l_ref(y_i,t')     (reward-to-go; with
              ``reward_to_go=False`` the whole-sequence sum), j = the pair's other completion.

    For two independent samples y_c, y_r of q_theta this is the score-function (REINFORCE)
    estimator of 2 * alpha * grad KL(q_theta || pi_ref) with the other sample's return as a
    leave-one-out baseline: unbiased, since E_y[grad log q_theta(y)] = 0 and the baseline does
    not depend on y_i. At temperature 1, q_theta = pi_theta. The value is the single-sample KL
    estimate as before (what ``objective/kl`` and ``exploration_bonus`` report); only the
    gradient differs from :func:`xpo_kl_upstream`, whose gradient alpha * grad s_theta(y) has
    zero mean at temperature 1.
    """
    sg = mx.stop_gradient
    q = pol_tok if sample_tok is None else sample_tok
    P = pol_tok.shape[0] // 2
    value = (sg(pol_tok - ref_tok) * mask).sum(axis=-1)
    d = sg(q - ref_tok) * mask
    if reward_to_go:
        ret = mx.cumsum(d, axis=-1, reverse=True)
    else:
        ret = mx.broadcast_to(d.sum(axis=-1, keepdims=True), d.shape)
    baseline = mx.concatenate([ret[P:], ret[:P]], axis=0)
    surrogate = (sg(ret - baseline) * (q - sg(q)) * mask).sum(axis=-1)  # value 0, gradient as above
    per_row = value + surrogate
    return alpha * (per_row[:P] + per_row[P:])


def xpo_kl_upstream(pol_c, pol_r, ref_c, ref_r, alpha: float) -> mx.array:
    """Per-pair exploration bonus as mlx-lm-lora's XPO trainer computes it (subtracted from the
    loss): alpha * (KL^(chosen) + KL^(rejected)), KL^(y) = s_theta(y) - s_ref(y), differentiated
    as written. Its gradient, alpha * (grad s_theta(y_c) + grad s_theta(y_r)), is a score function
    at samples of the policy: zero in expectation at temperature 1, so it adds noise, not
    exploration (at other temperatures it has a temperature-dependent bias instead).
    """
    return alpha * ((pol_c - ref_c) + (pol_r - ref_r))


def xpo_paper_term(pol_yref, alpha: float) -> mx.array:
    """Per-pair XPO term of the paper / TRL form (added to the loss): alpha * log pi_theta(y_ref|x),
    where y_ref is the completion sampled from the reference."""
    return alpha * pol_yref


def dpo_scores(s, ref_s, counts, loss_type: str):
    """The sequence scores the DPO loss (and its reward metrics) compare: the summed completion
    log-probs, or for ipo their per-token means s / n (``counts`` n >= 1)."""
    if loss_type == "ipo":
        return s / counts, ref_s / counts
    return s, ref_s


def reward_stats(pol_c, pol_r, ref_c, ref_r, beta: float) -> dict:
    """Implicit DPO rewards: rewards/chosen = beta * r(y_c), rewards/rejected = beta * r(y_r),
    on the scores the loss compares (:func:`dpo_scores`: per-token means for ipo)."""
    rc = beta * (pol_c - ref_c)
    rr = beta * (pol_r - ref_r)
    return {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
            "rewards/accuracies": (rc > rr).astype(mx.float32)}
