"""XPO (Xie et al. 2024): online DPO plus an exploration term, with a per-epoch alpha schedule.

Three forms of the term (``xpo_bonus``), per pair, with s(y) the summed completion log-probs:

  kl:           X = -alpha * (KL^(y_a) + KL^(y_b)),  KL^(y) = s_q(y) - s_ref(y) (q: the policy at
                the sampling temperature), differentiated as the score-function estimate of
                -2 alpha grad KL(q_theta || pi_ref)   (:func:`xpo_kl_bonus`)
  kl_upstream:  X = -alpha * (s_theta - s_ref summed over both samples), differentiated as
                written (mlx-lm-lora; :func:`xpo_kl_upstream`)
  paper (TRL):  the pair is one policy sample and one reference sample y_ref;
                X = alpha * log pi_theta(y_ref | x)   (:func:`xpo_paper_term`); a tie counts as
                a win of the policy sample (TRL)

None of them needs a verdict: every sampled pair is scored, X is averaged over all of them and
the DPO loss over the decided ones (loop/pair_loss.py). alpha is a number or a per-epoch list
(:func:`get_current_alpha`).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_xpo_plugin.api import train_method
from mlx_xpo_plugin.compute.rollout import sample_policy_and_reference
from mlx_xpo_plugin.loop.pairs import every_pair
from mlx_xpo_plugin.loop.schedule import get_current_alpha
from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO

__all__ = ["XPO", "train_xpo", "get_current_alpha", "xpo_kl_bonus", "xpo_kl_upstream", "xpo_paper_term"]

MODE = "xpo"


def xpo_kl_bonus(pol_tok, ref_tok, mask, alpha: float, sample_tok=None, reward_to_go: bool = True) -> mx.array:
    """Per-pair exploration bonus of the 'kl' form (subtracted from the loss).

    Token arrays are [2P, T] with rows = P chosen completions, then their P rejected partners;
    ``mask`` marks completion tokens. With l_theta, l_ref the per-token log-probs of the policy and
    the reference, and l_q those of the distribution the completions were sampled from
    (``sample_tok``: the policy at the sampling temperature; ``pol_tok`` when None):

    value     bonus = alpha * (KL^(y_c) + KL^(y_r)),   KL^(y) = sum_t l_q(y_t) - l_ref(y_t)
    gradient  alpha * sum_{i in (c, r)} sum_t (G_i(t) - G_j(t)) * grad l_q(y_i,t)
              G_i(t) = sum_{t' >= t} l_q(y_i,t') - l_ref(y_i,t')     (reward-to-go; with
              ``reward_to_go=False`` the whole-sequence sum), j = the pair's other completion.

    For two independent samples y_c, y_r of q_theta this is the score-function (REINFORCE)
    estimator of 2 * alpha * grad KL(q_theta || pi_ref) with the other sample's return as a
    leave-one-out baseline: unbiased, since E_y[grad log q_theta(y)] = 0 and the baseline does
    not depend on y_i. At temperature 1, q_theta = pi_theta. The value is the single-sample
    estimate of 2 * alpha * KL(q_theta || pi_ref) whose gradient is applied (``exploration_bonus``
    reports it); at temperature 1 it equals :func:`xpo_kl_upstream`'s value, and only the
    gradient differs: upstream's, alpha * grad s_theta(y), has zero mean at temperature 1.
    """
    sg = mx.stop_gradient
    q = pol_tok if sample_tok is None else sample_tok
    P = pol_tok.shape[0] // 2
    d = sg(q - ref_tok) * mask
    value = d.sum(axis=-1)
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
    exploration. At a temperature T != 1 its expectation, 2 alpha E_{y ~ q_T}[grad log pi_theta(y)],
    is not zero and is not grad KL either: its direction depends on the model (along grad KL on
    one model, against it on another; tests/test_xpo_exploration.py).
    """
    return alpha * ((pol_c - ref_c) + (pol_r - ref_r))


def xpo_paper_term(pol_yref, alpha: float) -> mx.array:
    """Per-pair XPO term of the paper / TRL form (added to the loss): alpha * log pi_theta(y_ref|x),
    where y_ref is the completion sampled from the reference."""
    return alpha * pol_yref


class XPO(OnlineDPO):
    """The XPO method: online DPO's loop with an exploration term and an alpha schedule."""

    mode = MODE

    @property
    def form(self) -> str:
        return self.settings.xpo_bonus

    @property
    def alpha_schedule(self):
        return self.settings.alpha

    def rollout(self, model, tokenizer, reference, prompt_ids, sampling) -> list:
        """The paper form pairs a policy sample with a reference sample (ref_side 1)."""
        if self.form != "paper":
            return super().rollout(model, tokenizer, reference, prompt_ids, sampling)
        both = sample_policy_and_reference(model, tokenizer, reference, prompt_ids, sampling)
        return [(p, r, 1) for p, r in both]

    def training_pairs(self, prompts, samples: list, verdicts: list) -> list:
        """Every sampled pair: the exploration term needs no verdict, so ties and invalid verdicts
        leave it unchanged (the DPO loss uses the decided pairs only). In the paper form a tie
        is a win of the policy sample, as in TRL."""
        return every_pair(prompts, samples, verdicts, ties_to_policy=self.form == "paper")

    def policy_rows(self, ref_is_chosen) -> mx.array:
        """In the paper form, every row but the reference sample's."""
        if self.form != "paper":
            return super().policy_rows(ref_is_chosen)
        return mx.concatenate([mx.logical_not(ref_is_chosen), ref_is_chosen])

    def exploration_term(self, scores, ref_tok, ref_is_chosen, alpha: float) -> mx.array:
        P = scores.tokens.shape[0] // 2
        s, ref_s = scores.sum, ref_tok.sum(axis=-1)
        if self.form == "paper":
            return xpo_paper_term(mx.where(ref_is_chosen, s[:P], s[P:]), alpha)
        if self.form == "kl_upstream":
            return -xpo_kl_upstream(s[:P], s[P:], ref_s[:P], ref_s[P:], alpha)
        return -xpo_kl_bonus(scores.tokens, ref_tok, scores.mask, alpha, scores.tempered)


def train_xpo(config, training_callback=None, progress: bool = True) -> int:
    """Train with XPO. `config`: dict of settings, OnlineArgs, or a YAML path. Returns 0 on success."""
    return train_method(XPO, config, training_callback, progress)
