"""XPO: the online preference loop plus the exploration term and its alpha schedule.

Three forms (``xpo_bonus``; losses.py has the formulas):
  kl:           loss = L_DPO - alpha * (KL^(chosen) + KL^(rejected)),  KL^(y) = s_theta(y) - s_ref(y),
                differentiated as the score-function estimate of grad KL(q_theta || pi_ref)
  kl_upstream:  the same value differentiated as written (mlx-lm-lora; zero-mean gradient at T = 1)
  paper (TRL):  the pair is one policy sample and one reference sample y_ref;
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
