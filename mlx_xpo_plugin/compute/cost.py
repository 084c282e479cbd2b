"""The expected seconds of a training step, by phase, from a model's shape and a machine's rates.

No weights are loaded: the shape comes from ``config.json``. Per micro-batch of ``P`` prompts
(prompt length ``p`` tokens, completion length ``C`` = ``max_completion_length``, an upper bound:
a completion that ends early costs less), with ``N`` the parameters of the transformer body
(``layers * (q + k + v + o + 3 * hidden * intermediate)``), ``E = vocab * hidden`` the output
layer, ``b`` bytes per weight as computed (4 after ``compute_dtype: auto`` on a CPU) and ``L``
the layer count:

* rollout (``R = 2P`` rows): prompt pass ``2 R p (N + E) / fwd_rate`` (the output layer runs on
  every prompt position), then ``C - 1`` decode steps of ``max(b (N + E) / stream,
  2 R (N + E) / sgemm)`` (weights streamed once per step at the rate of ``R``-row products) plus
  the per-call and per-token dispatch costs ``a_call + b_call L`` and ``a_tok + b_tok L``;
* judge: a model judge reads, per pair, the prompt, both completions and the template (``p + 2C +
  JUDGE_OVERHEAD_TOKENS``) in one forward pass: ``(2 pairs tokens N_j + 2 pairs E_j) / fwd_rate`` (plus
  ``max_tokens`` decode steps in ``mode: generate``); a function judge costs nothing here; an
  endpoint or a person is not estimated;
* reference: a forward pass over ``R`` rows of ``p + C`` tokens, ``F = 2 R (p + C) N + 2 R C E +
  4 L R (p + C)^2 hidden`` (attention), at ``fwd_rate``, plus ``a_fwd + b_fwd L``;
* policy: forward and backward (activations only; the base is frozen): ``2 F`` at ``bwd_rate``,
  plus ``a_bwd + b_bwd L``;
* optimizer and the rest: ``a_opt + b_opt L``.

``fwd_rate`` and ``bwd_rate`` are the FLOP/s a scoring pass reaches at the model's width (they
count the element-wise work, attention and output layer around the products), ``sgemm`` that of
one large product, ``stream`` the bytes/s few-row products read weights at.

A step is ``gradient_accumulation_steps`` micro-batches; the run adds validation
(:func:`evaluation_seconds`) before the first step, every ``steps_per_eval`` steps and after the last.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

#: the tokens a model judge's chat adds around the prompt and the two completions (rubric,
#: labels, template)
JUDGE_OVERHEAD_TOKENS = 80
PHASES = ("rollout", "judge", "reference", "policy", "other")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that set its cost."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def body(self) -> int:
        """Parameters of the projections: ``layers * (2 hidden q + 2 hidden kv + 3 hidden inter)``."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate)

    @property
    def head(self) -> int:
        """Parameters of the output layer (``vocab * hidden``, tied to the embedding or not)."""
        return self.vocab * self.hidden


def shape_of(config: dict) -> Shape:
    """The :class:`Shape` of a Hugging Face / mlx-lm ``config.json`` (``text_config`` of a
    multimodal model); KeyError naming a missing size."""
    c = config.get("text_config") or config
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    return Shape(
        hidden=hidden,
        layers=int(c["num_hidden_layers"]),
        intermediate=int(c["intermediate_size"]),
        heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        vocab=int(c["vocab_size"]),
    )


def read_shape(folder: str) -> Shape:
    with open(os.path.join(folder, "config.json")) as f:
        return shape_of(json.load(f))


@dataclass(frozen=True)
class Rates:
    """A machine's rates (see :mod:`mlx_xpo_plugin.commands.calibration`): sgemm FLOP/s, the bytes/s
    a few-row product streams its weights at, the FLOP/s of a scoring forward pass and of a forward
    + backward pass at two or more model widths (``((hidden, FLOP/s), ...)``, interpolated in
    ``log hidden`` by :func:`at_width`), and dispatch costs (seconds) ``(a, b)`` meaning ``a + b *
    layers`` for: a decode call, a decode token, a forward pass, a forward + backward pass, the
    optimizer and the rest of a step."""

    sgemm: float
    stream: float
    fwd_rate: tuple
    bwd_rate: tuple
    call: tuple
    token: tuple
    fwd: tuple
    bwd: tuple
    opt: tuple


@dataclass(frozen=True)
class Work:
    """What one step does: ``prompts`` per micro-batch, ``micro`` micro-batches, prompt and
    completion lengths, bytes per computed weight, the judge (``kind``: ``llm``, ``function``,
    ``http``, ``human``; its shape for ``llm``; ``judge_rows`` chats per pair; ``judge_tokens``
    generated per chat, 0 for ``mode: logits``)."""

    prompts: int
    micro: int
    prompt_len: float
    completion_len: int
    weight_bytes: float = 4.0
    judge_kind: str = "function"
    judge_shape: Shape | None = None
    judge_rows: int = 1
    judge_tokens: int = 0


