"""This machine's rates for :mod:`mlx_xpo_plugin.compute.cost`, measured in a few seconds and cached.

* ``sgemm``: FLOP/s of a float32 ``[256 x 1024] @ [1024 x 2048]`` product, best of a few;
* ``stream``: bytes/s at which decoding 4 rows reads the weights, on the threads the rollout
  decodes with (:func:`.fast_blas.decoding_threads`: fewer when other processes keep cores busy
  at that moment): the trainer's decoder on a 2-layer probe of width 1024 (the weights' bytes over
  the time per token less its dispatch cost); on a slow BLAS, ``[4 x 1024] @ [1024 x 4096]``
  against 8 different matrices (128 MiB, more than a CPU's caches), best of 3;
* scoring rates: FLOP/s of the trainer's reference pass and of its loss's forward + backward
  pass on 2-layer probes of width 256 and 1024 (4 rows of 24 + 32 tokens), the dispatch costs
  below taken off (the wider probe only where a pass takes under 0.3 s at the sgemm rate);
* dispatch costs, each fitted as ``a + b * layers`` from two random-weight probe models of the
  width 32 (arithmetic negligible) with 2 and 6 layers (LoRA rank 8 on the attention projections, as a run
  has): a decode call (the prompt pass and the tracing of the compiled step) and a decoded token
  (4 rows, the trainer's sampler: ``t(10) - t(2)`` over 8 tokens), a scoring forward pass, a
  forward + backward pass, and an Adam update; each the best of a few repeats, so a busy machine
  inflates them less.

The result is cached as JSON under ``<cache>/calibration/`` (``MLX_XPO_CACHE``, else
``~/.cache/mlx-xpo-plugin``) in a file named by a hash of what the rates depend on: the host, its
CPU and usable cores, the mlx version, the BLAS under MLX with its thread count and the few-row
kernel (cpu/skinny.c) where decoding's products run on it. With the rates it keeps when they were
measured and the 1-minute load average just before (``load_before``); when such a record is
measured again: :mod:`.calibration_age`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

from mlx_xpo_plugin.commands.calibration_age import STAMP, current_load, why_stale
from mlx_xpo_plugin.compute.cost import Rates

VERSION = 2
PROBE_LAYERS = (2, 6)
PROBE_WIDTHS = (256, 1024)


def WIDTH_PROBE(hidden: int) -> dict:
    """The sizes of a scoring-rate probe of width ``hidden`` (2 layers)."""
    return dict(
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        intermediate_size=4 * hidden,
        vocab_size=64 * hidden,  # an output layer of a real model's share of the weights
    )


PROBE = dict(  # so narrow that its arithmetic is negligible next to its dispatch costs
    model_type="qwen2",
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    vocab_size=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def identity() -> dict:
    """What the rates depend on (the cache key)."""
    import mlx.core as mx

    from mlx_xpo_plugin.cpu import fast_blas, skinny

    return {
        "version": VERSION,
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": fast_blas.usable_cores(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": fast_blas.STATE.get("blas") or "as shipped with mlx",
        "blas_threads": fast_blas.current_threads(),
        "few_row_kernel": skinny.STATE.get("isa"),  # decoding's products: the kernel's or the BLAS's
    }


def cache_path(ident: dict, cache: str | os.PathLike | None = None) -> Path:
    from mlx_xpo_plugin.commands.tiny import default_cache_dir

    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache or default_cache_dir()) / "calibration" / f"{key}.json"


def best_of(fn, n: int) -> float:
    """The fastest of ``n`` timed calls of ``fn``, after one untimed call."""
    fn()  # warm-up (allocation, tracing)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def sgemm_rate() -> float:
    import mlx.core as mx

    a, b = mx.random.normal((256, 1024)), mx.random.normal((1024, 2048))
    mx.eval(a, b)
    t = best_of(lambda: mx.eval(a @ b), 1)
    n = 5 if t < 0.05 else 1  # the bundled reference BLAS is slow: one repeat is enough there
    return 2 * 256 * 1024 * 2048 / min(t, best_of(lambda: mx.eval(a @ b), n))


def stream_rate() -> float:
    import mlx.core as mx

    from mlx_xpo_plugin.cpu.fast_blas import decoding_threads

    ws = [mx.random.normal((1024, 4096)) for _ in range(8)]
    x = mx.random.normal((4, 1024))
    mx.eval(x, *ws)
    with decoding_threads():  # the thread count the rollout decodes with
        t = best_of(lambda: mx.eval(*[x @ w for w in ws]), 3)
    return sum(w.nbytes for w in ws) / t


def _probe_model(layers: int, hidden: int = PROBE["hidden_size"]):
    import mlx.core as mx
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    width = {} if hidden == PROBE["hidden_size"] else WIDTH_PROBE(hidden)
    model = qwen2.Model(qwen2.ModelArgs.from_dict({**PROBE, **width, "num_hidden_layers": layers}))
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 8, "dropout": 0.0, "scale": 10.0})
    mx.eval(model.parameters())
    return model


def _probe_loss(model, prompt: int = 24, completion: int = 16):
    """The trainer's reference pass and loss (xpo's default settings, so the tempered log-probs
    are scored too) on 2 prompts of ``prompt`` tokens, each with two completions of
    ``completion`` tokens: (reference pass, loss function). The loop's base method stands in for
    XPO: its exploration term is element-wise over the scored tokens, nothing beside the passes."""
    from mlx_xpo_plugin import config
    from mlx_xpo_plugin.compute.reference import Reference
    from mlx_xpo_plugin.compute.scoring import pack
    from mlx_xpo_plugin.loop.method import OnlineDPO
    from mlx_xpo_plugin.loop.pair_loss import pair_loss, reference_logps, total
    from mlx_xpo_plugin.loop.settings import from_config

    cfg = config.resolve("xpo", {}, set(), {"model": "probe", "data": "probe", "train": True, "batch_size": 2})
    settings = from_config(cfg, 1, progress=False)
    method = OnlineDPO(settings)
    prompts = [[(7 * r + j) % 120 + 3 for j in range(prompt)] for r in range(2)] * 2
    comps = [[(13 * r + 5 * j) % 120 + 3 for j in range(completion)] for r in range(4)]
    inputs, targets, mask = pack(prompts, comps)
    reference = Reference(model)

    def ref():
        return reference_logps(reference, inputs, targets, mask)

    def loss(m, ref_tok):
        import mlx.core as mx

        res = pair_loss(m, inputs, targets, mask, ref_tok, mx.array([False, True]), method, settings, 0.1, 1e-5)
        return total(res, settings.entropy_coef, 2, 2).sum()  # 2 decided pairs of 2 scored

    return ref, loss


def dispatch_costs(layers: int, repeats: int = 5) -> dict:
    """Seconds of each dispatch-bound operation on a probe model of ``layers`` layers."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_xpo_plugin.compute import decode
    from mlx_xpo_plugin.compute.rollout import SamplingConfig

    model = _probe_model(layers)
    sampler = SamplingConfig(max_tokens=10, temperature=0.8).sampler()
    prompts = [[(7 * r + j) % 120 + 3 for j in range(24)] for r in range(4)]
    t2, t10 = (best_of(lambda n=n: decode.generate(model, prompts, n, sampler, []), repeats) for n in (2, 10))
    token = max(0.0, (t10 - t2) / 8)
    ref, loss = _probe_loss(model)
    fwd = best_of(ref, repeats)
    ref_tok = ref()
    grad = nn.value_and_grad(model, loss)
    holder = {}

    def bwd():
        v, g = grad(model, ref_tok)
        mx.eval(v, g)
        holder["g"] = g

    bwd_s = best_of(bwd, repeats)
    opt = optim.Adam(learning_rate=1e-5)

    def step():
        opt.update(model, holder["g"])
        mx.eval(model.parameters(), opt.state)

    return {"call": max(0.0, t2 - 2 * token), "token": token, "fwd": fwd, "bwd": bwd_s, "opt": best_of(step, repeats)}


