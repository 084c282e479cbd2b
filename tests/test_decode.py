"""The compiled fixed-shape decoder: same tokens and log-probabilities as mlx-lm's own paths."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.sample_utils import make_sampler

from mlx_xpo_plugin.compute import decode
from mlx_xpo_plugin.compute.rollout import SamplingConfig, sample_completions

PROMPTS = [[5, 17, 42, 8, 99, 3, 250], [11, 7], [300, 4, 4, 60, 2]]  # three lengths: left padding


def batch_generator_greedy(model, prompts, max_tokens, stop_ids=()):
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in stop_ids],
        sampler=make_sampler(temp=0.0),
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
    )
    try:
        uids = gen.insert([list(p) for p in prompts])
        out = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[u] for u in uids]


def with_live_adapters(model):
    """Give every LoRA matrix non-zero values, so that the adapters change the output."""
    rng = np.random.default_rng(3)
    params = [
        (k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten(params))
    model.eval()
    return model


def test_greedy_tokens_equal_batch_generator(tiny_model):
    model, _ = tiny_model
    ours = decode.generate(model, PROMPTS, 20, make_sampler(temp=0.0), stop_ids=[])
    assert [len(r) for r in ours] == [20, 20, 20]
    assert ours == batch_generator_greedy(model, PROMPTS, 20)


def test_greedy_tokens_equal_batch_generator_with_lora(lora_model):
    model = with_live_adapters(lora_model[0])
    ours = decode.generate(model, PROMPTS, 16, make_sampler(temp=0.0), stop_ids=[])
    assert ours == batch_generator_greedy(model, PROMPTS, 16)


class Forced:
    """A sampler that emits given tokens (one list per row) and records the log-probs it saw."""

    def __init__(self, rows):
        self.rows, self.t, self.seen = rows, 0, []

    def __call__(self, logprobs):
        self.seen.append(logprobs)
        y = mx.array([r[self.t] for r in self.rows])
        self.t += 1
        return y


def test_log_probs_at_every_step_equal_an_unpadded_full_forward(tiny_model):
    model, _ = tiny_model
    rng = np.random.default_rng(0)
    conts = [[int(t) for t in rng.integers(3, 500, 6)] for _ in PROMPTS]
    forced = Forced(conts)
    got = decode.generate(model, PROMPTS, 6, forced, stop_ids=[])
    assert got == conts
    seen = np.stack([np.array(a) for a in forced.seen], axis=1)  # [B, steps, V]
    for b, (p, c) in enumerate(zip(PROMPTS, conts)):
        logits = model(mx.array([p + c[:-1]]))[0].astype(mx.float32)
        want = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[len(p) - 1 :]
        np.testing.assert_allclose(seen[b], want, atol=2e-4)


def test_each_row_stops_after_its_own_stop_token(tiny_model):
    model, _ = tiny_model
    stop = 1
    conts = [[9, stop, 9, 9, 9], [9, 9, 9, 9, stop], [9, 9, 9, 9, 9]]
    got = decode.generate(model, PROMPTS, 5, Forced(conts), stop_ids=[stop])
    assert got == [[9, stop], [9, 9, 9, 9, stop], [9, 9, 9, 9, 9]]


def test_all_rows_stopped_ends_generation_early(tiny_model):
    model, _ = tiny_model
    forced = Forced([[2, 1] + [9] * 50] * 3)
    got = decode.generate(model, PROMPTS, 50, forced, stop_ids=[1])
    assert got == [[2, 1]] * 3
    assert len(forced.seen) <= 3  # the last queued step at most, never the 50 allowed


def test_empty_prompt_is_refused(tiny_model):
    model, _ = tiny_model
    try:
        decode.generate(model, [[1, 2], []], 3, make_sampler(temp=0.0), stop_ids=[])
    except ValueError as e:
        assert "at least one token" in str(e)
    else:
        raise AssertionError("an empty prompt was accepted")


class SlidingWindowModel(nn.Module):
    """The tiny model with a rotating (sliding-window) cache: not a plain KV cache."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def layers(self):
        return self.inner.layers

    def make_cache(self):
        return [RotatingKVCache(max_size=256) for _ in self.inner.layers]

    def __call__(self, x, cache=None, **kw):
        return self.inner(x, cache=cache, **kw)


