"""Completion-only log-probabilities: one padded forward per model per micro-batch.

For a row x = prompt + completion, the score is s(y) = sum_{t in completion} log p(y_t | x_<t):
prompt tokens and padding are masked out; an EOS the policy produced is part of the completion
and counted once. The output layer (vocabulary projection) is applied only from the first
completion position of the batch on, where the model's layout allows it (verified once per model
class against the full forward); otherwise the full logits are computed. Large vocabularies are
scored in blocks of positions (:data:`LOGITS_BLOCK_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    lse = mx.logsumexp(logits, axis=-1)
    logp = picked - lse
    tempered = None
    if temperature not in (None, 0, 0.0, 1, 1.0):
        tempered = picked / temperature - mx.logsumexp(logits / temperature, axis=-1)
    if not with_entropy:
        return logp, None, tempered
    logprobs = logits - lse[..., None]
    entropy = -(mx.exp(logprobs) * logprobs).sum(axis=-1)
    return logp, entropy, tempered


def _head_module(model):
    """The module holding the output layer's weights (the tied embedding or lm_head)."""
    inner = model.model
    return inner.embed_tokens if getattr(model.args, "tie_word_embeddings", False) else model.lm_head


def _values(a: mx.array) -> mx.array:
    """An evaluated array's values as a new array with no graph behind it (bfloat16 via its bits:
    numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        return mx.array(np.array(a.view(mx.uint16))).view(mx.bfloat16)
    return mx.array(np.array(a))


def _block_dlogits(z, t, cots, with_entropy: bool, temperature):
    """d(sum_j c_j . outputs_j)/dz for one block of float32 logits z [B, w, V], targets t and the
    cotangents c of (logp, entropy?, tempered?), from p = softmax(z), p_T = softmax(z / T):
    d logp/dz = e_t - p;  d tempered/dz = (e_t - p_T) / T;  d H/dz = -p (log p + H)."""
    c = list(cots)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)
    logp = z - lse
    p = mx.exp(logp)
    c_logp = c.pop(0)[..., None]
    dz = -c_logp * p
    at_t = c_logp
    if with_entropy:
        c_ent = c.pop(0)[..., None]
        ent = -(p * logp).sum(axis=-1, keepdims=True)
        dz = dz - c_ent * p * (logp + ent)
    if c:  # tempered
        c_tmp = c.pop(0)[..., None] / temperature
        dz = dz - c_tmp * mx.softmax(z / temperature, axis=-1)
        at_t = at_t + c_tmp
    picked = mx.take_along_axis(dz, t[..., None], axis=-1)
    return mx.put_along_axis(dz, t[..., None], picked + at_t, axis=-1)


def _blocked(model, hidden, targets, with_entropy: bool, temperature, width: int):
    """:func:`_reduce` over blocks of ``width`` positions, one block's logits at a time.

    Forward: each block is evaluated before the next is built and only its [B, w] results are
    kept (an evaluated array under a gradient transform keeps its graph, logits included, so the
    values are copied out). Backward (a custom VJP): each block's logits are recomputed from its
    hidden states, their gradient written out (:func:`_block_dlogits`) and sent back through the
    output layer (``mx.vjp`` of it: the hidden states' gradient, and the layer's trainable
    parameters' for full fine-tuning or a LoRA on lm_head), evaluated block by block."""
    from mlx.utils import tree_flatten, tree_unflatten  # only on this path

    head_mod, head_fn = _head_module(model), _split(model)[1]
    params = head_mod.trainable_parameters()
    tempered_on = temperature not in (None, 0, 0.0, 1, 1.0)
    spans = [(i, min(i + width, hidden.shape[1])) for i in range(0, hidden.shape[1], width)]

    def logits(p, h):
        if p:
            head_mod.update(p)
        return head_fn(h)

    def forward_block(p, h, t):  # a function, so that the block's arrays die when it returns
        logp, ent, tempered = _reduce(logits(p, h), t, with_entropy, temperature)
        out = [logp] + ([ent] if with_entropy else []) + ([tempered] if tempered_on else [])
        mx.eval(out)
        return [_values(o) for o in out]

    @mx.custom_function
    def scores(p, h, t):
        parts = [forward_block(p, h[:, a:b], t[:, a:b]) for a, b in spans]
        return [mx.concatenate(list(c), axis=1) for c in zip(*parts)]

    def backward_block(p, names, h, t, cots):  # the gradients of (head parameters..., h)
        def head(*arrays):  # mx.vjp takes a flat list of arrays
            return [logits(tree_unflatten(list(zip(names, arrays[:-1]))), arrays[-1])]

        z = logits(p, h)
        dz = _block_dlogits(z.astype(mx.float32), t, cots, with_entropy, temperature)
        _, grads = mx.vjp(head, [v for _, v in tree_flatten(p)] + [h], [dz.astype(z.dtype)])
        mx.eval(grads)
        return [_values(g) for g in grads]  # values only, as in the forward

    @scores.vjp
    def scores_vjp(primals, cotangents, outputs):
        p, h, t = primals
        names = [k for k, _ in tree_flatten(p)]
        dh, dp = [], None
        for a, b in spans:
            grads = backward_block(p, names, h[:, a:b], t[:, a:b], [c[:, a:b] for c in cotangents])
            dh.append(grads[-1])
            dp = grads[:-1] if dp is None else [x + y for x, y in zip(dp, grads[:-1])]
        dp = tree_unflatten(list(zip(names, dp))) if names else p
        return dp, mx.concatenate(dh, axis=1), mx.zeros_like(t)

    cols = scores(params, hidden, targets)
    logp = cols.pop(0)
    ent = cols.pop(0) if with_entropy else None
    return logp, ent, (cols.pop(0) if tempered_on else None)


def token_logps(
    model,
    inputs: mx.array,
    targets: mx.array,
    with_entropy: bool = False,
    start: int = 0,
    temperature: float | None = None,
):
    """(log p(target_j | inputs_<=j), entropy of p at j or None, log p_T(target_j | ...) or None)
    for positions j >= start, where p_T = softmax(logits / T) is the distribution sampled at
    temperature T (computed when ``temperature`` is given and is neither 0 nor 1).

    The output layer runs only on positions >= start. When its float32 logits there,
    rows x positions x vocabulary x 4 bytes, exceed :data:`LOGITS_BLOCK_BYTES`, they are made
    and reduced in blocks of positions (each block recomputed in the backward pass), so about
    one block of logits exists at a time (:func:`_blocked`)."""
    targets = targets[:, start:]
    if _split_ok(model):
        backbone, head = _split(model)
        hidden = backbone(inputs)[:, start:]
        vocab = int(getattr(model.args, "vocab_size", 0) or 0)
        rows, positions = hidden.shape[0], hidden.shape[1]
        width = max(1, LOGITS_BLOCK_BYTES // max(1, rows * vocab * 4))
        if vocab and positions > width:
            return _blocked(model, hidden, targets, with_entropy, temperature, width)
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
    model, inputs, targets, mask, with_entropy: bool = False, temperature: float | None = None, start: int | None = None
) -> Scores:
    """Per-token completion log-probs of every row. ``start`` (default: the first completion
    position in ``mask``) skips the output layer on positions no row scores."""
    if start is None:
        start = first_completion_position(mask)
    logp, ent, tempered = token_logps(model, inputs, targets, with_entropy, start, temperature)
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
