"""Data-parallel throughput: 2 processes (mlx.launch, ring backend on loopback) vs 1 process, same
global batch, same model and settings. MLX on CPU runs a process's work largely on one core, so on a
multi-core machine two ranks can nearly double the prompts per second.

    python bench/bench_distributed.py [--iters 12] [--global-batch 4] [--length 32]

Writes bench/results/distributed.json and distributed.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import RESULTS, data_path, model_path

from mlx_xpo_plugin.loop.jsonio import dumps as strict_dumps


def step_times(out: Path) -> list:
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    return [r["step_seconds"] for r in rows if "step_seconds" in r][1:]  # step 1 is warm-up


def run(ranks: int, cfg: dict, tmp: Path) -> dict:
    out = tmp / f"ranks{ranks}"
    c = dict(cfg, adapter_path=str(out), batch_size=cfg["batch_size"] // ranks)
    path = tmp / f"cfg{ranks}.yaml"
    path.write_text(yaml.safe_dump(c))
    cmd = [sys.executable, "-m", "mlx_lm_lora.train", "--train-mode", "xpo", "--config", str(path)]
    if ranks > 1:
        launch = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
        cmd = [launch, "-n", str(ranks), "--backend", "ring", *cmd]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{r.stderr[-2000:]}")
    st = sorted(step_times(out))
    med = st[len(st) // 2]
    return {"ranks": ranks, "wall_s": wall, "median_step_s": med, "prompts_per_s": cfg["batch_size"] / med}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--preset", default="tiny")
    ns = ap.parse_args(argv)
    model, data = model_path(ns.preset), data_path()
    cfg = {
        "model": model,
        "data": data,
        "train": True,
        "judge": "mlx_xpo_plugin.rules:prefer_letter_e",
        "iters": ns.iters,
        "batch_size": ns.global_batch,
        "max_completion_length": ns.length,
        "max_seq_length": 256,
        "steps_per_report": 1,
        "steps_per_eval": 10**6,
        "save_every": 10**6,
        "learning_rate": 1e-4,
    }
    with tempfile.TemporaryDirectory() as tmp:
        res = [run(1, cfg, Path(tmp)), run(2, cfg, Path(tmp)), run(1, cfg, Path(tmp)), run(2, cfg, Path(tmp))]
    by = {k: sorted(r["median_step_s"] for r in res if r["ranks"] == k) for k in (1, 2)}
    one, two = by[1][0], by[2][0]  # best of the alternating pair
    table = (
        "| processes | batch per process | median step (s) | prompts/s | speed-up |\n|---|---|---|---|---|\n"
        f"| 1 | {ns.global_batch} | {one:.3f} | {ns.global_batch / one:.1f} | 1.00 |\n"
        f"| 2 (ring) | {ns.global_batch // 2} | {two:.3f} | {ns.global_batch / two:.1f} | {one / two:.2f} |\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(strict_dumps({"settings": vars(ns), "runs": res}, indent=1))
    (RESULTS / "distributed.md").write_text(
        f"Data parallel, {ns.preset} model, global batch {ns.global_batch}, {ns.length}-token completions, "
        f"rule judge, {ns.iters} steps (step 1 excluded), alternating 1/2/1/2 processes, best of each:\n\n{table}"
    )
    print(table)


if __name__ == "__main__":
    main()
