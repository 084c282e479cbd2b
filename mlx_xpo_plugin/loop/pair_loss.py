"""The loss of a micro-batch of sampled pairs, shared by training and evaluation.

Rows are laid out as the P first completions (the chosen one of a decided pair), then their P
partners. The step's loss, over the D decided pairs and the N sampled pairs that were scored
(all processes together; N = D for online DPO, every sampled pair for XPO):

    loss = (1/D) sum_{decided} [L_DPO - entropy_coef * (H(y_c) + H(y_r)) / 2] + (1/N) sum_{scored} X

with L_DPO from losses.dpo_loss, X the method's exploration term (0 for online DPO; see
xpo_trainer.py), which needs no verdict, and H the mean token entropy of a completion (only when
entropy_coef > 0). A tie or an invalid verdict removes a pair from the first sum only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.compute.scoring import completion_logps, pack
from mlx_xpo_plugin.loop.losses import dpo_loss, dpo_scores, reward_stats


class PairLoss(NamedTuple):
    """Per-pair terms [P] and per-row scores [2P] of one micro-batch."""

    dpo: mx.array
    exploration: mx.array  # added to the loss
    policy: mx.array  # s_theta(y): summed completion log-probs
    reference: mx.array  # s_ref(y)
    counts: mx.array  # completion tokens, at least 1
    entropy: Optional[mx.array]  # summed token entropies, when asked for
    decided: Optional[mx.array] = None  # [P] bool: the pair has a winner (None: every pair)
    sampled: Optional[mx.array] = None  # [2P] s_q(y): log-prob under the distribution sampled
    from_policy: Optional[mx.array] = None  # [2P] bool: the row is a policy sample (None: all)

    @property
    def pairs(self) -> int:
        return self.dpo.shape[0]


def pack_pairs(pairs) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, completion mask) of the rows chosen..., rejected..."""
    return pack(
        [p.prompt_ids for p in pairs] * 2,
        [p.chosen.tokens for p in pairs] + [p.rejected.tokens for p in pairs],
        pad_id=0,
    )


def reference_logps(reference, inputs, targets, mask) -> mx.array:
    """Per-token completion log-probs of the reference ([2P, T], no gradient)."""
    with reference.use() as ref_model:
        tok = completion_logps(ref_model, inputs, targets, mask, forward_only=True).tokens
        mx.eval(tok)
    return mx.stop_gradient(tok)


def pair_loss(
    model, inputs, targets, mask, ref_tok, ref_is_chosen, method, settings, beta: float, alpha: float, decided=None
) -> PairLoss:
    """The loss terms of one micro-batch (differentiable in the model's trainable parameters).
    ``decided`` [P] marks the pairs with a winner (default: all). The policy's log-probs at the
    sampling temperature are scored too (for the 'kl' term and the metrics)."""
    entropy_coef = settings.entropy_coef
    sc = completion_logps(model, inputs, targets, mask, with_entropy=entropy_coef > 0, temperature=settings.temperature)
    s, ref_s = sc.sum, ref_tok.sum(axis=-1)
    P = s.shape[0] // 2
    counts = mx.maximum(sc.counts, 1.0)
    pol, ref = dpo_scores(s, ref_s, counts, settings.dpo_cpo_loss_type)
    l_dpo = dpo_loss(pol[:P], pol[P:], ref[:P], ref[P:], beta, settings.dpo_cpo_loss_type, settings.delta)
    x = method.exploration_term(sc, ref_tok, ref_is_chosen, alpha)
    sampled = s if sc.tempered is None else sc.tempered.sum(axis=-1)
    if decided is None:
        decided = mx.ones((P,), dtype=mx.bool_)
    from_policy = method.policy_rows(ref_is_chosen)
    return PairLoss(l_dpo, x, s, ref_s, counts, sc.entropy, decided, mx.stop_gradient(sampled), from_policy)


def total(res: PairLoss, entropy_coef: float, dpo_pairs: float, scored_pairs: float) -> mx.array:
    """Each pair's share of the step's loss (see the module docstring): the decided pairs' DPO
    (and entropy) terms over ``dpo_pairs``, every pair's exploration term over ``scored_pairs``."""
    dpo = res.dpo
    if entropy_coef > 0:
        tok_ent = res.entropy / res.counts
        P = res.pairs
        dpo = dpo - entropy_coef * 0.5 * (tok_ent[:P] + tok_ent[P:])
    decided = res.decided if res.decided is not None else mx.ones(dpo.shape, dtype=mx.bool_)
    return mx.where(decided, dpo, 0.0) / dpo_pairs + res.exploration / scored_pairs


def objective_terms(r: PairLoss) -> dict:
    """Per pair [P], the mean over its rows sampled from the policy (both rows, or the policy
    sample of the paper form) of, with s_q the log-prob under the distribution sampled (the
    policy at the sampling temperature T; s_theta at T = 1 or 0):

        objective/kl         s_q(y) - s_ref(y)       its mean estimates KL(q_T || pi_ref)
        objective/entropy    -s_q(y)                 its mean estimates the entropy of q_T
        objective/log_ratio  s_theta(y) - s_ref(y)   untempered (= objective/kl at T = 1)
    """
    P = r.pairs
    rows = np.ones(2 * P) if r.from_policy is None else np.array(r.from_policy).astype(np.float64)
    weight = np.maximum(rows[:P] + rows[P:], 1.0)
    sampled = np.array(r.policy if r.sampled is None else r.sampled, np.float64)
    out = {}
    for name, per_row in (
        ("objective/kl", sampled - np.array(r.reference, np.float64)),
        ("objective/entropy", -sampled),
        ("objective/log_ratio", np.array(r.policy - r.reference, np.float64)),
    ):
        w = rows * per_row
        out[name] = (w[:P] + w[P:]) / weight
    return out


def pair_metrics(results: list[PairLoss], beta: float, loss_type: str) -> dict:
    """Means over the pairs of the step. Over the decided pairs: ``loss/dpo``, the implicit
    rewards (on the scores the loss compares) and ``logps/*``. Over every scored pair:
    ``loss/xpo``, ``exploration_bonus`` (= -loss/xpo) and the :func:`objective_terms`."""
    cols: dict = {}

    def add(k, v):
        cols.setdefault(k, []).append(np.array(v))

    for r in results:
        P = r.pairs
        dec = np.ones(P, bool) if r.decided is None else np.array(r.decided).astype(bool)
        pol, ref = dpo_scores(r.policy, r.reference, r.counts, loss_type)
        for k, v in reward_stats(pol[:P], pol[P:], ref[:P], ref[P:], beta).items():
            add(k, np.array(v)[dec])
        add("loss/dpo", np.array(r.dpo)[dec])
        add("logps/chosen", np.array(r.policy[:P])[dec])
        add("logps/rejected", np.array(r.policy[P:])[dec])
        add("loss/xpo", r.exploration)
        for k, v in objective_terms(r).items():
            add(k, v)
    out = {k: float(np.concatenate(v).mean()) for k, v in cols.items() if sum(len(x) for x in v)}
    out["exploration_bonus"] = -out["loss/xpo"]
    return out
