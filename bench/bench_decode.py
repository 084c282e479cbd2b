"""Decode at the q05 shape against its floor, lever by lever, in one process.

    python bench/bench_decode.py                  # q05 (Qwen2.5-0.5B's shape), bf16 checkpoint, auto
    python bench/bench_decode.py --preset small --rounds 3

The checkpoint is loaded as a run loads it (``compute_dtype: auto``: float32 on the CPU). Per
round, alternating the order of the variants:

* ms per decoded token = (t(n2) - t(n1)) / (n2 - n1), each t one call of ``decode.generate``
  (the trainer's decoder; greedy), which cancels the prompt pass and the per-call tracing;
* variants: 4 rows (a step's rollout at 2 prompts) on the few-row kernel (cpu/skinny.c) with one
  thread per core (as a run decodes) and with 1 thread, on OpenBLAS alone (``skinny.off()``) with
  one thread per core, 8 rows on the kernel, and 4 rows with LoRA adapters on every layer (rank 8,
  as the policy decodes: each adapter adds two small products);
* the floor: bytes of every weight a step reads (the projections and the tied embedding as the
  output layer) / read bandwidth with one numpy thread per core, measured in the same round.

Tokens at 4 rows are compared across the kernel and OpenBLAS variants (printed in the results).
Output: bench/results/decode.json, .md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402
from bench_limits import build, read_bandwidth  # noqa: E402


def per_token(model, rows: int, n: tuple, prompt: int = 24):
    import mlx.core as mx

    from mlx_xpo_plugin.compute import decode

    prompts = [[(7 * r + j) % 1500 + 3 for j in range(prompt)] for r in range(rows)]
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    ts, out = [], None
    for k in n:
        t = time.perf_counter()
        out = decode.generate(model, prompts, k, greedy, [])
        ts.append(time.perf_counter() - t)
    return (ts[1] - ts[0]) / (n[1] - n[0]), out


def render(data: dict) -> str:
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Load average before / after: {data['load_before']} / {data['load_after']}; preset {data['preset']}, "
        f"bf16 checkpoint, compute_dtype auto (float32 weights: {data['weight_bytes'] / 1e9:.2f} GB read per "
        f"token); {data['rounds']} rounds, medians [min–max].",
        f"Read bandwidth, one numpy thread per core: {B.fmt(B.median(data['read_gbs']), 1)} GB/s "
        f"[{B.fmt(min(data['read_gbs']), 1)}–{B.fmt(max(data['read_gbs']), 1)}]; floor "
        f"{B.fmt(B.median(data['floor_ms']), 0)} ms/token.",
        "",
        "| variant | ms per token | / all-core floor (same round) |",
        "|---|---|---|",
    ]
    for name, runs in data["variants"].items():
        ms = [r * 1e3 for r in runs]
        ratio = [r * 1e3 / f for r, f in zip(runs, data["floor_ms"])]
        lines.append(
            f"| {name} | {B.fmt(B.median(ms), 0)} [{B.fmt(min(ms), 0)}–{B.fmt(max(ms), 0)}] | "
            f"{B.fmt(B.median(ratio), 2)} [{B.fmt(min(ratio), 2)}–{B.fmt(max(ratio), 2)}] |"
        )
    lines.append(
        f"\nSame greedy tokens at 4 rows on the kernel (1 and {data['cores']} threads) and on OpenBLAS alone: "
        f"{data['same_tokens']}."
    )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="q05")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", default="4,12")
    ap.add_argument("--name", default="decode")
    ns = ap.parse_args()
    from mlx_xpo_plugin.cpu import fast_blas

    fast_blas.request()
    fast_blas.preload()
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from mlx_xpo_plugin.compute import precision

    path = build(ns.preset, None)
    model, _ = load(path)
    precision.apply(model, "auto", "model", log=lambda s: None)
    model.eval()
    n = tuple(int(x) for x in ns.tokens.split(","))
    cores = fast_blas.usable_cores()
    api = fast_blas._openblas_threads(fast_blas.STATE.get("loaded"), fast_blas.STATE.get("prefix", ""))
    wb = sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    def threads(k):
        if api:
            import mlx.core as mx

            mx.synchronize()
            api[1](k)

    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_xpo_plugin.cpu import skinny

    lora = load(path)[0]
    precision.apply(lora, "auto", "model", log=lambda s: None)
    linear_to_lora_layers(lora, lora.args.num_hidden_layers, {"rank": 8, "dropout": 0.0, "scale": 10.0})
    lora.eval()
    kernel, blas = contextlib.nullcontext, skinny.off
    # name: (model, rows, threads, where the few-row products run)
    variants = {
        f"4 rows, kernel, {cores} threads": (model, 4, cores, kernel),
        "4 rows, kernel, 1 thread": (model, 4, 1, kernel),
        f"4 rows, OpenBLAS alone, {cores} threads": (model, 4, cores, blas),
        f"8 rows, kernel, {cores} threads": (model, 8, cores, kernel),
        f"4 rows with LoRA, kernel, {cores} threads": (lora, 4, cores, kernel),
    }
    data = {
        "preset": ns.preset,
        "rounds": ns.rounds,
        "cores": cores,
        "machine": B.machine(),
        "load_before": B.loadavg(),
        "weight_bytes": wb,
        "variants": {k: [] for k in variants},
        "read_gbs": [],
        "floor_ms": [],
    }
    tokens = {}
    for m in (model, lora):  # the first calls trace and compile the decode step: not timed
        per_token(m, 4, (2, 3))
    for r in range(ns.rounds):
        bw = read_bandwidth(3)
        data["read_gbs"].append(bw)
        data["floor_ms"].append(wb / (bw * 1e9) * 1e3)
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            m, rows, k, where = variants[name]
            threads(k)
            with where():
                t, out = per_token(m, rows, n)
            if m is model:
                tokens.setdefault(rows, set()).add(str(out))
            data["variants"][name].append(t)
            print(r, name, f"{t * 1e3:.0f} ms/token, floor {data['floor_ms'][-1]:.0f} ms", flush=True)
    threads(cores)
    data["same_tokens"] = len(tokens[4]) == 1
    data["load_after"] = B.loadavg()
    j, md = B.write_results(ns.name, data, render(data))
    print(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()
