"""MLX model judge: ``judge: path/to/local/model`` (any model ``mlx_lm.load`` reads).

Each pair becomes one chat: the rubric (``judge_system``, or :data:`common.DEFAULT_RUBRIC`) as the
system message, then the prompt with the two completions shown as "Response 0" and "Response 1"
and the request to answer with one digit. The label strings are ``"0"`` (Response 0 is better)
and ``"1"`` (Response 1 is better).

Modes (``judge_config``):

* ``mode: logits`` (default): one batched pass for all pairs, no generation. The token prefix
  every chat shares (system rubric, template head) is run once and its KV cache kept across calls
  (while the model's weight arrays are unchanged); the rest of each row runs in micro-batches of
  ``batch_size`` rows (default 8) sorted by length, through mlx_lm's ``BatchKVCache``
  (right-padded, then each row's last token at its own position), so the LM head runs on one
  position per row and the numbers equal a per-row forward pass. Models whose cache is not a
  plain KVCache get one right-padded forward pass per micro-batch instead. From the next-token
  log-probs of the two label tokens, a softmax over those two gives ``P(0)`` and ``P(1)``. The
  winner is the larger one with confidence ``max(P(0), P(1))``; a tie when
  ``|P(0) - P(1)| < tie_margin`` (default 0.02) or they are exactly equal. Non-finite log-probs
  give an invalid verdict; so does a label mass ``p("0") + p("1")`` (over the whole vocabulary)
  below ``min_label_prob`` (default 0.0: off), for judges that should abstain when they would not
  have answered with a digit at all. The label token ids come from encoding "0" and "1"; if a
  label encodes to several tokens, its first non-blank token is used (a leading SentencePiece
  "▁" is skipped); two labels sharing that token are refused when the judge is built.
* ``mode: generate``: greedy generation of at most ``max_tokens`` (default 8) tokens for all
  pairs at once (``mlx_lm``'s ``batch_generate``, starting from the same cached prefix KV, in
  micro-batches of ``batch_size``), parsed by :func:`parse.parse_answer`;
  anything it does not accept is an invalid verdict.

Position bias: with ``both_orders: true`` every pair is judged as (a, b) and (b, a) in the same
batch; only verdicts that agree survive (the others are invalid, ``raw`` says why) and
``last_metrics["judge/position_consistency"]`` is the fraction that agreed. Otherwise each pair is
shown swapped with probability 1/2 (``random.Random(seed)``; ``shuffle: false`` turns this off)
and the winner is mapped back; a tie or an invalid answer stays what it is.

The model is the trainer's reference model when the ``judge`` setting names the same path (no
second copy). A hub id is downloaded into the Hugging Face cache on first use (compute/hub.py).
"""

from __future__ import annotations

import math
import random
import time
from typing import Optional, Sequence

import numpy as np

from mlx_xpo_plugin.compute.models import model_folder, same_folder
from mlx_xpo_plugin.config import Setting
from mlx_xpo_plugin.contracts import JudgeContext, Verdict
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.judges.common import (
    SeededOrder,
    judge_in_order,
    options,
    pair_messages,
    render_chat,
    resolve_options,
)
from mlx_xpo_plugin.judges.parse import LABELS, parse_answer, unparsed

# fmt: off
OPTIONS = options(
    Setting("mode", "str", "logits", "how the answer is read", choices=("logits", "generate")),
    Setting("both_orders", "bool", False, "judge both orders, keep consistent verdicts"),
    Setting("shuffle", "bool", True, "show each pair in a random order"),
    Setting("tie_margin", "float", 0.02, "label probabilities closer than this tie",
            minimum=0.0, maximum=1.0, exclusive_maximum=True),
    Setting("min_label_prob", "float", 0.0, "less mass on the labels is an invalid answer",
            minimum=0.0, maximum=1.0, exclusive_maximum=True),
    Setting("max_tokens", "int", 8, "tokens generated in generate mode", minimum=1, maximum=256),
    Setting("batch_size", "int", 8, "pairs per forward pass", minimum=1),
)
# fmt: on


# ---------------------------------------------------------------------------------------------
# where the model comes from


