"""``mlx-xpo estimate`` against measured steps: tiny, small and q05 (Qwen2.5-0.5B's shape, bf16).

    python bench/bench_estimate.py                      # tiny and small
    python bench/bench_estimate.py --presets q05 --steps 3

One process per preset: it calibrates this machine's rates (a fresh calibration, not the cache),
projects a step with :func:`mlx_xpo_plugin.commands.estimate.project`, then trains that preset
for ``--steps`` steps (xpo, 2 prompts x 2 completions of 32 tokens, a function judge: the
settings of bench_q05) and compares the median of the steps after the first with the projection,
phase by phase. Within 30% is the target.

Output: bench/results/estimate.json and estimate.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402

ONE = r"""
import json, statistics, sys
from pathlib import Path
from mlx_xpo_plugin.api import as_config, train_method
from mlx_xpo_plugin.xpo_trainer import XPO
from mlx_xpo_plugin.commands import calibration, estimate
model, data, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = dict(model=model, data=data, train=True, adapter_path=out, judge="mlx_xpo_plugin.rules:coin_reward",
         iters=steps, batch_size=2, max_completion_length=32, steps_per_report=1, steps_per_eval=10000,
         val_batches=1, save_every=10000, seed=0, test=False, fuse=False)
rates, record = calibration.rates(cache=out + "-cal", refresh=True)
proj = estimate.project(as_config("xpo", s), 120, rates, estimate.mean_prompt_tokens(model, data))
assert train_method(XPO, s, progress=False) == 0
rows = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
rows = [r for r in rows if r.get("step", 0) > 1 and "time/policy" in r]
med = {p: statistics.median(r.get("time/" + p, 0.0) for r in rows) for p in ("rollout", "judge", "reference", "policy")}
med["other"] = statistics.median(r["step_seconds"] - sum(r.get("time/" + p, 0.0) for p in ("rollout", "judge",
    "reference", "policy")) for r in rows)
med["total"] = statistics.median(r["step_seconds"] for r in rows)
print("RESULT", json.dumps({"projected": proj["step"], "measured": med, "steps": len(rows),
      "rates": record["rates"], "prompt_tokens": proj["prompt_tokens"]}))
"""


def run(preset: str, steps: int) -> dict:
    from mlx_xpo_plugin.commands.tiny import build_tiny_model

    dtype = "bfloat16" if preset == "q05" else "float32"
    name = f"model-{preset}-bf16" if preset == "q05" else f"model-{preset}"
    model = str(build_tiny_model(B.cache_dir() / name, preset=preset, dtype=dtype))
    return B.child_result([sys.executable, "-c", ONE, model, B.data_path(), str(steps)], preset, timeout=3600)


def render(data: dict) -> str:
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Load average before / after: {data['load_before']} / {data['load_after']}.",
        "xpo, 2 prompts x 2 completions of up to 32 tokens, function judge; measured: median of the steps after "
        "the first; projected: the estimate from a calibration in the same process.",
        "",
        "| preset | sgemm GFLOP/s | 4-row stream GB/s | phase | projected s | measured s | projected / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, res in data["presets"].items():
        r = res["rates"]
        for p in ("rollout", "reference", "policy", "other", "total"):
            pr, me = res["projected"][p] or 0.0, res["measured"][p]
            label = "**step**" if p == "total" else p
            lines.append(
                f"| {preset} | {r['sgemm'] / 1e9:.0f} | {r['stream'] / 1e9:.1f} | {label} | "
                f"{pr:.3f} | {me:.3f} | {B.fmt(pr / me, 2) if me else '–'} |"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--name", default="estimate")
    ns = ap.parse_args()
    data = {"machine": B.machine(), "load_before": B.loadavg(), "presets": {}}
    for preset in ns.presets.split(","):
        data["presets"][preset] = run(preset, ns.steps)
        print(preset, json.dumps(data["presets"][preset]["projected"]), json.dumps(data["presets"][preset]["measured"]))
    data["load_after"] = B.loadavg()
    j, md = B.write_results(ns.name, data, render(data))
    print(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()
