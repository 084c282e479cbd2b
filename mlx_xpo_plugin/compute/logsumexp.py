"""log sum_v exp(x_v) over a vocabulary-wide last axis, summed in two levels.

MLX's ``logsumexp`` and ``sum`` add a row's terms into a few running float32 accumulators, so a
row of 151,936 terms (Qwen2.5's vocabulary) carries a relative error of about 1e-4: 2-3e-4 in a
log-probability. Here a row of V terms is viewed as [V / b, b] blocks: each block's
logsumexp (b terms), then the logsumexp of the V / b block results. Each level adds a few hundred
terms, so the result is within a float32 rounding of the exact value (about 1e-6 at 152k), for
the same number of ``exp`` evaluations.

The gradient is MLX's, through both levels: each block's softmax (normalised by that block's sum)
times the softmax of the block results, so it is the softmax exp(x_v - lse) to the same rounding,
where the gradient of a one-level ``logsumexp`` renormalises with the one-level sum.

Rows of at most :data:`ONE_LEVEL_MAX` terms are summed in one level, as before.
"""

from __future__ import annotations

import mlx.core as mx

#: Rows up to this many terms are summed in one level (their rounding is already ~1e-7).
ONE_LEVEL_MAX = 4096
#: The block width aimed at; a divisor of V in [MIN_BLOCK, MAX_BLOCK] nearest to it is taken.
BLOCK, MIN_BLOCK, MAX_BLOCK = 1024, 256, 4096


def block_width(vocab: int) -> int:
    """The block width for a row of ``vocab`` terms: a divisor of ``vocab`` in [256, 4096]
    nearest to 1024 (the rows are then viewed as blocks without a copy), else 1024 (the row is
    padded). 151,936 = 128 x 1187 gives blocks of 1187."""
    divisors = [b for b in range(MIN_BLOCK, MAX_BLOCK + 1) if vocab % b == 0]
    return min(divisors, key=lambda b: abs(b - BLOCK)) if divisors else BLOCK


def _blocks(x: mx.array, fill: float) -> mx.array:
    """``x`` [..., V] viewed as [..., ceil(V / b), b], padded with ``fill`` where b does not divide V."""
    vocab = x.shape[-1]
    b = block_width(vocab)
    extra = -vocab % b
    if extra:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=fill)
    return x.reshape(*x.shape[:-1], (vocab + extra) // b, b)


def sum_last(x: mx.array) -> mx.array:
    """sum over the last axis, in two levels where it is longer than :data:`ONE_LEVEL_MAX`."""
    if x.shape[-1] <= ONE_LEVEL_MAX:
        return x.sum(axis=-1)
    return _blocks(x, 0.0).sum(axis=-1).sum(axis=-1)


def _two_level(x: mx.array) -> mx.array:
    return mx.logsumexp(mx.logsumexp(_blocks(x, -float("inf")), axis=-1), axis=-1)


def logsumexp(x: mx.array) -> mx.array:
    """log sum_v exp(x_v) over the last axis (dropped), in two levels where the axis is longer
    than :data:`ONE_LEVEL_MAX` (``mx.logsumexp`` otherwise)."""
    if x.shape[-1] <= ONE_LEVEL_MAX:
        return mx.logsumexp(x, axis=-1)
    return _two_level(x)