def resolve_model(spec: str, ctx: JudgeContext) -> Optional[str]:
    """The local folder to load, or None to reuse ``ctx.reference_model``. ConfigError otherwise."""
    if (
        ctx.reference_model is not None
        and ctx.reference_tokenizer is not None
        and same_folder(spec, ctx.reference_model_path)
    ):
        return None
    return model_folder(
        "judge",
        spec,
        otherwise="use 'human', an http(s):// URL, 'module:callable', 'path/file.py:callable' or a local model folder",
        file_hint="for a Python judge write 'path/file.py:callable'",
    )


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a chat-templated text; adds special tokens only when the text does not
    already start with the BOS token (as ``mlx_lm.generate`` does)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = bos is None or not text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=add))


def label_token_ids(tokenizer) -> tuple[int, int]:
    """The next-token ids of the labels "0" and "1" (see the module docstring)."""
    ids = []
    for lab in LABELS:
        toks = list(tokenizer.encode(lab, add_special_tokens=False))
        if not toks:
            raise ConfigError(
                "judge_config.mode",
                "logits",
                f"the judge tokenizer encodes the label {lab!r} to no token",
                "use mode: generate",
            )
        pick = toks[0]
        for t in toks:
            if tokenizer.decode([t]).replace("\u2581", " ").strip():
                pick = t
                break
        ids.append(int(pick))
    if ids[0] == ids[1]:
        raise ConfigError(
            "judge_config.mode",
            "logits",
            "the judge tokenizer gives the labels "
            "'0' and '1' the same first token, so logits mode cannot tell them "
            "apart",
            "use mode: generate",
        )
    return ids[0], ids[1]


# ---------------------------------------------------------------------------------------------
# the judge


