"""Per-epoch schedules for alpha (and beta).

A schedule is a number (constant) or a list with one entry per epoch whose last entry is held to
the end. An epoch is one pass over the training prompts.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

Schedule = Union[float, int, Sequence[float]]


def epoch_of(step: int, total: int, n_entries: int, steps_per_epoch: Optional[int] = None) -> int:
    """0-based epoch index of 1-based `step`.

    epoch = (step - 1) // steps_per_epoch, where steps_per_epoch defaults to
    ceil(total / n_entries) so that the entries share the run evenly.
    """
    if steps_per_epoch is None:
        steps_per_epoch = max(1, math.ceil(max(1, total) / max(1, n_entries)))
    return (max(1, step) - 1) // max(1, steps_per_epoch)


def _is_number(x) -> bool:
    """A Python or NumPy real number, or a 0-d array holding one (not a bool)."""
    if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        x = x.item()
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def value_at_epoch(schedule: Schedule, epoch: int) -> float:
    """Entry ``min(epoch, len - 1)`` of a list (the last entry held to the end); a number as is."""
    if _is_number(schedule):
        return float(schedule)
    values = list(schedule)
    if not values:
        raise ValueError("an alpha/beta schedule needs at least one entry")
    return float(values[min(max(0, epoch), len(values) - 1)])


def get_current_alpha(step: int, total: int, schedule: Schedule, steps_per_epoch: Optional[int] = None) -> float:
    """The schedule value at 1-based `step` of `total` steps.

    A number (Python or NumPy) is returned as a float. For a list, entry ``min(epoch, len - 1)``
    where ``epoch = (step - 1) // steps_per_epoch``: the first entry covers steps
    1..steps_per_epoch, and the last entry is held to the end. Any step >= 1 and total >= 1 work
    (no division by zero when total < len(schedule)). The trainer itself uses the epoch its
    prompts are drawn from (:func:`value_at_epoch`), which equals this one when the number of
    prompts is a multiple of the prompts per step.
    """
    if _is_number(schedule):
        return float(schedule)
    values = list(schedule)
    return value_at_epoch(values, epoch_of(step, total, max(1, len(values)), steps_per_epoch))
