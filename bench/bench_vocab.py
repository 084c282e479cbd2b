"""The log-softmax's normaliser at a real vocabulary: MLX's one-level sum against the two-level sum
(compute/logsumexp.py), time of the scoring passes and error against float64, in one process.

    python bench/bench_vocab.py                           # q05, 4 rows x (40 + 256), 4 rounds (~15 min)
    python bench/bench_vocab.py --rounds 2 --completion 128   # a short run

Qwen2.5-0.5B's shape (24 layers, vocabulary 151,936), bf16 checkpoint loaded as a run loads it
(bench_limits.load_as_run: float32 on the CPU), LoRA rank 8 on every projection, scored as the
trainer scores (bench_blocks.measure):

* the reference pass: forward only, in blocks of ``LOGITS_BLOCK_BYTES``;
* the policy pass: forward + backward of log-probs, with the log-probs at T = 0.8 evaluated beside
  them (for the metrics, as ``pair_loss`` has them), one pass.

Both as a run's later steps run them: MLX's buffer cache is kept between calls (the trainer never
empties it). With the cache emptied before every call, every buffer a fresh allocation, the two
normalisers compare differently (docs/precision.md).

Each pass runs with ``scoring``'s normaliser and sum replaced by MLX's one-level ``logsumexp`` /
``sum`` ("one level", as before) and as shipped ("two levels"). Beside each pass, the log-softmax
and gather alone (``scoring._reduce`` on random logits of the pass's shape, the same work as in
the pass), which bounds what the normaliser can change in it. On this shared 2-core machine one
call of the same work varies by 10-20 % from one minute to the next, so every round measures the
two sides back to back (the order alternating between rounds) and the comparison is the ratio
within a round: its median and quartiles over the rounds. Seconds and ``mx.get_peak_memory()``
of one call. The error: the log-probs of every vocabulary entry at 32 positions of the pass's own
logits, against float64 numpy (max and mean absolute, per token).

Output: bench/results/vocab.json, .md, and a line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402
from bench_blocks import measure  # noqa: E402
from bench_limits import load_with_lora  # noqa: E402

VARIANTS = ("one level", "two levels")
PASSES = (("reference", "blocks"), ("policy", "one pass"))  # as the trainer runs each


@contextlib.contextmanager
def normaliser(variant: str):
    """``scoring`` with MLX's one-level logsumexp and sum ("one level") or as shipped."""
    import mlx.core as mx

    from mlx_xpo_plugin.compute import scoring

    saved = scoring.logsumexp, scoring.sum_last
    if variant == "one level":
        scoring.logsumexp = lambda x: mx.logsumexp(x, axis=-1)
        scoring.sum_last = lambda x: x.sum(axis=-1)
    try:
        yield
    finally:
        scoring.logsumexp, scoring.sum_last = saved


def errors(model, rows: int, prompt: int, positions: int = 32) -> dict:
    """max / mean |log p - float64 log p| over every vocabulary entry at ``positions`` positions."""
    import mlx.core as mx
    import numpy as np

    from mlx_xpo_plugin.compute.logsumexp import logsumexp

    x = mx.array([[(7 * r + j) % 1500 + 3 for j in range(prompt + positions)] for r in range(rows)])
    logits = model(x)[:, prompt:].astype(mx.float32)
    mx.eval(logits)
    x64 = np.array(logits).astype(np.float64)
    m = x64.max(axis=-1, keepdims=True)
    exact = x64 - (m + np.log(np.exp(x64 - m).sum(axis=-1, keepdims=True)))
    out = {"logit_std": float(x64.std()), "logit_max": float(x64.max())}
    for name, lse in (("one level", mx.logsumexp(logits, axis=-1)), ("two levels", logsumexp(logits))):
        d = np.abs(np.array(logits - lse[..., None]) - exact)
        out[name] = {"max": float(d.max()), "mean": float(d.mean())}
    return out


def reduce_alone(rows: int, positions: int, vocab: int, pass_: str) -> float:
    """Seconds of the log-softmax and gather alone (``scoring._reduce``) on random float32 logits
    [rows, positions, vocab] at std 3, one call: forward (reference), or forward + backward of the
    log-probs with the log-probs at T = 0.8 evaluated beside them (policy)."""
    import time

    import mlx.core as mx

    from mlx_xpo_plugin.compute import scoring

    logits = mx.random.normal((rows, positions, vocab), key=mx.random.key(0)) * 3
    targets = mx.random.randint(0, vocab, (rows, positions), key=mx.random.key(1))
    mx.eval(logits, targets)

    def loss(x):
        logp, _, tempered = scoring._reduce(x, targets, False, 0.8)
        return logp.sum(), mx.stop_gradient(tempered.sum())

    t = time.perf_counter()
    if pass_ == "reference":
        mx.eval(scoring._reduce(logits, targets, False, None)[0])
    else:
        mx.eval(mx.value_and_grad(loss)(logits))
    return time.perf_counter() - t


def cell(xs, nd):
    return f"{B.fmt(B.median(xs), nd)} [{B.fmt(min(xs), nd)}–{B.fmt(max(xs), nd)}]"


