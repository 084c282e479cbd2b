"""Batched sampling of completions as token ids (with text for the judge and an EOS flag).

All completions of a batch are generated together: by the compiled fixed-shape decoder of
:mod:`.decode` where the model's cache allows it (plain KV caches, most models), else by mlx-lm's
BatchGenerator. The sampled token ids travel unchanged to scoring; the text is decoded only for
the judge. xpo's paper form and evaluation sample one policy and one reference completion per
prompt (:func:`sample_policy_and_reference`). While sampling, a preloaded OpenBLAS runs on every
idle core (:func:`.fast_blas.decoding_threads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlx_xpo_plugin.compute import decode
from mlx_xpo_plugin.cpu.fast_blas import decoding_threads


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def sampler(self):
        """mlx-lm's sampler: top_p, min_p and top_k filter the untempered log-probs, then a token is
        drawn from softmax(logits / temperature). top_k >= the vocabulary size keeps every token
        (off), decided from the logits' shape when the sampler is called."""
        # make_sampler treats top_p in (0, 1) as active; 1.0 is "off".
        kw = dict(temp=self.temperature, top_p=self.top_p if self.top_p < 1.0 else 0.0, min_p=self.min_p)
        with_k, without_k = make_sampler(top_k=self.top_k, **kw), make_sampler(top_k=0, **kw)
        k = self.top_k
        return lambda logprobs: (with_k if 0 < k < logprobs.shape[-1] else without_k)(logprobs)


@dataclass
class Completion:
    tokens: list  # sampled ids; ends with the EOS id iff `eos`
    text: str  # decoded without the EOS, for the judge
    eos: bool


def sample_completions(
    model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], n: int, cfg: SamplingConfig
) -> list[list[Completion]]:
    """`n` completions for each prompt, generated in one batch; result[i][j] is completion j of prompt i."""
    eos_ids = sorted(set(tokenizer.eos_token_ids))
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # sample from the policy itself: no (LoRA) dropout while generating
    flat = [list(p) for p in prompts for _ in range(n)]
    try:
        with decoding_threads(sum(v.nbytes for _, v in tree_flatten(model.parameters()))):
            if decode.supports(model):
                generated = decode.generate(model, flat, cfg.max_tokens, cfg.sampler(), eos_ids)
            else:
                generated = _batch_generator(model, flat, cfg, eos_ids)
    finally:
        if was_training:
            model.train()
    out: list[list[Completion]] = []
    for i in range(len(prompts)):
        row = []
        for j in range(n):
            toks = generated[i * n + j]
            ended = bool(toks) and toks[-1] in eos_ids
            body = toks[:-1] if ended else toks
            row.append(Completion(tokens=toks, text=tokenizer.decode(body), eos=ended))
        out.append(row)
    return out


def sample_policy_and_reference(
    model: nn.Module, tokenizer, reference, prompts: Sequence[Sequence[int]], cfg: SamplingConfig
) -> list[tuple[Completion, Completion]]:
    """One policy and one reference completion per prompt: in one batch of policy rows then
    reference rows where the reference allows it (:meth:`.reference.Reference.rows_split`, a
    fixed-shape batch), else in two batches."""
    P = len(prompts)
    split = reference.rows_split(P, P) if decode.supports(model) else None
    if split is not None:
        with split as both_policies:
            both = sample_completions(both_policies, tokenizer, list(prompts) * 2, 1, cfg)
        pol, ref = both[:P], both[P:]
    else:
        pol = sample_completions(model, tokenizer, prompts, 1, cfg)
        with reference.use() as ref_model:
            ref = sample_completions(ref_model, tokenizer, prompts, 1, cfg)
    return [(p[0], r[0]) for p, r in zip(pol, ref)]


def _batch_generator(model, flat: list, cfg: SamplingConfig, eos_ids: list) -> list[list[int]]:
    """The sampled ids of every row (a stop token included) via mlx-lm's BatchGenerator."""
    gen = BatchGenerator(
        model,
        max_tokens=cfg.max_tokens,
        stop_tokens=[[t] for t in eos_ids],
        sampler=cfg.sampler(),
        completion_batch_size=max(1, len(flat)),
        prefill_batch_size=max(1, len(flat)),
    )
    try:
        uids = gen.insert(flat)
        tokens = {u: [] for u in uids}
        done = 0
        while done < len(uids):
            responses = gen.next_generated()
            if not responses:
                break
            for r in responses:
                tokens[r.uid].append(r.token)  # a stop token is appended too
                if r.finish_reason is not None:
                    done += 1
    finally:
        gen.close()
    return [tokens[u] for u in uids]
