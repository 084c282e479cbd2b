"""Scoring in blocks of positions against one pass, at a real depth: time and peak memory.

    python bench/bench_blocks.py                         # q05, 4 rows x (40 + 128) and (40 + 256)
    python bench/bench_blocks.py --completions 512 --rounds 1

Qwen2.5-0.5B's shape (24 layers, vocabulary 151,936), bf16 checkpoint converted to float32
(``compute_dtype: auto``), LoRA rank 8 on every projection, as the trainer scores:

* the reference pass (forward only, ``forward_only=True``): one pass, and in blocks of
  ``LOGITS_BLOCK_BYTES`` (what the trainer does when the logits exceed it);
* the policy pass (forward + backward of log-probs, and the log-probs at T = 0.8 evaluated beside
  them for the metrics, as ``pair_loss`` has them): one pass
  (what the trainer does), and blocks evaluated inside the gradient transform (``forward_only=True``
  under ``value_and_grad``: how the trainer ran it before 2026-12-06).

Each number: seconds and ``mx.get_peak_memory()`` (weights included) of one call after
``mx.clear_cache()``; rounds alternate the order; medians [min-max] over rounds.

Output: bench/results/blocks.json, .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402
from bench_limits import load_with_lora  # noqa: E402

VARIANTS = (("reference", "one pass"), ("reference", "blocks"), ("policy", "one pass"), ("policy", "blocks"))


def measure(model, completion: int, rows: int, prompt: int, pass_: str, variant: str, cold: bool = True) -> dict:
    """Seconds and peak memory of one pass. ``cold``: MLX's buffer cache emptied first, so every
    buffer is a fresh allocation (a run's first step); else the buffers the previous call left
    are reused (a run's later steps: the trainer never empties the cache)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_xpo_plugin.compute import scoring as S

    prompts = [[(7 * r + j) % 1500 + 3 for j in range(prompt)] for r in range(rows)]
    comps = [[(13 * r + 5 * j) % 1500 + 3 for j in range(completion)] for r in range(rows)]
    inputs, targets, mask = S.pack(prompts, comps)
    blocks = variant == "blocks"
    saved = S.LOGITS_BLOCK_BYTES
    S.LOGITS_BLOCK_BYTES = saved if blocks else 1 << 62

    def run():
        if pass_ == "reference":
            mx.eval(S.completion_logps(model, inputs, targets, mask, forward_only=True).tokens)
            return

        def loss(m):  # as pair_loss: log-probs differentiated, the tempered ones evaluated for the metrics
            sc = S.completion_logps(m, inputs, targets, mask, temperature=0.8, forward_only=blocks)
            return sc.sum.sum(), mx.stop_gradient(sc.tempered.sum())

        mx.eval(nn.value_and_grad(model, loss)(model))

    try:
        mx.synchronize()
        if cold:
            mx.clear_cache()
        mx.reset_peak_memory()
        t = time.perf_counter()
        run()
        return {"seconds": time.perf_counter() - t, "peak_mb": mx.get_peak_memory() / 2**20}
    finally:
        S.LOGITS_BLOCK_BYTES = saved


def render(data: dict) -> str:
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Preset {data['preset']}, bf16 checkpoint, compute_dtype auto (float32), LoRA rank 8; {data['rows']} rows x "
        f"({data['prompt']} + completion) tokens; blocks of {data['block_mib']} MiB; {data['rounds']} alternating "
        "rounds, medians [min–max]; peak = mx.get_peak_memory(), weights included.",
        "",
        "| completion tokens | float32 logits MB | pass | one pass s | blocks s | one pass peak MB | blocks peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in data["completions"]:
        for pass_ in ("reference", "policy"):
            runs = {v: [r[f"{c}/{pass_}/{v}"] for r in data["runs"]] for v in ("one pass", "blocks")}

            def cell(v, key, nd):
                xs = [x[key] for x in runs[v]]
                return f"{B.fmt(B.median(xs), nd)} [{B.fmt(min(xs), nd)}–{B.fmt(max(xs), nd)}]"

            logits_mb = data["rows"] * c * data["vocab"] * 4 / 1e6
            lines.append(
                f"| {c} | {logits_mb:.0f} | {pass_} | {cell('one pass', 'seconds', 1)} "
                f"| {cell('blocks', 'seconds', 1)} | {cell('one pass', 'peak_mb', 0)} "
                f"| {cell('blocks', 'peak_mb', 0)} |"
            )
    lines += ["", "The trainer runs the reference pass in blocks and the policy pass in one pass."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="q05")
    ap.add_argument("--completions", default="128,256", help="comma-separated completion lengths")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--name", default="blocks")
    ap.add_argument("--render-only", action="store_true")
    ns = ap.parse_args()
    if ns.render_only:
        return B.rerender(ns.name, render)
    model = load_with_lora(ns.preset)
    from mlx_xpo_plugin.compute import scoring
    from mlx_xpo_plugin.cpu import fast_blas

    completions = [int(c) for c in ns.completions.split(",")]
    data = {
        "preset": ns.preset,
        "rows": ns.rows,
        "prompt": ns.prompt,
        "completions": completions,
        "vocab": model.args.vocab_size,
        "block_mib": scoring.LOGITS_BLOCK_BYTES // 2**20,
        "rounds": ns.rounds,
        "machine": B.machine(),
        "blas": fast_blas.banner_line(),
        "load_before": B.loadavg(),
        "runs": [],
    }
    for r in range(ns.rounds):
        order = [(c, p, v) for c in completions for p, v in VARIANTS]
        out = {}
        for c, p, v in order[::-1] if r % 2 else order:
            out[f"{c}/{p}/{v}"] = measure(model, c, ns.rows, ns.prompt, p, v)
            print(r, c, p, v, {k: round(x, 1) for k, x in out[f"{c}/{p}/{v}"].items()}, flush=True)
        data["runs"].append(out)
    data["load_after"] = B.loadavg()
    _, md = B.write_results(ns.name, data, render(data))
    print(md.read_text())


if __name__ == "__main__":
    main()
