"""Large vocabularies: completion log-probs in blocks of positions give the same values and
gradients as one pass; the reference pass never holds [rows, positions, vocab] float32 logits at
once, and the differentiated policy pass runs in one pass."""

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_xpo_plugin.compute import scoring as S

VOCAB = 16384  # 4 rows x 80 positions x VOCAB x 4 bytes = 20 MiB of float32 logits
WIDE_CFG = dict(
    model_type="qwen2",
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def wide():
    """A 1-layer qwen2 with a wide vocabulary (tied embeddings) and LoRA on every projection."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(3)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(WIDE_CFG))
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "dropout": 0.0, "scale": 10.0})
    for name, p in tree_flatten(model.trainable_parameters()):  # lora_b = 0 at init: perturb it
        if name.endswith("lora_b"):
            model.update(_unflat(name, mx.random.normal(p.shape, scale=0.05)))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in (6, 9, 4, 7)]
    comps = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in (80, 63, 71, 80)]
    return model, S.pack(prompts, comps), S.pack(prompts, [c[:20] for c in comps])


def _unflat(name, value):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(name, value)])


def _scores_and_grads(model, batch, extras=True, forward_only=False):
    inputs, targets, mask = batch

    def loss(m):
        if not extras:
            sc = S.completion_logps(m, inputs, targets, mask, forward_only=forward_only)
            return sc.sum.sum(), sc
        sc = S.completion_logps(m, inputs, targets, mask, with_entropy=True, temperature=0.7, forward_only=forward_only)
        return sc.sum.sum() + 0.3 * sc.tempered.sum() + 0.1 * sc.entropy.sum(), sc

    (value, sc), grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, sc.tokens, grads, *([sc.entropy, sc.tempered] if extras else []))
    return sc, dict(tree_flatten(grads))


def test_blocks_give_the_same_values_and_gradients(wide, monkeypatch):
    """Blocks are for passes without a gradient, but one taken through them is still right."""
    model, _, batch = wide
    one, g1 = _scores_and_grads(model, batch)
    monkeypatch.setattr(S, "LOGITS_BLOCK_BYTES", 4 * VOCAB * 4 * 7)  # blocks of 7 positions
    blocks, g2 = _scores_and_grads(model, batch, forward_only=True)
    for a, b in ((one.tokens, blocks.tokens), (one.entropy, blocks.entropy), (one.tempered, blocks.tempered)):
        assert a.shape == b.shape and mx.allclose(a, b, atol=1e-4, rtol=1e-5).item()
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        assert mx.allclose(g1[k], g2[k], atol=1e-4, rtol=1e-4).item(), k


def _peak_mib(fn) -> float:
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    fn()
    return (mx.get_peak_memory() - base) / 2**20


def test_reference_pass_peak_is_one_block_not_all_logits(wide, monkeypatch):
    """20 MiB of float32 logits in one pass; the reference pass (pair_loss.reference_logps) in
    blocks of 0.5 MiB peaks below the logits themselves."""
    from mlx_xpo_plugin.loop.pair_loss import reference_logps

    class Reference:  # the model as its own reference
        def use(self):
            return contextlib.nullcontext(model)

    model, (inputs, targets, mask), _ = wide
    full_bytes = inputs.shape[0] * (inputs.shape[1] - S.first_completion_position(mask)) * VOCAB * 4

    def run():
        mx.eval(reference_logps(Reference(), inputs, targets, mask))

    run()  # warm: allocations of the first call
    monkeypatch.setattr(S, "LOGITS_BLOCK_BYTES", 1 << 19)
    blocked = _peak_mib(run)
    monkeypatch.setattr(S, "LOGITS_BLOCK_BYTES", 1 << 62)
    whole = _peak_mib(run)
    assert whole > full_bytes / 2**20  # one pass holds at least the logits themselves
    assert blocked < full_bytes / 2**20 and blocked < whole / 4, (blocked, whole)


def test_a_differentiated_pass_runs_in_one_pass():
    """Blocks evaluated inside a gradient transform keep every intermediate of the forward pass
    (LoRA's included) until the backward pass: on 8 layers this doubles the policy pass's peak
    (at Qwen2.5-0.5B's 24 layers it took 13.0 GB and 2.3x the time of one pass's 7.5 GB,
    docs/precision.md). The policy pass therefore ignores LOGITS_BLOCK_BYTES."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    vocab = 4096
    cfg = dict(WIDE_CFG, num_hidden_layers=8, intermediate_size=256, vocab_size=vocab)
    mx.random.seed(4)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg))
    model.freeze()
    linear_to_lora_layers(model, 8, {"rank": 4, "dropout": 0.0, "scale": 10.0})
    mx.eval(model.parameters())
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, vocab, n)] for n in (6, 9, 4, 7)]
    comps = [[int(t) for t in rng.integers(3, vocab, n)] for n in (80, 63, 71, 80)]
    batch = S.pack(prompts, comps)
    run = lambda forward_only=False: _scores_and_grads(model, batch, False, forward_only)  # noqa: E731
    run()  # warm
    S_bytes = S.LOGITS_BLOCK_BYTES
    try:
        S.LOGITS_BLOCK_BYTES = 1 << 62
        one_pass = _peak_mib(run)
        S.LOGITS_BLOCK_BYTES = 1 << 19  # 32 positions a block
        policy = _peak_mib(run)
        blocks_under_grad = _peak_mib(lambda: run(forward_only=True))
    finally:
        S.LOGITS_BLOCK_BYTES = S_bytes
    assert policy < 1.05 * one_pass, (policy, one_pass)
    assert blocks_under_grad > 1.3 * one_pass, (blocks_under_grad, one_pass)
