"""XPO: the online preference loop plus the exploration term and its alpha schedule.

Two forms (``xpo_bonus``):
  kl (default):  loss = L_DPO - alpha * (KL^(chosen) + KL^(rejected)),  KL^(y) = s_theta(y) - s_ref(y)
  paper (TRL):   the pair is one policy sample and one reference sample y_ref;
                 loss = L_DPO + alpha * log pi_theta(y_ref | x)
alpha is a float or a per-epoch list (see schedule.get_current_alpha).
"""

from __future__ import annotations

from .api import train_mode
from .schedule import get_current_alpha

__all__ = ["train_xpo", "get_current_alpha"]

MODE = "xpo"


def train_xpo(config, training_callback=None, progress: bool = True) -> int:
    """Train with XPO. `config`: dict of settings, OnlineArgs, or a YAML path. Returns 0 on success."""
    return train_mode(MODE, config, training_callback, progress)
