"""Log-probabilities at a real vocabulary (151,936 terms, Qwen2.5's): the log-softmax's normaliser
within 2e-6 of float64, its gradient the exact softmax, small vocabularies unchanged."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_xpo_plugin.compute import scoring
from mlx_xpo_plugin.compute.logsumexp import block_width, logsumexp, sum_last

QWEN_VOCAB = 151_936


def rows(kind: str, vocab: int = QWEN_VOCAB, n: int = 4) -> np.ndarray:
    """Logits at the scale a language model's output layer produces them."""
    rng = np.random.default_rng({"wide": 0, "narrow": 1, "peaked": 2, "shifted": 3}[kind])
    if kind == "wide":
        x = rng.normal(0.0, 3.0, (n, vocab))
    elif kind == "narrow":
        x = rng.normal(0.0, 1.0, (n, vocab))
    elif kind == "peaked":  # one token far above the rest, a few runners-up
        x = rng.normal(-2.0, 2.0, (n, vocab))
        x[:, rng.integers(0, vocab, 8)] += 12.0
        x[np.arange(n), rng.integers(0, vocab, n)] = 28.0
    else:  # every logit far from zero
        x = rng.normal(25.0, 2.5, (n, vocab))
    return x.astype(np.float32)


def exact_lse(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("kind", ["wide", "narrow", "peaked", "shifted"])
def test_log_probs_at_a_real_vocabulary_are_within_2e_6_of_float64(kind):
    x = rows(kind)
    lse64 = exact_lse(x)
    targets = np.stack([np.argsort(r)[[-1, -2, -50, len(r) // 2]] for r in x])  # top, runner-up, ...
    inputs = mx.array(x)[:, None, :]  # [rows, 1 position, vocabulary]
    logp, entropy, tempered = scoring._reduce(inputs, mx.array(targets[:, :1]), True, 0.8)
    assert np.abs(np.array(logsumexp(mx.array(x))) - lse64).max() <= 2e-6
    want = np.take_along_axis(x.astype(np.float64), targets, axis=1) - lse64[:, None]
    got = np.take_along_axis(x, targets, axis=1) - np.array(logsumexp(mx.array(x)))[:, None]
    assert np.abs(got - want).max() <= 2e-6
    assert np.abs(np.array(logp)[:, 0] - want[:, 0]).max() <= 2e-6
    t64 = x.astype(np.float64) / 0.8
    want_t = t64[np.arange(len(x)), targets[:, 0]] - exact_lse(t64)
    assert np.abs(np.array(tempered)[:, 0] - want_t).max() <= 2e-6
    p = np.exp(x.astype(np.float64) - lse64[:, None])
    want_h = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=-1)
    assert np.abs(np.array(entropy)[:, 0] - want_h).max() <= 2e-5 * max(1.0, want_h.max())


def test_mlx_one_level_sum_is_what_the_two_levels_fix():
    """The reason for the module: MLX's own logsumexp is off by more than 2e-5 here."""
    x = rows("wide")
    assert np.abs(np.array(mx.logsumexp(mx.array(x), axis=-1)) - exact_lse(x)).max() > 2e-5


@pytest.mark.parametrize("kind", ["wide", "peaked"])
def test_gradient_is_the_softmax(kind):
    x = rows(kind, n=3)
    w = mx.array([1.0, -2.0, 0.5])
    grad = np.array(mx.grad(lambda a: (logsumexp(a) * w).sum())(mx.array(x)))
    plain = np.array(mx.grad(lambda a: (mx.logsumexp(a, axis=-1) * w).sum())(mx.array(x)))
    exact = np.exp(x.astype(np.float64) - exact_lse(x)[:, None]) * np.array(w)[:, None]
    scale = np.abs(exact).max()
    # the exact softmax to float32 rounding; MLX's own gradient differs from it by its sum's error
    assert np.abs(grad - exact).max() <= 1e-5 * scale
    assert np.abs(grad - plain).max() <= 1e-3 * scale
    assert np.abs(grad.sum(axis=-1) - np.array(w)).max() <= 1e-5


def test_gradient_through_scoring_equals_mlx_gradient_at_a_small_vocabulary():
    x = mx.array(rows("wide", vocab=3000, n=2))[:, None, :]
    t = mx.array([[5], [7]])

    def loss(reduce_lse):
        def f(a):
            picked = mx.take_along_axis(a, t[..., None], axis=-1).squeeze(-1)
            return (picked - reduce_lse(a)).sum()

        return f

    ours = mx.grad(loss(logsumexp))(x)
    plain = mx.grad(loss(lambda a: mx.logsumexp(a, axis=-1)))(x)
    assert mx.array_equal(ours, plain)


def test_small_vocabulary_is_unchanged():
    x = mx.array(rows("wide", vocab=512))
    assert mx.array_equal(logsumexp(x), mx.logsumexp(x, axis=-1))
    assert mx.array_equal(sum_last(x), x.sum(axis=-1))


def test_block_width_divides_real_vocabularies_and_pads_the_rest():
    assert block_width(QWEN_VOCAB) == 1187 and QWEN_VOCAB % 1187 == 0
    assert block_width(128_256) == 1002  # Llama 3
    assert block_width(32_000) == 1000
    assert block_width(10_007) == 1024  # a prime: padded
    x = rows("narrow", vocab=10_007, n=2)
    assert np.abs(np.array(logsumexp(mx.array(x))) - exact_lse(x)).max() <= 2e-6
    g = np.array(mx.grad(lambda a: logsumexp(a).sum())(mx.array(x)))
    assert g.shape == x.shape and np.abs(g.sum(axis=-1) - 1).max() <= 1e-5
    assert np.abs(np.array(sum_last(mx.array(x))) - x.astype(np.float64).sum(axis=-1)).max() <= 1e-3
