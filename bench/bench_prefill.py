"""The rollout at real prompt lengths: the prompt pass with every position's logits (as before)
against the last position's only (decode.prefill), time and peak memory, in one process.

    python bench/bench_prefill.py                             # q05, 4 rows, prompts 64, 256, 1024
    python bench/bench_prefill.py --prompts 64,256 --parts rollout   # a short run

Qwen2.5-0.5B's shape (24 layers, vocabulary 151,936), bf16 checkpoint loaded as a run loads it
(bench_limits.load_as_run: float32 on the CPU). One rollout = ``decode.generate`` of ``--rows``
rows (a step's 2 prompts x 2 completions) of ``--tokens`` sampled tokens (mlx-lm's sampler at
temperature 0.8, seed 0) after prompts of each length; the prompt pass alone = the same with one
token. Variants: "every position" (the prompt pass as it was: ``model(prompt)[:, -1, :]``, which
computes rows x prompt x vocabulary logits) and "last position" (as shipped). Rounds alternate
the order; seconds and ``mx.get_peak_memory()`` (weights included) of one call after
``mx.clear_cache()``; medians [min-max] over rounds. Tokens are compared across the variants, and
the largest difference of the first step's log-probs is reported.

Output: bench/results/prefill.json, .md, and a line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402
from bench_limits import load_as_run  # noqa: E402

VARIANTS = ("every position", "last position")


@contextlib.contextmanager
def variant(name: str):
    from mlx_xpo_plugin.compute import decode

    saved = decode.prefill
    if name == "every position":
        decode.prefill = lambda model, x, caches: model(x, cache=caches)[:, -1, :]
    try:
        yield
    finally:
        decode.prefill = saved


def rollout(model, rows: int, prompt: int, tokens: int) -> dict:
    """seconds, peak MB, tokens and the first step's log-probs of one ``decode.generate`` call."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from mlx_xpo_plugin.compute import decode

    prompts = [[(7 * r + j) % 1500 + 3 for j in range(prompt)] for r in range(rows)]
    sample, first = make_sampler(temp=0.8), []

    def sampler(logprobs):
        if not first:
            first.append(logprobs)
        return sample(logprobs)

    mx.random.seed(0)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    out = decode.generate(model, prompts, tokens, sampler, [])
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": mx.get_peak_memory() / 2**20, "tokens": out, "first": first[0]}


def cell(xs, nd):
    return f"{B.fmt(B.median(xs), nd)} [{B.fmt(min(xs), nd)}–{B.fmt(max(xs), nd)}]"


def summary(data: dict) -> dict:
    out = {"same_tokens": data["same_tokens"], "max_logprob_diff": data["max_logprob_diff"]}
    for p in data["prompts"]:
        for what in data["parts"]:
            s = {v: B.median([r[f"{p}/{what}/{v}"]["seconds"] for r in data["runs"]]) for v in VARIANTS}
            m = {v: B.median([r[f"{p}/{what}/{v}"]["peak_mb"] for r in data["runs"]]) for v in VARIANTS}
            key = f"{p}_{what.replace(' ', '_')}"
            out[f"{key}_s"] = {v: round(s[v], 2) for v in VARIANTS}
            out[f"{key}_peak_mb"] = {v: round(m[v]) for v in VARIANTS}
    return out


def render(data: dict) -> str:
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Load average before / after: {data['load_before']} / {data['load_after']}. Preset {data['preset']}, "
        f"bf16 checkpoint as float32; {data['rows']} rows; rollout = prompt pass + {data['tokens']} sampled tokens "
        f"(temperature 0.8); {len(data['runs'])} alternating rounds, medians [min–max]; peak = "
        "mx.get_peak_memory(), weights included.",
        "",
        "| prompt tokens | what | every position s | last position s | every position peak MB "
        "| last position peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for p in data["prompts"]:
        for what in data["parts"]:
            runs = {v: [r[f"{p}/{what}/{v}"] for r in data["runs"]] for v in VARIANTS}
            lines.append(
                f"| {p} | {what} | "
                + " | ".join(cell([x["seconds"] for x in runs[v]], 2) for v in VARIANTS)
                + " | "
                + " | ".join(cell([x["peak_mb"] for x in runs[v]], 0) for v in VARIANTS)
                + " |"
            )
    lines += [
        "",
        f"Same sampled tokens in both variants: {data['same_tokens']}; first step's log-probs differ by at most "
        f"{data['max_logprob_diff']:.1e}.",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="q05")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompts", default="64,256,1024", help="comma-separated prompt lengths")
    ap.add_argument("--tokens", type=int, default=16, help="tokens sampled per rollout")
    ap.add_argument("--parts", default="prompt pass,rollout", help="what to time: prompt pass, rollout or both")
    ap.add_argument("--name", default="prefill")
    ap.add_argument("--render-only", action="store_true")
    ns = ap.parse_args()
    if ns.render_only:
        return B.rerender(ns.name, render)
    model = load_as_run(ns.preset)
    model.eval()
    import mlx.core as mx

    prompts = [int(p) for p in ns.prompts.split(",")]
    data = {
        "preset": ns.preset,
        "rows": ns.rows,
        "tokens": ns.tokens,
        "prompts": prompts,
        "parts": ns.parts.split(","),
        "machine": B.machine(),
        "load_before": B.loadavg(),
        "runs": [],
    }
    rollout(model, ns.rows, 8, 2)  # the first call traces the decode step and builds its kernels
    seen, diffs = {}, []
    for r in range(ns.rounds):
        order = [(p, w, v) for p in prompts for w in data["parts"] for v in VARIANTS]
        out = {}
        for p, what, v in order[::-1] if r % 2 else order:
            with variant(v):
                res = rollout(model, ns.rows, p, 1 if what == "prompt pass" else ns.tokens)
            first = res.pop("first")
            seen.setdefault((p, what), {})[v] = (res.pop("tokens"), first)
            out[f"{p}/{what}/{v}"] = res
            print(r, p, what, v, {k: round(x, 2) for k, x in res.items()}, flush=True)
        for pair in seen.values():
            (ta, fa), (tb, fb) = pair[VARIANTS[0]], pair[VARIANTS[1]]
            diffs.append((mx.abs(fa - fb).max().item(), ta == tb))
        data["runs"].append(out)
    data["same_tokens"] = all(same for _, same in diffs)
    data["max_logprob_diff"] = max(d for d, _ in diffs)
    data["load_after"] = B.loadavg()
    B.write_results(ns.name, data, render(data))
    print(render(data))
    print("RESULT " + json.dumps(summary(data)))


if __name__ == "__main__":
    main()
