"""The win-rate against the reference, its interval, and the words a run prints about them and
about the judge's failures (the same words in a training step's line, a validation's and eval's).

win-rate = wins / n with n = wins + losses, the decided pairs: ties and invalid verdicts are left
out (and counted apart). Its 95% interval is Wilson's score interval, with p = wins / n, z = 1.96:

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

It stays inside [0, 1] and is not empty at p = 0 or 1. With no decided pair there is no win-rate
and no interval (None), which a run prints as "no decided pair", never as nan.

A verdict without a preference is a tie or invalid; an invalid one is either an answer the judge
gave that is not a verdict (``2 invalid: unparsed answer "I think the first..."``: the last one's
reason is quoted) or a pair the judge failed on, an error, counted by its kind (the exception's
class, or an endpoint's kind such as ``connection_refused``): ``2 errors: RuntimeError: boom``.
Results keep ``invalid`` (every invalid verdict, errors included, as ``judge/invalid``) and
``errors/<kind>``; the words show the answers and the errors apart.
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


def errors_text(n: int, kinds: dict, last: Optional[str]) -> str:
    """``n`` pairs the judge failed on: ``2 errors: RuntimeError: boom`` (one kind, the last error's
    text), ``3 errors (2 RuntimeError, 1 ValueError; last: ValueError: x)``, or '' when n is 0."""
    if not n:
        return ""
    head = f"{n} error{'s' if n != 1 else ''}"
    if len(kinds) > 1:
        by_kind = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items()))
        return f"{head} ({by_kind}{f'; last: {last}' if last else ''})"
    if last:
        return f"{head}: {last}"
    return f"{head} ({next(iter(kinds))})" if kinds else head


def invalid_text(n: int, example: Optional[str]) -> str:
    """``n`` invalid answers, the reason of one quoted: ``2 invalid: unparsed answer "I think..."``."""
    return f"{n} invalid" + (f": {example}" if n and example else "")


def error_kinds(res: dict, prefix: str) -> dict:
    """``{kind: pairs}`` of the ``<prefix><kind>`` counts in ``res`` (zeros left out)."""
    return {k[len(prefix) :]: int(v) for k, v in res.items() if k.startswith(prefix) and v}


def describe(res: dict, prefix: str = "") -> str:
    """An evaluation result (``wins``, ``losses``, ``ties``, ``invalid``, ``errors/<kind>``,
    ``invalid_example``, ``last_error``; keys may carry ``prefix``, such as ``val_``) in words:
    ``0.71 (95% CI 0.50-0.86; 15 won, 6 lost, 3 ties, 0 invalid)``, or ``no decided pair (0 won,
    0 lost, 0 ties, 0 invalid, 4 errors: RuntimeError: boom)``."""
    won, lost, ties, bad = (int(res.get(prefix + k) or 0) for k in ("wins", "losses", "ties", "invalid"))
    kinds = error_kinds(res, prefix + "errors/")
    errors = sum(kinds.values())
    counts = f"{won} won, {lost} lost, {ties} ties, {invalid_text(bad - errors, res.get(prefix + 'invalid_example'))}"
    if errors:
        counts += ", " + errors_text(errors, kinds, res.get(prefix + "last_error"))
    ci = interval(won, lost)
    if ci is None:
        return f"no decided pair ({counts})"
    return f"{won / (won + lost):.2f} (95% CI {ci[0]:.2f}-{ci[1]:.2f}; {counts})"


def validation_line(step: int, res: dict) -> str:
    """The line a run prints after a validation; step 0 is the untrained policy, the baseline."""
    when = "step 0 (untrained baseline)" if step == 0 else f"step {step}"
    return f"{when}: validation win-rate vs reference {describe(res)}"
