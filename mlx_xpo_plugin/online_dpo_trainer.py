"""Online DPO (Guo et al. 2024): for each prompt two completions are sampled from the policy, a
judge picks the winner, and the DPO loss is applied to (chosen, rejected) on the fly.

:class:`OnlineDPO` (loop/method.py) is what the shared loop (trainer.py) asks a method for: how to
sample a pair, which pairs a step scores, the alpha schedule, and the exploration term (none
here). XPO extends it (xpo_trainer.py). :func:`train_online_dpo` runs it from a dict or a YAML file.
"""

from __future__ import annotations

from mlx_xpo_plugin.api import train_method
from mlx_xpo_plugin.loop.method import MODE, OnlineDPO

__all__ = ["MODE", "OnlineDPO", "train_online_dpo"]


def train_online_dpo(config, training_callback=None, progress: bool = True) -> int:
    """Train with Online DPO. `config`: dict of settings, OnlineArgs, or a YAML path."""
    return train_method(OnlineDPO, config, training_callback, progress)