def scoring_rates(hidden: int, dispatch: dict, repeats: int = 3) -> tuple[float, float]:
    """(forward FLOP/s, forward + backward FLOP/s) of the trainer's scoring passes on a 2-layer
    probe of width ``hidden`` (4 rows of 24 + 32 tokens), its dispatch costs ``dispatch`` taken
    off; FLOPs as :func:`.cost.forward_flops` counts them (twice for forward + backward)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_xpo_plugin.compute.cost import forward_flops, shape_of

    model = _probe_model(2, hidden)
    ref, loss = _probe_loss(model, 24, 32)
    fwd = best_of(ref, repeats)
    ref_tok = ref()
    grad = nn.value_and_grad(model, loss)
    bwd = best_of(lambda: mx.eval(grad(model, ref_tok)), repeats)
    f = forward_flops(shape_of({**PROBE, **WIDTH_PROBE(hidden), "num_hidden_layers": 2}), 4, 24, 32)

    def rate(flops, t, ab):
        return flops / max(t - ab[0] - 2 * ab[1], 0.25 * t)

    return rate(f, fwd, dispatch["fwd"]), rate(2 * f, bwd, dispatch["bwd"])


def _quick(hidden: int, sgemm: float) -> bool:
    """Whether a scoring probe of width ``hidden`` takes under 0.3 s a pass at the sgemm rate
    (wider probes are left out on a slow BLAS, where they would take minutes)."""
    from mlx_xpo_plugin.compute.cost import forward_flops, shape_of

    shape = shape_of({**PROBE, **WIDTH_PROBE(hidden), "num_hidden_layers": 2})
    return forward_flops(shape, 4, 24, 32) / sgemm < 0.3


def decode_stream_rate(hidden: int, token: tuple) -> float:
    """Bytes/s at which the trainer's decoder reads a 2-layer probe of width ``hidden`` per token
    (4 rows, on the decoding threads): its weights' bytes / (t(10) - t(2)) / 8 less the per-token
    dispatch cost ``token`` of 2 layers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_xpo_plugin.compute import decode
    from mlx_xpo_plugin.cpu.fast_blas import decoding_threads

    model = _probe_model(2, hidden)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    prompts = [[(7 * r + j) % 120 + 3 for j in range(24)] for r in range(4)]
    with decoding_threads():
        t2, t10 = (best_of(lambda n=n: decode.generate(model, prompts, n, greedy, []), 3) for n in (2, 10))
    per = (t10 - t2) / 8
    return weights / max(per - token[0] - 2 * token[1], 0.25 * per)