def ratio_cell(xs):
    """median [quartiles] (min–max) of per-round ratios"""
    q = [B.fmt(B.quantile(xs, f), 3) for f in (0.5, 0.25, 0.75)]
    return f"{q[0]} [{q[1]}–{q[2]}] ({B.fmt(min(xs), 3)}–{B.fmt(max(xs), 3)})"


def ratios(data: dict, pass_: str, key: str) -> list:
    runs = [r for r in data["runs"] if key in r[f"{pass_}/one level"]]
    return [r[f"{pass_}/two levels"][key] / r[f"{pass_}/one level"][key] for r in runs]


def summary(data: dict) -> dict:
    out = {}
    for pass_, _ in PASSES:
        for key, name in (("seconds", "time_ratio"), ("alone_seconds", "log_softmax_alone_ratio")):
            xs = ratios(data, pass_, key)
            if xs:
                out[f"{pass_}_{name}"] = round(B.median(xs), 3)
                out[f"{pass_}_{name}_quartiles"] = [round(B.quantile(xs, 0.25), 3), round(B.quantile(xs, 0.75), 3)]
    for v in VARIANTS:
        out[f"max_error_{v.replace(' ', '_')}"] = data["errors"][v]["max"]
    return out


def render(data: dict) -> str:
    e = data["errors"]
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Load average before / after: {data['load_before']} / {data['load_after']}. Preset {data['preset']}, "
        f"bf16 checkpoint as float32, LoRA rank 8; {data['rows']} rows x ({data['prompt']} + {data['completion']}) "
        f"tokens, vocabulary {data['vocab']:,}; {len(data['runs'])} rounds, the two sides back to back in each "
        "(order alternating). Seconds: median [min–max] over rounds; two / one: the ratio within a round, "
        "median [quartiles] (min–max) over rounds.",
        "",
        "| pass | one level s | two levels s | two / one | one level peak MB | two levels peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for pass_, _ in PASSES:
        runs = {v: [r[f"{pass_}/{v}"] for r in data["runs"]] for v in VARIANTS}
        s = {v: [x["seconds"] for x in runs[v]] for v in VARIANTS}
        lines.append(
            f"| {pass_} | {cell(s['one level'], 2)} | {cell(s['two levels'], 2)} | "
            f"{ratio_cell(ratios(data, pass_, 'seconds'))} | "
            f"{cell([x['peak_mb'] for x in runs['one level']], 0)} | "
            f"{cell([x['peak_mb'] for x in runs['two levels']], 0)} |"
        )
        if "alone_seconds" not in runs["one level"][0]:  # results written before it was measured
            continue
        a = {v: [x["alone_seconds"] for x in runs[v]] for v in VARIANTS}
        lines.append(
            f"| {pass_}: log-softmax and gather alone | {cell(a['one level'], 3)} | {cell(a['two levels'], 3)} | "
            f"{ratio_cell(ratios(data, pass_, 'alone_seconds'))} | | |"
        )
    lines += [
        "",
        f"Log-probs of every entry at {data['error_positions']} positions x {data['rows']} rows of the model's own "
        f"logits (std {e['logit_std']:.2f}, max {e['logit_max']:.1f}) against float64: one level max "
        f"{e['one level']['max']:.2e} (mean {e['one level']['mean']:.2e}), two levels max "
        f"{e['two levels']['max']:.2e} (mean {e['two levels']['mean']:.2e}).",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="q05")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--name", default="vocab")
    ap.add_argument("--render-only", action="store_true")
    ns = ap.parse_args()
    if ns.render_only:
        return B.rerender(ns.name, render)
    model = load_with_lora(ns.preset)
    data = {
        "preset": ns.preset,
        "rows": ns.rows,
        "prompt": ns.prompt,
        "completion": ns.completion,
        "vocab": model.args.vocab_size,
        "machine": B.machine(),
        "load_before": B.loadavg(),
        "error_positions": 32,
        "errors": errors(model, ns.rows, ns.prompt),
        "runs": [],
    }
    for p, w in PASSES:  # not timed: the first calls build the fused kernels and fill MLX's buffer cache
        for v in VARIANTS:
            with normaliser(v):
                measure(model, ns.completion, ns.rows, ns.prompt, p, w, cold=False)
    for r in range(ns.rounds):
        out = {}
        for i, (p, w) in enumerate(PASSES):
            for v in VARIANTS[::-1] if (r + i) % 2 else VARIANTS:
                with normaliser(v):
                    out[f"{p}/{v}"] = measure(model, ns.completion, ns.rows, ns.prompt, p, w, cold=False)
            for v in VARIANTS if (r + i) % 2 else VARIANTS[::-1]:
                with normaliser(v):
                    out[f"{p}/{v}"]["alone_seconds"] = reduce_alone(ns.rows, ns.completion, data["vocab"], p)
            print(r, p, {v: {k: round(x, 2) for k, x in out[f"{p}/{v}"].items()} for v in VARIANTS}, flush=True)
        data["runs"].append(out)
    data["load_after"] = B.loadavg()
    B.write_results(ns.name, data, render(data))
    print(render(data))
    print("RESULT " + json.dumps(summary(data)))


if __name__ == "__main__":
    main()
