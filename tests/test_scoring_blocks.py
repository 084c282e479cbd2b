"""Large vocabularies: completion log-probs in blocks of positions give the same values and
gradients as one pass, and never hold [rows, positions, vocab] float32 logits at once."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_xpo_plugin.compute import scoring as S

VOCAB = 16384  # 4 rows x 80 positions x VOCAB x 4 bytes = 20 MiB of float32 logits


@pytest.fixture(scope="module")
def wide():
    """A 1-layer qwen2 with a wide vocabulary (tied embeddings) and LoRA on every projection."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    cfg = dict(
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
    mx.random.seed(3)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg))
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


def _scores_and_grads(model, batch, extras=True):
    inputs, targets, mask = batch

    def loss(m):
        if not extras:
            sc = S.completion_logps(m, inputs, targets, mask)
            return sc.sum.sum(), sc
        sc = S.completion_logps(m, inputs, targets, mask, with_entropy=True, temperature=0.7)
        return sc.sum.sum() + 0.3 * sc.tempered.sum() + 0.1 * sc.entropy.sum(), sc

    (value, sc), grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, sc.tokens, grads, *([sc.entropy, sc.tempered] if extras else []))
    return sc, dict(tree_flatten(grads))


def test_blocks_give_the_same_values_and_gradients(wide, monkeypatch):
    model, _, batch = wide
    one, g1 = _scores_and_grads(model, batch)
    monkeypatch.setattr(S, "LOGITS_BLOCK_BYTES", 4 * VOCAB * 4 * 7)  # blocks of 7 positions
    blocks, g2 = _scores_and_grads(model, batch)
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


@pytest.mark.parametrize("phase", ["reference", "policy"])
def test_peak_memory_is_one_block_not_all_logits(wide, monkeypatch, phase):
    """20 MiB of float32 logits in one pass (several times that with their temporaries); in
    blocks of 0.5 MiB the peak stays below the logits themselves."""
    model, batch, _ = wide
    inputs, targets, mask = batch
    full_bytes = inputs.shape[0] * (inputs.shape[1] - S.first_completion_position(mask)) * VOCAB * 4

    def run():
        if phase == "reference":
            mx.eval(S.completion_logps(model, inputs, targets, mask).tokens)
        else:
            _scores_and_grads(model, batch, extras=False)

    run()  # warm: allocations of the first call
    monkeypatch.setattr(S, "LOGITS_BLOCK_BYTES", 1 << 19)
    blocked = _peak_mib(run)
    monkeypatch.setattr(S, "LOGITS_BLOCK_BYTES", 1 << 62)
    whole = _peak_mib(run)
    assert whole > full_bytes / 2**20  # one pass holds at least the logits themselves
    assert blocked < full_bytes / 2**20 and blocked < whole / 4, (blocked, whole)
