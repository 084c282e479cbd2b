"""The BLAS thread policy on a loaded machine: a step is never slower than with one thread.

    python bench/bench_threads.py                       # small preset, 2 rounds
    python bench/bench_threads.py --old /path/to/older/checkout/.venv/bin/python

Each cell is one process training the ``small`` preset (xpo, 2 prompts x 2 completions of 32
tokens, a function judge, 8 steps; the median of steps 2-8), on the machine as it is and with one
busy-loop process per core started around it (each stopped after at most ``--busy-s`` seconds).
Sides: this checkout's policy as shipped (no thread setting), with ``OPENBLAS_NUM_THREADS`` set to
the core count (the counts it starts from are then cut to idle cores at every rollout), with
``OPENBLAS_THREAD_TIMEOUT=20`` (idle threads spin 2**20 cycles instead of 2**28), and
``OPENBLAS_NUM_THREADS=1``; with ``--old``, an older
checkout's interpreter at the core count (before the cut). Rounds alternate
the order of the sides.

Output: bench/results/threads.json and threads.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402

STEP = r"""
import json, statistics, sys
from pathlib import Path
from mlx_xpo_plugin.api import train_method
from mlx_xpo_plugin.xpo_trainer import XPO
from mlx_xpo_plugin.cpu import fast_blas
model, data, out = sys.argv[1:4]
s = dict(model=model, data=data, train=True, adapter_path=out, judge="mlx_xpo_plugin.rules:coin_reward",
         iters=8, batch_size=2, max_completion_length=32, steps_per_report=1, steps_per_eval=10000,
         val_batches=1, save_every=10000, seed=0, test=False, fuse=False)
assert train_method(XPO, s, progress=False) == 0
rows = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
rows = [r for r in rows if r.get("step", 0) > 1 and "step_seconds" in r]
print("RESULT", json.dumps({"step": statistics.median(r["step_seconds"] for r in rows),
      "rollout": statistics.median(r.get("time/rollout", 0) for r in rows),
      "blas": fast_blas.banner_line(), "phases": getattr(fast_blas, "PHASE_THREADS", None)}))
"""


def busy_loops(n: int, seconds: float) -> list:
    code = f"import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def one(python: str, env_extra: dict, model: str, data: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")}
    env.update(env_extra)
    return B.child_result([python, "-c", STEP, model, data], python, timeout=600, env=env)


def render(data: dict) -> str:
    lines = [
        f"Machine: {B.machine_line(data['machine'])}.",
        f"Load average before / after: {data['load_before']} / {data['load_after']}; {data['rounds']} rounds; "
        "medians over rounds [min–max] of each run's median step (steps 2-8), small preset, 4 rows x 32 tokens.",
        "",
        "| load | side | step s | rollout s | vs one thread | threads per phase (last run) |",
        "|---|---|---|---|---|---|",
    ]
    for load, sides in data["cells"].items():
        one_t = B.median([r["step"] for r in sides["one thread"]])
        for side, runs in sides.items():
            st = [r["step"] for r in runs]
            ro = [r["rollout"] for r in runs]
            lines.append(
                f"| {load} | {side} | {B.fmt(B.median(st), 3)} [{B.fmt(min(st), 3)}–{B.fmt(max(st), 3)}] | "
                f"{B.fmt(B.median(ro), 3)} | {B.fmt(B.median(st) / one_t, 2)} | {runs[-1].get('phases') or '–'} |"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy-s", type=float, default=120.0)
    ap.add_argument("--old", default=None, help="an older checkout's python, run at the core count")
    ap.add_argument("--name", default="threads")
    ns = ap.parse_args()
    from mlx_xpo_plugin.commands.tiny import build_tiny_model
    from mlx_xpo_plugin.cpu.fast_blas import usable_cores

    cores = usable_cores()
    model = str(build_tiny_model(B.cache_dir() / "model-small", preset="small"))
    data_dir = B.data_path()
    sides = {
        "policy as shipped": (sys.executable, {}),
        f"OPENBLAS_NUM_THREADS={cores}": (sys.executable, {"OPENBLAS_NUM_THREADS": str(cores)}),
        "policy, idle threads spin 2**20 cycles": (sys.executable, {"OPENBLAS_THREAD_TIMEOUT": "20"}),
        "one thread": (sys.executable, {"OPENBLAS_NUM_THREADS": "1"}),
    }
    if ns.old:
        sides[f"older checkout, {cores} threads"] = (ns.old, {"OPENBLAS_NUM_THREADS": str(cores)})
    data = {"machine": B.machine(), "load_before": B.loadavg(), "rounds": ns.rounds, "cells": {}}
    for load in ("as it is", f"+{cores} busy loops"):
        cell = data["cells"].setdefault(load, {k: [] for k in sides})
        for r in range(ns.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            procs = busy_loops(cores, ns.busy_s) if "busy" in load else []
            try:
                time.sleep(0.5 if procs else 0)
                for side in order:
                    res = one(*sides[side], model, data_dir)
                    print(load, side, res, flush=True)
                    cell[side].append(res)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    data["load_after"] = B.loadavg()
    j, md = B.write_results(ns.name, data, render(data))
    print(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()
