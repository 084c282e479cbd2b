"""DPO variants, as pure functions of arrays (XPO's exploration terms are in xpo_trainer.py).

Notation, per pair: s_theta(y), s_ref(y) = summed completion log-probs under the policy and the
reference (mean over completion tokens for ipo); r(y) = s_theta(y) - s_ref(y);
h = r(y_chosen) - r(y_rejected).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "dpop")


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid", delta: float = 50.0) -> mx.array:
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
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).astype(mx.float32),
    }
