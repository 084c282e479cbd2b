"""The method the shared loop (trainer.py) is given, in its base form: Online DPO (Guo et al. 2024).

For each prompt two completions are sampled from the policy, a judge picks the winner, and the
DPO loss is applied to (chosen, rejected) on the fly. A method says how to sample a pair, which
pairs a step scores, the alpha schedule, which rows are policy samples, and the exploration term
(none here); XPO (xpo_trainer.py) extends it.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_xpo_plugin.compute.rollout import sample_completions
from mlx_xpo_plugin.loop.pairs import keep_decided

MODE = "online_dpo"


class OnlineDPO:
    """The online DPO method: two policy samples per prompt, no exploration term."""

    mode = MODE

    def __init__(self, settings):
        self.settings = settings

    @property
    def alpha_schedule(self):
        """The exploration coefficient's schedule (:mod:`.loop.schedule`): none."""
        return 0.0

    def rollout(self, model, tokenizer, reference, prompt_ids, sampling) -> list:
        """Two policy completions per prompt, as samples ``(a, b, None)``."""
        return [(a, b, None) for a, b in sample_completions(model, tokenizer, prompt_ids, 2, sampling)]

    def training_pairs(self, prompts, samples: list, verdicts: list) -> list:
        """The pairs a step scores: the decided ones (nothing is learnt from the others)."""
        return keep_decided(prompts, samples, verdicts)

    def policy_rows(self, ref_is_chosen) -> mx.array:
        """[2P] bool: which rows (chosen..., rejected...) were sampled from the policy: all."""
        return mx.ones((2 * ref_is_chosen.shape[0],), dtype=mx.bool_)

    def exploration_term(self, scores, ref_tok, ref_is_chosen, alpha: float) -> mx.array:
        """Per-pair term added to the loss: zero."""
        return mx.zeros((scores.tokens.shape[0] // 2,))
