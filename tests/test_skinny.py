"""The few-row product kernel (mlx_xpo_plugin/cpu/skinny.c): products, routing, threads, and
decoding with it bound under MLX."""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mlx_xpo_plugin.cpu import fast_blas, skinny

LIBRARY = skinny.library_path()
needs_kernel = pytest.mark.skipif(LIBRARY is None, reason="the _skinny extension was not built (no C compiler)")
linux_cpu = pytest.mark.skipif(fast_blas.bundled_reference_blas() is None, reason="Linux mlx[cpu] only")

ROW_MAJOR, COL_MAJOR, NO_TRANS, TRANS = 101, 102, 111, 112
SGEMM = ctypes.CFUNCTYPE(
    None, *[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
)  # fmt: skip
THREADS = ctypes.CFUNCTYPE(ctypes.c_int)


class Kernel:
    """A private copy of the built library (its own globals, apart from any MLX in this process),
    with a Python sgemm that records what is handed on and a settable thread count."""

    def __init__(self, folder, threads=1):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "skinny_copy.so")
        shutil.copy(LIBRARY, path)
        self.lib = ctypes.CDLL(path)
        self.forwarded, self.threads, self.asked = [], threads, 0
        self._sgemm, self._threads = SGEMM(self._forward), THREADS(self._count)  # kept alive
        self.lib.xpo_skinny_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.xpo_skinny_tune.argtypes = [ctypes.c_long] * 3
        self.lib.xpo_skinny_counts.argtypes = [ctypes.POINTER(ctypes.c_long)]
        self.lib.xpo_cblas_sgemm.argtypes = [
            *[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        address = ctypes.cast(self._sgemm, ctypes.c_void_p).value
        assert self.lib.xpo_skinny_init(address, ctypes.cast(self._threads, ctypes.c_void_p).value) == 0

    def _forward(self, *args):
        self.forwarded.append(args[:6])

    def _count(self):
        self.asked += 1
        return self.threads

    def sgemm(self, a, w, c, alpha=1.0, beta=0.0, m=None, n=None, k=None, order=ROW_MAJOR, tb=TRANS):
        """c[:m, :n] = alpha * a[:m, :k] @ w[:n, :k].T + beta * c, with the arrays' row strides."""
        m, n, k = m or a.shape[0], n or w.shape[0], k or a.shape[1]
        self.lib.xpo_cblas_sgemm(
            order, NO_TRANS, tb, m, n, k, alpha, a.ctypes.data, a.shape[1], w.ctypes.data, w.shape[1], beta,
            c.ctypes.data, c.shape[1],
        )  # fmt: skip

    def counts(self):
        out = (ctypes.c_long * 2)()
        self.lib.xpo_skinny_counts(out)
        return tuple(out)


@needs_kernel
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n, k", [(4864, 896), (37, 1001), (301, 333), (6, 9)])
def test_few_row_products_match_float64_with_strides_alpha_and_beta(tmp_path, m, n, k):
    kernel = Kernel(tmp_path)
    kernel.lib.xpo_skinny_tune(0, -1, -1)  # every size to the kernel
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, k + 5), dtype=np.float32)  # row strides wider than the product
    w = rng.standard_normal((n, k + 3), dtype=np.float32)
    c = rng.standard_normal((m, n + 2), dtype=np.float32)
    before = c.copy()
    kernel.sgemm(a, w, c, alpha=0.5, beta=2.0, m=m, n=n, k=k)
    want = 0.5 * a[:, :k].astype(np.float64) @ w[:, :k].T.astype(np.float64) + 2.0 * before[:, :n]
    assert np.abs(c[:, :n] - want).max() < 2e-5 * np.sqrt(k) * np.abs(want).max()
    assert (c[:, n:] == before[:, n:]).all()  # nothing written past ldc's row
    assert kernel.counts() == (1, 0) and kernel.forwarded == []


