"""Learning evidence: win-rate of the policy against the frozen reference as a function of the number
of judged pairs, for online_dpo and xpo (kl and paper forms) at a few alphas, over several seeds.

The task: a rule judge prefers the completion with more letter 'e' (mlx_xpo_plugin.rules), so the
preference is exact and the win-rate measures how far training moved the policy toward it.
The XPO paper claims XPO is more sample-efficient than non-exploratory online DPO; the table says
honestly whether that shows here.

    python bench/bench_learning.py [--seeds 3] [--steps 40] [--preset tiny]

Writes bench/results/learning.json, learning.md and learning.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import _toy as toy
import mlx.core as mx
from _common import RESULTS, cache_dir, model_path

from mlx_xpo_plugin.commands.data import load_prompts
from mlx_xpo_plugin.commands.tiny import write_prompt_dataset
from mlx_xpo_plugin.loop.jsonio import dumps as strict_dumps
from mlx_xpo_plugin.loop.prompts import PromptSet

CONFIGS = [
    ("online_dpo", "online_dpo", {}),
    ("xpo kl a=1e-4", "xpo", {"alpha": 1e-4}),
    ("xpo kl a=1e-3", "xpo", {"alpha": 1e-3}),
    ("xpo paper a=1e-4", "xpo", {"alpha": 1e-4, "xpo_bonus": "paper"}),
    ("xpo paper a=1e-3", "xpo", {"alpha": 1e-3, "xpo_bonus": "paper"}),
]


def one_run(model_path, data_dir, mode, extra, seed, steps, every, batch):
    with tempfile.TemporaryDirectory() as ad:
        model, tok = toy.load(model_path, seed)
        train = load_prompts(data_dir, "train", tok, 200)
        test = load_prompts(data_dir, "test", tok, 200)
        test = PromptSet(test.ids * 2, test.texts * 2)
        loop = {"iters": steps, "seed": seed, "batch_size": batch, "max_completion_length": 16, "temperature": 1.0}
        t = toy.trainer(model, tok, train, mode, "e", ad, steps_per_report=every, steps_per_eval=every, **loop, **extra)
        curve = []

        def validate():  # called by the loop at step 0 and every `every` steps
            mx.random.seed(10_000 + seed)  # the same evaluation draws for every config
            r = t.evaluate(test)
            curve.append({"pairs_judged": t.step * batch, "win_rate": r["win_rate"]})

        t.validate = validate
        t.train()
        return curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--preset", default="tiny")
    ns = ap.parse_args(argv)
    model = model_path(ns.preset)
    data = str(write_prompt_dataset(cache_dir() / "data-learning"))  # with test.jsonl: held-out prompts
    results = {}
    t0 = time.time()
    for label, mode, extra in CONFIGS:
        curves = []
        for seed in range(ns.seeds):
            curves.append(one_run(model, data, mode, extra, seed, ns.steps, ns.every, ns.batch))
            print(f"{label:>18} seed {seed}: " + " ".join(f"{c['win_rate']:.2f}" for c in curves[-1]), flush=True)
        results[label] = curves
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "learning.json").write_text(strict_dumps({"settings": vars(ns), "results": results}, indent=1))
    pairs = [c["pairs_judged"] for c in next(iter(results.values()))[0]]
    lines = ["| config | " + " | ".join(f"{p} pairs" for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for label, curves in results.items():
        cells = []
        for i in range(len(pairs)):
            v = [c[i]["win_rate"] for c in curves]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (RESULTS / "learning.md").write_text(
        f"Win-rate vs the reference (mean ± sd over {ns.seeds} seeds, {ns.preset} model, batch {ns.batch}, "
        f"16-token completions, rule judge: more letter 'e' wins; 48 held-out pairs per point)\n\n{table}\n"
    )
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, curves in results.items():
            m = [statistics.mean(c[i]["win_rate"] for c in curves) for i in range(len(pairs))]
            ax.plot(pairs, m, marker="o", label=label)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel("judged pairs")
        ax.set_ylabel("win-rate vs reference")
        ax.set_ylim(0.3, 1.02)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / "learning.png", dpi=90)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
