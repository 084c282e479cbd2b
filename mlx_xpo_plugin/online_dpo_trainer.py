"""Online DPO: the online preference loop with no exploration term (alpha = 0).

For each prompt two policy completions are sampled, a judge picks the winner, and the DPO loss is
applied to (chosen, rejected) on the fly.
"""

from __future__ import annotations

from .api import train_mode

MODE = "online_dpo"


def train_online_dpo(config, training_callback=None, progress: bool = True) -> int:
    """Train with Online DPO. `config`: dict of settings, OnlineArgs, or a YAML path."""
    return train_mode(MODE, config, training_callback, progress)