def measure() -> dict:
    """Every rate (a few seconds); a JSON-ready dict with the fitted ``(a, b)`` pairs."""
    t0 = time.perf_counter()
    lo, hi = PROBE_LAYERS
    small, large = dispatch_costs(lo), dispatch_costs(hi)
    fitted = {}
    for k in small:
        b = max(0.0, (large[k] - small[k]) / (hi - lo))
        fitted[k] = [max(0.0, small[k] - b * lo), b]
    sgemm = sgemm_rate()
    widths = [(h, scoring_rates(h, fitted)) for h in PROBE_WIDTHS if h == PROBE_WIDTHS[0] or _quick(h, sgemm)]
    return {
        "sgemm": sgemm,
        "stream": decode_stream_rate(1024, fitted["token"]) if _quick(1024, sgemm) else stream_rate(),
        "fwd_rate": [[h, r[0]] for h, r in widths],
        "bwd_rate": [[h, r[1]] for h, r in widths],
        **fitted,
        "seconds": time.perf_counter() - t0,
    }


def cached(ident: Optional[dict] = None, path: Optional[Path] = None) -> Optional[dict]:
    """The cached calibration of this machine (of ``ident``, at ``path``), or None; never measures."""
    ident = identity() if ident is None else ident
    path = cache_path(ident) if path is None else path
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("identity") == ident else None


def rates(
    cache: str | os.PathLike | None = None,
    refresh: bool = False,
    log=None,
    now: Optional[float] = None,
    load: Optional[float] = None,
) -> tuple[Rates, dict]:
    """(this machine's :class:`Rates`, the cached record with its identity, when it was measured and
    under which load), measuring them when ``refresh``, when nothing is cached for this identity, or
    when the cached ones are stale (:func:`why_stale`). ``now`` (seconds since the epoch) and
    ``load`` (the 1-minute load average) default to the present ones."""
    ident = identity()
    path = cache_path(ident, cache)
    now = time.time() if now is None else now
    load = current_load() if load is None else load
    record, why = (None, "asked for") if refresh else (cached(ident, path), "once per machine")
    if record is not None:
        why = why_stale(record, now, load)
        record = None if why else record
    if record is None:
        if log:
            log(f"calibrating this machine's rates (a few seconds; cached): {why}")
        record = {
            "identity": ident,
            "measured_at": time.strftime(STAMP, time.gmtime(now)),
            "load_before": None if load is None else [load],
            "rates": measure(),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: the rates are measured again next time
    m = record["rates"]
    return (
        Rates(
            sgemm=m["sgemm"],
            stream=m["stream"],
            fwd_rate=tuple(tuple(x) for x in m["fwd_rate"]),
            bwd_rate=tuple(tuple(x) for x in m["bwd_rate"]),
            call=tuple(m["call"]),
            token=tuple(m["token"]),
            fwd=tuple(m["fwd"]),
            bwd=tuple(m["bwd"]),
            opt=tuple(m["opt"]),
        ),
        record,
    )
