"""Completion-only log-probabilities: one padded forward per model per micro-batch.

For a row x = prompt + completion, the score is s(y) = sum_{t in completion} log p(y_t | x_<t):
prompt tokens and padding are masked out; an EOS the policy produced is part of the completion
and counted once. The output layer (vocabulary projection) is applied only from the first
completion position of the batch on, where the model's layout allows it (verified once per model
class against the full forward); otherwise the full logits are computed. Passes that are not
differentiated score large vocabularies in blocks of positions (:data:`LOGITS_BLOCK_BYTES`).
The log-softmax's normaliser over a large vocabulary is summed in two levels (:mod:`.logsumexp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.compute.logsumexp import logsumexp, sum_last


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
        mask[b, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
    return mx.array(tok[:, :-1]), mx.array(tok[:, 1:]), mx.array(mask)


def _split(model):
    """(backbone, head) with model(x) == head(backbone(x)) for mlx-lm's common layout, else None."""
    inner, args = getattr(model, "model", None), getattr(model, "args", None)
    if inner is None or not callable(inner):
        return None
    if getattr(args, "tie_word_embeddings", False) and hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        return inner, inner.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (inner, head) if head is not None and not getattr(args, "tie_word_embeddings", False) else None


_VERIFIED: dict = {}


def _split_ok(model) -> bool:
    """Whether head(backbone(x)) reproduces model(x) for this model class (checked once)."""
    key = type(model)
    if key not in _VERIFIED:
        parts = _split(model)
        ok = False
        if parts is not None:
            try:
                x = mx.array([[1, 2, 3, 4]])
                full, split = model(x), parts[1](parts[0](x))
                ok = full.shape == split.shape and bool(mx.allclose(full, split, atol=1e-4).item())
            except Exception:
                ok = False
        _VERIFIED[key] = ok
    return _VERIFIED[key]


#: The largest float32 logits block, rows x positions x vocabulary x 4 bytes, computed at once;
#: longer completions are scored in blocks of positions (see :func:`token_logps`).
LOGITS_BLOCK_BYTES = 128 * 2**20


def _reduce(logits, targets, with_entropy: bool, temperature):
    """(log p(target), entropy or None, log p_T(target) or None) from one block of logits."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    lse = logsumexp(logits)
    logp = picked - lse
    tempered = None
    if temperature not in (None, 0, 0.0, 1, 1.0):
        tempered = picked / temperature - logsumexp(logits / temperature)
    if not with_entropy:
        return logp, None, tempered
    logprobs = logits - lse[..., None]
    entropy = -sum_last(mx.exp(logprobs) * logprobs)
    return logp, entropy, tempered


def _blocked(head, hidden, targets, with_entropy: bool, temperature, width: int):
    """:func:`_reduce` over blocks of ``width`` positions, each evaluated before the next is built,
    so that about one block's logits exist at a time (outside a gradient transform, an evaluated
    array lets go of the arrays it was computed from). Under a gradient transform the values and
    gradients stay right, but the evaluation keeps every intermediate of the forward pass alive
    until the backward pass (see :func:`token_logps`)."""
    parts = []
    for a in range(0, hidden.shape[1], width):
        block = _reduce(head(hidden[:, a : a + width]), targets[:, a : a + width], with_entropy, temperature)
        mx.eval([x for x in block if x is not None])
        parts.append(block)
    return tuple(None if c[0] is None else mx.concatenate(list(c), axis=1) for c in zip(*parts))


def token_logps(
    model,
    inputs: mx.array,
    targets: mx.array,
    with_entropy: bool = False,
    start: int = 0,
    temperature: float | None = None,
    forward_only: bool = False,
):
    """(log p(target_j | inputs_<=j), entropy of p at j or None, log p_T(target_j | ...) or None)
    for positions j >= start, where p_T = softmax(logits / T) is the distribution sampled at
    temperature T (computed when ``temperature`` is given and is neither 0 nor 1).

    The output layer runs only on positions >= start. In a pass that is not differentiated
    (``forward_only``: the reference's), float32 logits there that exceed
    :data:`LOGITS_BLOCK_BYTES` (rows x positions x vocabulary x 4 bytes) are made and reduced in
    blocks of positions, so about one block of logits exists at a time (:func:`_blocked`). A
    differentiated pass runs in one: evaluating blocks inside the gradient transform keeps every
    intermediate of the forward pass alive until the backward pass, which at a real depth costs
    far more than the logits (docs/precision.md)."""
    targets = targets[:, start:]
    if _split_ok(model):
        backbone, head = _split(model)
        hidden = backbone(inputs)[:, start:]
        vocab = int(getattr(model.args, "vocab_size", 0) or 0)
        rows, positions = hidden.shape[0], hidden.shape[1]
        width = max(1, LOGITS_BLOCK_BYTES // max(1, rows * vocab * 4))
        if forward_only and vocab and positions > width:
            return _blocked(head, hidden, targets, with_entropy, temperature, width)
        logits = head(hidden)
    else:
        logits = model(inputs)[:, start:]
    return _reduce(logits, targets, with_entropy, temperature)


def first_completion_position(mask: mx.array) -> int:
    """The first target position any row scores (rows before it are all prompt or padding)."""
    cols = np.nonzero(np.array(mask).any(axis=0))[0]
    return int(cols[0]) if len(cols) else 0


@dataclass
class Scores:
    """Completion log-probs of a batch, per token ([B, T], zero outside the completion, T the target
    positions from the first completion position of the batch on) and per row."""

    tokens: mx.array  # log p(y_t | x, y_<t) on completion tokens
    mask: mx.array  # 1 on completion tokens
    entropy: mx.array | None = None  # per-row sum of the token entropies
    tempered: mx.array | None = None  # log p_T(y_t | ...) at the sampling temperature, if asked

    @property
    def sum(self) -> mx.array:
        """s(y) = sum over completion tokens of log p(y_t | x, y_<t), per row [B]."""
        return self.tokens.sum(axis=-1)

    @property
    def counts(self) -> mx.array:
        return self.mask.sum(axis=-1)


def completion_logps(
    model,
    inputs,
    targets,
    mask,
    with_entropy: bool = False,
    temperature: float | None = None,
    start: int | None = None,
    forward_only: bool = False,
) -> Scores:
    """Per-token completion log-probs of every row. ``start`` (default: the first completion
    position in ``mask``) skips the output layer on positions no row scores; ``forward_only``:
    a pass no gradient is taken of (:func:`token_logps`)."""
    if start is None:
        start = first_completion_position(mask)
    logp, ent, tempered = token_logps(model, inputs, targets, with_entropy, start, temperature, forward_only)
    mask = mask[:, start:]
    return Scores(
        logp * mask,
        mask,
        None if ent is None else (ent * mask).sum(axis=-1),
        None if tempered is None else tempered * mask,
    )


def sequence_logps(model, inputs, targets, mask, with_entropy: bool = False, start: int | None = None):
    """(sum of completion log-probs [B], completion token counts [B], entropy sum [B] or None)."""
    sc = completion_logps(model, inputs, targets, mask, with_entropy, start=start)
    return sc.sum, sc.counts, sc.entropy
