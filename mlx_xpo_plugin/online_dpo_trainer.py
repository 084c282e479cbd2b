"""Online DPO (Guo et al. 2024): for each prompt two completions are sampled from the policy, a
judge picks the winner, and the DPO loss is applied to (chosen, rejected) on the fly.

:class:`OnlineDPO` is what the shared loop (trainer.py) asks a method for: how to sample a pair,
which pairs a step scores, the alpha schedule, and the exploration term (none here). XPO extends it (xpo_trainer.py).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_xpo_plugin.api import train_method
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


def train_online_dpo(config, training_callback=None, progress: bool = True) -> int:
    """Train with Online DPO. `config`: dict of settings, OnlineArgs, or a YAML path."""
    return train_method(OnlineDPO, config, training_callback, progress)
