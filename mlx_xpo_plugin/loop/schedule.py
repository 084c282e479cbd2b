"""Per-epoch schedules for alpha (and beta).

A schedule is a number (constant) or a list with one entry per epoch whose last entry is held to
the end. An epoch is one pass over the training prompts; a step belongs to the epoch of its first
prompt. The trainer reads both of its schedules through :func:`get_current_alpha`.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Optional, Sequence, Union

Schedule = Union[float, int, Sequence[float]]
StepsPerEpoch = Union[int, float, Fraction]


def exact_steps_per_epoch(steps_per_epoch: StepsPerEpoch) -> Fraction:
    """``steps_per_epoch`` as an exact fraction > 0.

    An int or a Fraction is taken as is. A float x is read as the fraction closest to it whose
    denominator is at most D = isqrt(2**50 // ceil(x)): a float is within x * 2**-53 of the ratio
    it was computed from, and two fractions with denominators <= D are at least 1 / D**2 apart, so
    a float computed as prompts / prompts_per_step gives back exactly that ratio whenever
    prompts_per_step <= D (D = 2**24 for x <= 4, 2**15 for x <= 2**20): ``10 / 3`` is 10/3.
    """
    if _is_number(steps_per_epoch):
        x = steps_per_epoch.item() if hasattr(steps_per_epoch, "item") else steps_per_epoch
    else:
        raise TypeError(f"steps_per_epoch: {steps_per_epoch!r}; expected an int, a float or a Fraction")
    if isinstance(x, numbers.Rational):
        frac = Fraction(int(x.numerator), int(x.denominator))
    else:
        x = float(x)
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"steps_per_epoch: {x!r}; expected a finite number > 0")
        frac = Fraction(x).limit_denominator(max(1, math.isqrt(2**50 // max(1, math.ceil(x)))))
    if frac <= 0:
        raise ValueError(f"steps_per_epoch: {steps_per_epoch!r}; expected a number > 0")
    return frac


def epoch_of(step: int, total: int, n_entries: int, steps_per_epoch: Optional[StepsPerEpoch] = None) -> int:
    """0-based epoch of 1-based `step` (step 0, before any update, is in epoch 0).

    epoch = floor((step - 1) / steps_per_epoch), computed on exact fractions
    (:func:`exact_steps_per_epoch`), where steps_per_epoch defaults to ceil(total / n_entries) so
    that the entries share the run evenly.
    """
    if steps_per_epoch is None:
        spe = Fraction(max(1, math.ceil(max(1, total) / max(1, n_entries))))
    else:
        spe = exact_steps_per_epoch(steps_per_epoch)
    return ((max(1, step) - 1) * spe.denominator) // spe.numerator


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


def get_current_alpha(
    step: int, total: int, schedule: Schedule, steps_per_epoch: Optional[StepsPerEpoch] = None
) -> float:
    """The schedule value at 1-based `step` of `total` steps (alpha, or beta: any schedule).

    A number (Python or NumPy) is returned as a float. For a list, entry ``min(epoch, len - 1)``
    with ``epoch = floor((step - 1) / steps_per_epoch)`` (:func:`epoch_of`); the last entry is held
    to the end. ``steps_per_epoch`` is an int, a float or a Fraction; None splits the run into
    ``len(schedule)`` equal parts.

    To reproduce a run, pass ``steps_per_epoch = n_prompts / prompts_per_step`` with
    ``prompts_per_step = batch_size * gradient_accumulation_steps * processes`` (the processes of
    an ``mlx.launch`` group; 1 otherwise), best as ``Fraction(n_prompts, prompts_per_step)``; the
    float ``n_prompts / prompts_per_step`` gives the same values (see
    :func:`exact_steps_per_epoch`). Step k then takes prompts (k - 1) * prompts_per_step onward,
    and its epoch is the pass over the prompts that its first prompt comes from: exactly the
    alpha and beta the trainer logs at step k (the trainer calls this function).
    """
    if _is_number(schedule):
        return float(schedule)
    values = list(schedule)
    return value_at_epoch(values, epoch_of(step, total, max(1, len(values)), steps_per_epoch))