class LLMJudge(SeededOrder):
    """A PairwiseJudge backed by an MLX language model (see the module docstring)."""

    def __init__(self, model, tokenizer, rubric: Optional[str] = None, seed: int = 0, **options):
        opts = resolve_options("model", options, OPTIONS)
        self.model, self.tokenizer, self.rubric = model, tokenizer, rubric
        self.mode, self.both_orders, self.shuffle = opts["mode"], opts["both_orders"], opts["shuffle"]
        self.tie_margin, self.min_label_prob = float(opts["tie_margin"]), float(opts["min_label_prob"])
        self.max_tokens, self.batch_size = int(opts["max_tokens"]), int(opts["batch_size"])
        self.rng = random.Random(seed)
        self.label_ids = label_token_ids(tokenizer) if self.mode == "logits" else None
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.prefix_cache = True  # share the KV of the common token prefix (see label_logprobs)
        self._prefix, self._weights, self._can_batch = None, None, None
        self.last_metrics: dict = {}
        self.last_flips: list[bool] = []

    # -- text -> tokens
    def encode(self, prompt: str, a: str, b: str) -> list[int]:
        text = render_chat(self.tokenizer, pair_messages(self.rubric, prompt, a, b))
        return encode_prompt(self.tokenizer, text)

    # -- one batched pass: label log-probs at each row's last position
    def _weights_same(self) -> bool:
        from mlx.utils import tree_flatten

        leaves = [v for _, v in tree_flatten(self.model.parameters())]
        same = (
            self._weights is not None
            and len(leaves) == len(self._weights)
            and all(a is b for a, b in zip(leaves, self._weights))
        )
        self._weights = leaves
        return same

    def _batchable(self) -> bool:
        """Whether the model's cache is plain KVCache (so BatchKVCache works for it)."""
        if self._can_batch is None:
            from mlx_lm.models.cache import make_prompt_cache

            from mlx_xpo_plugin.compute.decode import supports

            self._can_batch = supports(self.model)
            self._n_layers = len(make_prompt_cache(self.model))
        return self._can_batch

    def _prefix_kv(self, seqs: Sequence[Sequence[int]]):
        """(P, per-layer (keys, values)) of a token prefix every row shares (the rubric and the
        template head), run once with B=1 and kept across calls while it still prefixes every row
        and the model's weight arrays are the same objects; (0, None) when there is none."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        first, limit = seqs[0], min(len(s) for s in seqs) - 1  # every row keeps >= 1 token
        P = 0
        while P < limit and all(s[P] == first[P] for s in seqs):
            P += 1
        same_weights = self._weights_same()
        if self._prefix is not None and same_weights:
            key, kv = self._prefix
            if len(key) <= P and tuple(first[: len(key)]) == key:
                return len(key), kv
        if P == 0:
            return 0, None
        cache = make_prompt_cache(self.model)
        self.model(mx.array([list(first[:P])], dtype=mx.int32), cache=cache)
        kv = [(c.keys[..., :P, :], c.values[..., :P, :]) for c in cache]
        mx.eval(kv)  # only the caches: the logits of the prefix are never computed
        self._prefix = (tuple(first[:P]), kv)
        return P, kv

    def _batch_last_logits(self, rows: Sequence[Sequence[int]], P: int, kv):
        """Next-token logits (B, V) after each full row, given the shared prefix's KV.

        Phase 1 runs every row's suffix except its last token, right-padded, into a BatchKVCache
        seeded with the broadcast prefix, and evaluates only the cache (so the last layer's
        outputs and the LM head are never computed for those positions). ``finalize`` moves each
        row's padding to the left, where the mask hides it; phase 2 runs each row's last token at
        its own position and gives the logits. Same numbers as a per-row forward pass."""
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        B = len(rows)
        body = [list(r[P:-1]) for r in rows]
        width = max(len(b) for b in body)
        cache = []
        for layer in range(self._n_layers):
            c = BatchKVCache([0] * B)
            if kv is not None:
                k, v = kv[layer]
                c.state = (
                    mx.broadcast_to(k, (B,) + k.shape[1:]),
                    mx.broadcast_to(v, (B,) + v.shape[1:]),
                    mx.array([P] * B),
                    mx.array([0] * B),
                    P,
                )
            cache.append(c)
        if width > 0:
            arr = np.full((B, width), self.pad_id, dtype=np.int32)
            for r, b in enumerate(body):
                arr[r, : len(b)] = b
            for c in cache:
                c.prepare(right_padding=[width - len(b) for b in body])
            self.model(mx.array(arr), cache=cache)
            for c in cache:
                c.finalize()
            mx.eval([(c.keys, c.values, c.offset, c.left_padding) for c in cache])
        last = mx.array(np.asarray([[r[-1]] for r in rows], dtype=np.int32))
        return self.model(last, cache=cache)[:, -1, :]

    def _plain_last_logits(self, rows: Sequence[Sequence[int]]):
        """Next-token logits (B, V) by one right-padded forward pass without a cache (models
        whose cache is not a plain KVCache); causal attention keeps the padding out."""
        import mlx.core as mx

        lens = np.asarray([len(r) for r in rows], dtype=np.int32)
        arr = np.full((len(rows), int(lens.max())), self.pad_id, dtype=np.int32)
        for i, r in enumerate(rows):
            arr[i, : len(r)] = r
        logits = self.model(mx.array(arr))
        return logits[mx.arange(len(rows)), mx.array(lens - 1)]

    def label_logprobs(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """(n, 2) float64 log-probs (over the whole vocabulary) of the labels "0" and "1" as the
        next token after each sequence: the shared prefix once, then micro-batches of
        ``batch_size`` rows sorted by length (see :meth:`_batch_last_logits`)."""
        import mlx.core as mx

        n = len(seqs)
        out = np.zeros((n, 2), dtype=np.float64)
        if n == 0:
            return out
        if min(len(s) for s in seqs) < 1:
            raise ValueError("cannot judge an empty token sequence")
        batched = self.prefix_cache and self._batchable()
        P, kv = self._prefix_kv(seqs) if batched else (0, None)
        order = sorted(range(n), key=lambda i: len(seqs[i]))
        ids = mx.array(np.asarray(self.label_ids, dtype=np.int32))
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            chunk = [seqs[i] for i in rows]
            logits = (self._batch_last_logits(chunk, P, kv) if batched else self._plain_last_logits(chunk)).astype(
                mx.float32
            )
            lp = mx.take(logits, ids, axis=1) - mx.logsumexp(logits, axis=-1, keepdims=True)
            out[rows] = np.array(lp, dtype=np.float64)
        return out

    def _logits_verdict(self, lp0: float, lp1: float) -> tuple[Verdict, Optional[float]]:
        raw = {"logprob_0": lp0, "logprob_1": lp1}
        if not (math.isfinite(lp0) and math.isfinite(lp1)):
            return Verdict.bad(raw, "no finite log-probability of the labels 0 and 1"), None
        p1 = 1.0 / (1.0 + math.exp(lp0 - lp1)) if lp0 - lp1 < 700 else 0.0
        p0 = 1.0 - p1
        raw["p_second"] = p1
        if math.exp(lp0) + math.exp(lp1) < self.min_label_prob:
            raw["reason"] = f"label mass below min_label_prob={self.min_label_prob}"
            mass = math.exp(lp0) + math.exp(lp1)
            return Verdict.bad(raw, f"label mass {mass:.2g} below min_label_prob={self.min_label_prob}"), p1
        if p0 == p1 or abs(p0 - p1) < self.tie_margin:
            return Verdict.tied(raw), p1
        return (Verdict(1, p1, raw) if p1 > p0 else Verdict(0, p0, raw)), p1

    def _generate(self, seqs) -> list[str]:
        """Greedy answers (at most ``max_tokens`` tokens) for every sequence, batched; the shared
        token prefix comes from the same cached KV as in logits mode (``batch_generate`` does not
        change the caches it is given)."""
        from mlx_lm.generate import batch_generate
        from mlx_lm.models.cache import KVCache

        if not seqs:
            return []
        P, kv = self._prefix_kv(seqs) if self.prefix_cache and self._batchable() else (0, None)
        texts: list[str] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = [list(s[P:]) for s in seqs[start : start + self.batch_size]]
            caches = None
            if kv is not None:
                caches = []
                for _ in chunk:
                    row = []
                    for k, v in kv:
                        c = KVCache()
                        c.state = (k, v, P)
                        row.append(c)
                    caches.append(row)
            res = batch_generate(
                self.model, self.tokenizer, chunk, prompt_caches=caches, max_tokens=self.max_tokens, verbose=False
            )
            texts.extend(res.texts)
        return texts

    def judge_ordered(
        self, triples: Sequence[tuple[str, str, str]]
    ) -> tuple[list[Verdict], list[Optional[float]], dict]:
        """Judge (prompt, first, second) triples as given, no shuffling: verdicts, P(second better)
        where known, and metrics."""
        seqs = [self.encode(p, a, b) for p, a, b in triples]
        if not seqs:
            return [], [], {}
        if self.mode == "logits":
            lp = self.label_logprobs(seqs)
            res = [self._logits_verdict(float(x), float(y)) for x, y in lp]
            with np.errstate(over="ignore", invalid="ignore"):
                mass = np.exp(lp).sum(axis=1)
            finite = mass[np.isfinite(mass)]
            metrics = {"judge/label_mass": float(finite.mean()) if finite.size else 0.0}
            return [v for v, _ in res], [p for _, p in res], metrics
        texts = self._generate(seqs)
        verdicts = []
        for t in texts:
            w = parse_answer(t)
            verdicts.append(Verdict(w, None, t) if w is not None else Verdict.bad(t, unparsed(t)))
        return verdicts, [None] * len(texts), {}

    def judge(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        t0 = time.perf_counter()
        out, metrics, self.last_flips = judge_in_order(
            prompts, pairs, self.judge_ordered, both_orders=self.both_orders, shuffle=self.shuffle, rng=self.rng
        )
        metrics["judge/forward_seconds"] = time.perf_counter() - t0
        self.last_metrics = metrics
        return out


# ---------------------------------------------------------------------------------------------
# factory functions


def matches(spec: str) -> bool:
    return isinstance(spec, str) and bool(spec.strip())


def check(spec: str, ctx: JudgeContext) -> None:
    resolve_options("model", ctx.judge_config, OPTIONS)
    if same_folder(spec, ctx.reference_model_path):
        return  # the trainer loads (and checks) its reference model itself
    resolve_model(spec, ctx)


def build(spec: str, ctx: JudgeContext) -> LLMJudge:
    opts = resolve_options("model", ctx.judge_config, OPTIONS)
    path = resolve_model(spec, ctx)
    if path is None:
        model, tokenizer = ctx.reference_model, ctx.reference_tokenizer
    else:
        from mlx_xpo_plugin.compute.precision import load  # mlx and mlx_lm: only when a judge loads

        model, tokenizer = load(path, ctx.compute_dtype, "judge")
    return LLMJudge(model, tokenizer, rubric=ctx.judge_system, seed=ctx.seed, **opts)