def at_width(table: tuple, hidden: int) -> float:
    """The rate of ``table`` (``((hidden, rate), ...)`` sorted by hidden) at ``hidden``: linear in
    ``log hidden`` between the measured widths, the nearest one's outside them."""
    import math

    pts = sorted(table)
    if hidden <= pts[0][0]:
        return pts[0][1]
    for (h0, r0), (h1, r1) in zip(pts, pts[1:]):
        if hidden <= h1:
            u = (math.log(hidden) - math.log(h0)) / (math.log(h1) - math.log(h0))
            return r0 + u * (r1 - r0)
    return pts[-1][1]


def _lin(ab: tuple, layers: int) -> float:
    return ab[0] + ab[1] * layers


def rollout_seconds(s: Shape, r: Rates, rows: int, p: float, c: int, b: float) -> float:
    """Prompt pass plus ``c - 1`` decode steps of ``rows`` rows (see the module's formula)."""
    if rows == 0 or c <= 0:
        return 0.0
    w = s.body + s.head
    prefill = 2 * rows * p * w / at_width(r.fwd_rate, s.hidden)
    per_token = max(b * w / r.stream, 2 * rows * w / r.sgemm) + _lin(r.token, s.layers)
    return _lin(r.call, s.layers) + prefill + (c - 1) * per_token


def forward_flops(s: Shape, rows: int, p: float, c: int) -> float:
    """``2 R (p + c) N + 2 R c E + 4 L R (p + c)^2 hidden``."""
    t = p + c
    return 2 * rows * t * s.body + 2 * rows * c * s.head + 4 * s.layers * rows * t * t * s.hidden


def judge_seconds(w: Work, r: Rates) -> float | None:
    """Seconds a micro-batch's judge takes; None where it cannot be estimated (endpoint, person)."""
    if w.judge_kind in ("http", "human"):
        return None
    if w.judge_kind != "llm" or w.judge_shape is None:
        return 0.0
    js = w.judge_shape
    rows = w.prompts * w.judge_rows
    tokens = w.prompt_len + 2 * w.completion_len + JUDGE_OVERHEAD_TOKENS
    t = (2 * rows * tokens * js.body + 2 * rows * js.head) / at_width(r.fwd_rate, js.hidden) + _lin(r.fwd, js.layers)
    if w.judge_tokens:
        per = max(4 * (js.body + js.head) / r.stream, 2 * rows * (js.body + js.head) / r.sgemm)
        t += w.judge_tokens * (per + _lin(r.token, js.layers)) + _lin(r.call, js.layers)
    return t


def step_seconds(s: Shape, r: Rates, w: Work) -> dict:
    """Seconds of one optimizer step by phase (:data:`PHASES`, ``judge`` None where unknown) and
    ``total`` (of the known phases)."""
    rows = 2 * w.prompts
    f = forward_flops(s, rows, w.prompt_len, w.completion_len)
    judge = judge_seconds(w, r)
    out = {
        "rollout": w.micro * rollout_seconds(s, r, rows, w.prompt_len, w.completion_len, w.weight_bytes),
        "judge": None if judge is None else w.micro * judge,
        "reference": w.micro * (f / at_width(r.fwd_rate, s.hidden) + _lin(r.fwd, s.layers)),
        "policy": w.micro * (2 * f / at_width(r.bwd_rate, s.hidden) + _lin(r.bwd, s.layers)),
        "other": _lin(r.opt, s.layers),
    }
    out["total"] = sum(v for v in out.values() if v is not None)
    return out


def evaluation_seconds(s: Shape, r: Rates, w: Work, n_prompts: int, batch: int) -> float:
    """One validation pass: per batch of ``k <= batch`` prompts a policy and a reference completion
    each (``2k`` rows), the judge on ``k`` pairs, and two forward passes over the ``2k`` rows
    (reference and policy, no backward)."""
    if n_prompts <= 0:
        return 0.0
    full, rest = divmod(n_prompts, batch)
    total = 0.0
    for k, n in ((batch, full), (rest, 1 if rest else 0)):
        if n:
            j = judge_seconds(Work(**{**w.__dict__, "prompts": k, "micro": 1}), r) or 0.0
            f = forward_flops(s, 2 * k, w.prompt_len, w.completion_len) / at_width(r.fwd_rate, s.hidden)
            f += _lin(r.fwd, s.layers)
            total += n * (rollout_seconds(s, r, 2 * k, w.prompt_len, w.completion_len, w.weight_bytes) + j + 2 * f)
    return total
