"""The prompt pass computes logits at the last position only: the same tokens and log-probs as
the whole prompt's logits, without the [rows, prompt, vocabulary] product."""

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.sample_utils import make_sampler

from mlx_xpo_plugin.compute import decode
from tests.test_decode import with_live_adapters
from tests.test_scoring_blocks import VOCAB, WIDE_CFG

PROMPTS = [[5, 17, 42, 8, 99, 3, 250, 31, 64], [11, 7], [300, 4, 4, 60, 2], [9]]  # left padding


def every_position(model, x, caches):
    """The prompt pass as it was: the whole prompt's logits, the last position's kept."""
    return model(x, cache=caches)[:, -1, :]


class Recording:
    """mlx-lm's sampler at temperature 0.8, recording the log-probs it is given."""

    def __init__(self):
        self.sample, self.seen = make_sampler(temp=0.8), []

    def __call__(self, logprobs):
        self.seen.append(np.array(logprobs))
        return self.sample(logprobs)


def generate(model, prompts, max_tokens, seed=7):
    mx.random.seed(seed)
    sampler = Recording()
    return decode.generate(model, prompts, max_tokens, sampler, stop_ids=[]), sampler.seen


def test_same_tokens_and_log_probs_as_the_whole_prompts_logits(tiny_model, monkeypatch):
    model, _ = tiny_model
    new_tokens, new_lp = generate(model, PROMPTS, 12)
    monkeypatch.setattr(decode, "prefill", every_position)
    old_tokens, old_lp = generate(model, PROMPTS, 12)
    assert new_tokens == old_tokens
    assert [len(r) for r in new_tokens] == [12] * 4
    assert max(np.abs(a - b).max() for a, b in zip(new_lp, old_lp)) <= 1e-5


def test_same_tokens_with_lora_and_the_row_split(lora_model, monkeypatch):
    model = with_live_adapters(lora_model[0])
    new = generate(model, PROMPTS, 8, seed=3)[0]
    monkeypatch.setattr(decode, "prefill", every_position)
    assert generate(model, PROMPTS, 8, seed=3)[0] == new


def test_prefill_returns_the_last_positions_logits(tiny_model):
    model, _ = tiny_model
    width = max(len(p) for p in PROMPTS)
    pad = mx.array([width - len(p) for p in PROMPTS], dtype=mx.int32)
    x = mx.array([[0] * (width - len(p)) + p for p in PROMPTS], dtype=mx.int32)
    n = len(model.layers)
    got = decode.prefill(model, x, [decode.StaticKVCache(width + 1, pad) for _ in range(n)])
    want = every_position(model, x, [decode.StaticKVCache(width + 1, pad) for _ in range(n)])
    assert got.shape == want.shape == (len(PROMPTS), model.args.vocab_size)
    assert mx.abs(got - want).max().item() <= 1e-5
    one = mx.array([[7]], dtype=mx.int32)  # a one-token prompt: one call
    caches = [decode.StaticKVCache(2, mx.array([0], dtype=mx.int32)) for _ in range(n)]
    assert mx.array_equal(decode.prefill(model, one, caches), model(one)[:, -1, :])


def test_the_prompt_pass_peak_holds_no_prompt_wide_logits(monkeypatch):
    """4 rows x 256 prompt tokens x 16,384 entries: the whole prompt's float32 logits are 64 MiB;
    the prompt pass now leaves them uncomputed."""
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(WIDE_CFG))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, 256)] for _ in range(4)]
    logits_mib = 4 * 256 * VOCAB * 4 / 2**20

    def peak_mib():
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        decode.generate(model, prompts, 1, lambda lp: mx.argmax(lp, axis=-1), stop_ids=[])
        return (mx.get_peak_memory() - base) / 2**20

    new = peak_mib()
    monkeypatch.setattr(decode, "prefill", every_position)
    old = peak_mib()
    print(f"prompt pass peak: {old:.1f} MiB with every position's logits, {new:.1f} MiB now")
    assert old >= logits_mib  # the whole prompt's logits were held
    assert new <= old - 0.8 * logits_mib
