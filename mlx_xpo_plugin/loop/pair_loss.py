"""The loss of a micro-batch of judged pairs, shared by training and evaluation.

Rows are laid out as the P chosen completions, then their P rejected partners. Per pair:

    loss = L_DPO + X - entropy_coef * (H(y_c) + H(y_r)) / 2

with L_DPO from losses.dpo_loss, X the method's exploration term (0 for online DPO; see
xpo_trainer.py) and H the mean token entropy of a completion (only when entropy_coef > 0).
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
        tok = completion_logps(ref_model, inputs, targets, mask).tokens
        mx.eval(tok)
    return mx.stop_gradient(tok)


def pair_loss(
    model, inputs, targets, mask, ref_tok, ref_is_chosen, method, settings, beta: float, alpha: float
) -> PairLoss:
    """The loss terms of one micro-batch (differentiable in the model's trainable parameters)."""
    entropy_coef = settings.entropy_coef
    sc = completion_logps(
        model, inputs, targets, mask, with_entropy=entropy_coef > 0, temperature=method.scoring_temperature(alpha)
    )
    s, ref_s = sc.sum, ref_tok.sum(axis=-1)
    P = s.shape[0] // 2
    counts = mx.maximum(sc.counts, 1.0)
    pol, ref = dpo_scores(s, ref_s, counts, settings.dpo_cpo_loss_type)
    l_dpo = dpo_loss(pol[:P], pol[P:], ref[:P], ref[P:], beta, settings.dpo_cpo_loss_type, settings.delta)
    x = method.exploration_term(sc, ref_tok, ref_is_chosen, alpha)
    return PairLoss(l_dpo, x, s, ref_s, counts, sc.entropy)


def total(res: PairLoss, entropy_coef: float) -> mx.array:
    """The per-pair loss that is minimised (see the module docstring)."""
    out = res.dpo + res.exploration
    if entropy_coef > 0:
        tok_ent = res.entropy / res.counts
        P = res.pairs
        out = out - entropy_coef * 0.5 * (tok_ent[:P] + tok_ent[P:])
    return out


def pair_metrics(results: list[PairLoss], beta: float, loss_type: str) -> dict:
    """Means over every pair of the step: losses, implicit rewards (on the scores the loss
    compares), log-probs, the sampled KL estimate and the sampled entropy."""
    cols: dict = {}

    def add(k, v):
        cols.setdefault(k, []).append(np.array(v))

    for r in results:
        P = r.pairs
        pol, ref = dpo_scores(r.policy, r.reference, r.counts, loss_type)
        for k, v in reward_stats(pol[:P], pol[P:], ref[:P], ref[P:], beta).items():
            add(k, v)
        add("loss/dpo", r.dpo)
        add("loss/xpo", r.exploration)
        add("logps/chosen", r.policy[:P])
        add("logps/rejected", r.policy[P:])
        kl = r.policy - r.reference
        add("objective/kl", 0.5 * (kl[:P] + kl[P:]))
        add("objective/entropy", -0.5 * (r.policy[:P] + r.policy[P:]))
    out = {k: float(np.concatenate(v).mean()) for k, v in cols.items()}
    out["exploration_bonus"] = -out["loss/xpo"]
    return out
