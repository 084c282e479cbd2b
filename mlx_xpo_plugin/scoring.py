"""Completion-only log-probabilities: one padded forward per model per micro-batch.

For a row x = prompt + completion, the score is s(y) = sum_{t in completion} log p(y_t | x_<t):
prompt tokens and padding are masked out; an EOS the policy produced is part of the completion
and counted once.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-padded inputs/targets and the completion mask over target positions.

    Returns (inputs [B, L-1], targets [B, L-1], mask [B, L-1] float32) where mask[b, j] = 1 iff
    target token j+1 of row b is a completion token.
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    L = max(2, max(len(r) for r in rows))
    tok = np.full((len(rows), L), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), L - 1), dtype=np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        r = rows[b]
        tok[b, : len(r)] = r
        mask[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return mx.array(tok[:, :-1]), mx.array(tok[:, 1:]), mx.array(mask)


def token_logps(model, inputs: mx.array, targets: mx.array, with_entropy: bool = False):
    """log p(target_j | inputs_<=j) for every position, and optionally the entropy of p at j."""
    logits = model(inputs).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    logp = picked - lse
    if not with_entropy:
        return logp, None
    logprobs = logits - lse[..., None]
    entropy = -(mx.exp(logprobs) * logprobs).sum(axis=-1)
    return logp, entropy


def sequence_logps(model, inputs, targets, mask, with_entropy: bool = False):
    """(sum of completion log-probs [B], completion token counts [B], entropy sum [B] or None)."""
    logp, ent = token_logps(model, inputs, targets, with_entropy)
    summed = (logp * mask).sum(axis=-1)
    counts = mask.sum(axis=-1)
    return summed, counts, (None if ent is None else (ent * mask).sum(axis=-1))