def test_models_without_plain_kv_caches_use_batch_generator(tiny_model, monkeypatch):
    model, tok = tiny_model
    assert decode.supports(model)
    wrapped = SlidingWindowModel(model)
    assert not decode.supports(wrapped)

    calls = []
    real = decode.generate
    monkeypatch.setattr(decode, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = SamplingConfig(max_tokens=8, temperature=0.0)
    fallback = sample_completions(wrapped, tok, PROMPTS, 1, cfg)
    assert calls == []
    compiled = sample_completions(model, tok, PROMPTS, 1, cfg)
    assert calls == [1]
    assert [r[0].tokens for r in fallback] == [r[0].tokens for r in compiled]


def test_the_model_keeps_its_own_weight_objects(lora_model):
    """mx.compile swaps the weight arrays for equal new objects on every call; they are put back,
    so caches keyed by the weights' identity (the LLM judge's shared prefix) survive a rollout."""
    model = with_live_adapters(lora_model[0])
    before = tree_flatten(model.parameters())
    decode.generate(model, PROMPTS, 4, make_sampler(temp=0.0), stop_ids=[])
    after = tree_flatten(model.parameters())
    assert [k for k, _ in after] == [k for k, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))


# ---- policy and reference rows in one batch (the xpo 'paper' rollout)


def test_one_batch_of_policy_and_reference_rows_gives_each_policys_own_tokens(lora_model):
    from mlx_xpo_plugin.compute.reference import Reference, adapters_off

    model = with_live_adapters(lora_model[0])
    greedy = make_sampler(temp=0.0)
    policy = decode.generate(model, PROMPTS, 12, greedy, stop_ids=[])
    with adapters_off(model) as base:
        reference = decode.generate(base, PROMPTS, 12, greedy, stop_ids=[])
    assert policy != reference  # the adapters matter, so a mix-up would show
    n = len(PROMPTS)
    with Reference(model).rows_split(n, n) as both:
        mixed = decode.generate(both, PROMPTS + PROMPTS, 12, greedy, stop_ids=[])
    assert mixed[:n] == policy and mixed[n:] == reference


def test_the_row_split_leaves_the_model_as_it_was(lora_model):
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_xpo_plugin.compute.reference import Reference

    model = with_live_adapters(lora_model[0])
    before = tree_flatten(model.parameters())
    with Reference(model).rows_split(1, 1) as both:
        assert any(type(m).__name__ == "RowGatedLoRA" for _, m in both.named_modules())
    after = tree_flatten(model.parameters())
    assert [k for k, _ in after] == [k for k, _ in before] and all(a is b for (_, a), (_, b) in zip(after, before))
    assert any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_no_row_split_for_dora_or_a_separate_reference(tiny_model_path, tiny_model, tmp_path):
    from mlx_lm_lora.utils import from_pretrained

    from mlx_xpo_plugin.compute.reference import Reference

    dora, _, _ = from_pretrained(
        tiny_model_path,
        new_adapter_path=str(tmp_path / "ad"),
        lora_config={"rank": 4, "dropout": 0.0, "scale": 10.0, "use_dora": True, "num_layers": -1},
    )
    assert Reference(dora).rows_split(1, 1) is None  # DoRA's weight norm cannot be gated per row
    assert Reference(dora, separate=tiny_model[0]).rows_split(1, 1) is None


def test_the_paper_rollout_samples_both_policies_in_one_batch(lora_model, monkeypatch):
    from mlx_xpo_plugin.compute import rollout as R
    from mlx_xpo_plugin.compute.reference import Reference, adapters_off
    from mlx_xpo_plugin.loop.settings import LoopSettings
    from mlx_xpo_plugin.xpo_trainer import XPO

    model, tok, _ = lora_model
    model = with_live_adapters(model)
    calls = []
    real = R.sample_completions
    monkeypatch.setattr(
        R, "sample_completions", lambda m, t, p, n, c: (calls.append(len(p) * n), real(m, t, p, n, c))[1]
    )
    greedy = SamplingConfig(max_tokens=6, temperature=0.0)
    xpo = XPO(LoopSettings(iters=1, xpo_bonus="paper"))
    triples = xpo.rollout(model, tok, Reference(model), PROMPTS, greedy)
    assert calls == [2 * len(PROMPTS)]
    pol = real(model, tok, PROMPTS, 1, greedy)
    with adapters_off(model) as base:
        ref = real(base, tok, PROMPTS, 1, greedy)
    assert [a.tokens for a, _, _ in triples] == [r[0].tokens for r in pol]
    assert [b.tokens for _, b, _ in triples] == [r[0].tokens for r in ref]
    assert [side for _, _, side in triples] == [1, 1, 1]