@needs_kernel
def test_beta_zero_overwrites_nan_as_blas_does(tmp_path):
    kernel = Kernel(tmp_path)
    rng = np.random.default_rng(1)
    a, w = rng.standard_normal((3, 512), dtype=np.float32), rng.standard_normal((256, 512), dtype=np.float32)
    c = np.full((3, 256), np.nan, np.float32)
    kernel.sgemm(a, w, c)
    assert np.isfinite(c).all() and np.allclose(c, a @ w.T, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize(
    "case, m, n, k, order, tb",
    [
        ("nine rows", 9, 512, 512, ROW_MAJOR, TRANS),
        ("weights laid out [K, N]", 4, 512, 512, ROW_MAJOR, NO_TRANS),
        ("column-major", 4, 512, 512, COL_MAJOR, TRANS),
        ("below the size threshold", 4, 100, 100, ROW_MAJOR, TRANS),
    ],
)
def test_every_other_product_is_handed_to_the_blas_unchanged(tmp_path, case, m, n, k, order, tb):
    kernel = Kernel(tmp_path)
    a, w, c = np.ones((m, k), np.float32), np.ones((n, k), np.float32), np.zeros((m, n), np.float32)
    kernel.sgemm(a, w, c, order=order, tb=tb)
    assert kernel.forwarded == [(order, NO_TRANS, tb, m, n, k)] and kernel.counts() == (0, 1)
    assert (c == 0).all()  # the kernel did not touch it


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_results_do_not_depend_on_the_blas_thread_count(tmp_path, threads):
    """Each output column is summed by one thread in one order: resumed runs stay bit-exact."""
    rng = np.random.default_rng(2)
    a, w = rng.standard_normal((4, 896), dtype=np.float32), rng.standard_normal((4861, 896), dtype=np.float32)
    one, many = Kernel(tmp_path / "1", 1), Kernel(tmp_path / "n", threads)
    for kernel in (one, many):
        kernel.lib.xpo_skinny_tune(-1, 1 << 12, 100)  # split even this product; threads sleep soon
    c1, cn = np.zeros((4, 4861), np.float32), np.zeros((4, 4861), np.float32)
    for _ in range(20):  # repeated: threads that went to sleep are woken for the next product
        one.sgemm(a, w, c1)
        many.sgemm(a, w, cn)
        assert (c1 == cn).all()
    assert many.asked == 20  # the count is the BLAS's, read at every product


@needs_kernel
def test_a_forked_child_starts_its_own_threads(tmp_path):
    """A child of fork() has none of its parent's pool threads: its products must not wait for them."""
    kernel = Kernel(tmp_path, threads=2)
    kernel.lib.xpo_skinny_tune(-1, 1 << 12, 100)
    rng = np.random.default_rng(4)
    a, w = rng.standard_normal((2, 256), dtype=np.float32), rng.standard_normal((512, 256), dtype=np.float32)
    c = np.zeros((2, 512), np.float32)
    kernel.sgemm(a, w, c)  # the parent's pool is started
    pid = os.fork()
    if pid == 0:  # the child: one product over two threads, then out, whatever happens
        try:
            d = np.zeros_like(c)
            kernel.sgemm(a, w, d)
            os._exit(0 if (d == c).all() else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's product waited for threads it does not have")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@pytest.fixture
def pip_blas(monkeypatch):
    """The scipy-openblas32 library, loaded privately; skinny.STATE starts empty."""
    if fast_blas.pip_openblas() is None:
        pytest.skip("scipy-openblas32 is not installed")
    monkeypatch.setattr(skinny, "STATE", {})
    return ctypes.CDLL(fast_blas.pip_openblas())


def test_attach_without_the_extension_leaves_the_blas_and_says_why(monkeypatch, pip_blas):
    monkeypatch.setattr(skinny, "library_path", lambda folder=None: None)
    assert skinny.attach(pip_blas, "scipy_", env={}) is None and skinny.STATE["isa"] is None
    assert skinny.STATE["line"] == "few-row products (decoding): the BLAS's (the _skinny extension was not built)"


@needs_kernel
@pytest.mark.parametrize("value", ["off", "0", "OFF"])
def test_the_kernel_can_be_switched_off_and_the_banner_says_so(pip_blas, value):
    assert skinny.attach(pip_blas, "scipy_", env={skinny.ENV: value}) is None and skinny.STATE["isa"] is None
    assert skinny.STATE["line"] == f"few-row products (decoding): the BLAS's (MLX_XPO_FEW_ROW_KERNEL={value})"


@needs_kernel
def test_an_unknown_switch_value_keeps_the_kernel_and_is_named(monkeypatch, tmp_path, pip_blas):
    monkeypatch.setattr(skinny, "_LIB", [])
    private = tmp_path / "skinny_copy.so"  # its own globals: this process's MLX keeps its kernel as set up
    shutil.copy(LIBRARY, private)
    assert skinny.attach(pip_blas, "scipy_", path=str(private), env={skinny.ENV: "fast"}) is not None
    assert skinny.STATE["line"].startswith("few-row products (decoding): own kernel (")
    assert skinny.STATE["line"].endswith("; MLX_XPO_FEW_ROW_KERNEL='fast' is not one of on, off: ignored")


DECODE = r"""
import json, sys
import mlx_xpo_plugin.api  # the fast BLAS and the kernel, as in this project's commands
import mlx.core as mx
from mlx_lm import load
from mlx_lm.sample_utils import make_sampler
from mlx_xpo_plugin.compute import decode
from mlx_xpo_plugin.cpu import fast_blas, skinny

model, _ = load(sys.argv[1])
prompts = [[5, 17, 42, 8, 99, 3, 250], [11, 7], [300, 4, 4, 60, 2], [9, 9, 9]]
skinny.tune(min_elements=0)  # the tiny model's products are small: all of them to the kernel

def run(sampled):
    mx.random.seed(7)
    sampler = make_sampler(temp=1.0 if sampled else 0.0)
    tokens = decode.generate(model, prompts, 24, sampler, stop_ids=[])
    logits = model(mx.array([[row[-1]] for row in tokens]))[:, -1].astype(mx.float32)  # 4 rows: the kernel's
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(logprobs)  # here, under this run's setting (MLX is lazy)
    return tokens, logprobs

out = {"banner": fast_blas.banner_line()}
before = skinny.counts()
for sampled in (False, True):
    kernel = run(sampled)
    skinny.tune(per_thread_elements=1)  # the same products split over the BLAS's threads
    pooled = run(sampled)
    skinny.tune(per_thread_elements=1 << 18)
    with skinny.off():
        blas = run(sampled)
    out[f"sampled={sampled}"] = {
        "same_tokens_as_blas": kernel[0] == blas[0],
        "same_tokens_pooled": pooled[0] == kernel[0],
        "pooled_bit_exact": bool(mx.array_equal(pooled[1], kernel[1]).item()),
        "logprob_diff": mx.abs(kernel[1] - blas[1]).max().item(),
    }
out["kernel_products"] = skinny.counts()[0] - before[0]
print(json.dumps(out))
"""


@needs_kernel
@linux_cpu
def test_decoding_on_the_kernel_gives_the_blas_tokens_and_log_probs(tiny_model_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_XPO_BLAS", "MLX_XPO_PLUGIN", skinny.ENV)}
    r = subprocess.run(
        [sys.executable, "-c", DECODE, tiny_model_path], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "few-row products (decoding): own kernel" in out["banner"]
    assert out["kernel_products"] > 100
    for key in ("sampled=False", "sampled=True"):
        got = out[key]
        assert got["same_tokens_as_blas"] and got["same_tokens_pooled"] and got["pooled_bit_exact"], (key, got)
        assert got["logprob_diff"] < 1e-4, (key, got)
