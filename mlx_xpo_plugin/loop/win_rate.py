"""The win-rate against the reference, its interval, and the words a run prints about them.

win-rate = wins / n with n = wins + losses, the decided pairs: ties and invalid verdicts are left
out (and counted apart). Its 95% interval is Wilson's score interval, with p = wins / n, z = 1.96:

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

It stays inside [0, 1] and is not empty at p = 0 or 1. With no decided pair there is no win-rate
and no interval (None), which a run prints as "no decided pair", never as nan.
"""

from __future__ import annotations

import math
from typing import Optional

Z95 = 1.96


def interval(wins: int, losses: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """Wilson score interval of wins / (wins + losses); None with no decided pair."""
    n = wins + losses
    if n == 0:
        return None
    p = wins / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def describe(res: dict, prefix: str = "") -> str:
    """An evaluation result (``wins``, ``losses``, ``ties``, ``invalid``; keys may carry ``prefix``,
    such as ``val_``) in words: ``0.71 (95% CI 0.50-0.86; 15 won, 6 lost, 3 ties, 0 invalid)``, or
    ``no decided pair (0 won, 0 lost, 24 ties, 0 invalid)``."""
    won, lost, ties, bad = (int(res.get(prefix + k) or 0) for k in ("wins", "losses", "ties", "invalid"))
    counts = f"{won} won, {lost} lost, {ties} ties, {bad} invalid"
    ci = interval(won, lost)
    if ci is None:
        return f"no decided pair ({counts})"
    return f"{won / (won + lost):.2f} (95% CI {ci[0]:.2f}-{ci[1]:.2f}; {counts})"


def validation_line(step: int, res: dict) -> str:
    """The line a run prints after a validation; step 0 is the untrained policy, the baseline."""
    when = "step 0 (untrained baseline)" if step == 0 else f"step {step}"
    return f"{when}: validation win-rate vs reference {describe(res)}"
