"""Rule judges used by the offline demo and the learning benchmark (plain Python functions).

``judge: mlx_xpo_plugin.rules:prefer_letter_e`` prefers the completion with more 'e' characters;
equal counts are a tie. A rule judge makes the preference exact, so a win-rate above 50% against
the reference is evidence that training moved the policy toward what the judge wants.
"""

from __future__ import annotations

import random


def prefer_letter_e(prompt: str, completion_a: str, completion_b: str):
    """0 if a has more 'e' than b, 1 if b has more, None (tie) if equal."""
    a, b = completion_a.count("e"), completion_b.count("e")
    return None if a == b else (0 if a > b else 1)


def letter_e_reward(prompt: str, completion: str) -> float:
    """Pointwise form of the same rule: the number of 'e' characters."""
    return float(completion.count("e"))


letter_e_reward.pointwise = True


def coin_reward(prompt: str, completion: str) -> float:
    """A uniform random score from the global ``random`` generator (which checkpoints keep), so
    that no pair ties. For benchmarks on random-weight models whose samples mostly decode to
    nothing: the q05 preset's model draws from 151,936 ids, its tokenizer knows 2,048, so a rule
    on the text would tie almost every pair and skip the update the benchmark means to time."""
    return random.random()


coin_reward.pointwise = True
