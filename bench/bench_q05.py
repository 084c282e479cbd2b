"""A real model size: step time and peak memory, ours vs upstream vs TRL, then the distance to the
machine's limits per phase -- one run: about 27 minutes of steps on 2 cores, then 8 of bench_limits.py.

    python bench/bench_q05.py                  # the side-by-side steps, then bench_limits.py
    python bench/bench_q05.py --skip-limits    # only the side-by-side steps
    python bench/bench_q05.py --render-only    # rewrite results/q05.md from results/q05.json

Checkpoint: the ``q05`` preset of ``mlx_xpo_plugin.commands.tiny`` (Qwen2.5-0.5B's shape: 24 layers,
hidden 896, 14 / 2 heads, intermediate 4,864, vocabulary 151,936, tied embeddings), random weights
stored in bfloat16, and the same weights quantized to 4 bits (group 64). Built offline, cached.

Sides (each run a fresh process; the order interleaves them so that no side runs twice in a row):

* ours: ``compute_dtype: auto`` (the default: float32 on the CPU backend), our default ``xpo_bonus:
  kl``, and ``paper`` (TRL's formulation) as a second xpo row;
* upstream: mlx-lm-lora's built-in mode (``MLX_XPO_PLUGIN=0``) on the checkpoint as it ships
  (bfloat16 arithmetic), run as bench_step.py runs it (same driver, same BLAS, device_info shim);
* TRL 1.13 on PyTorch CPU (bench_trl.py's virtual environment and side), the bfloat16 weights
  loaded as float32 -- the numbers ours computes with after ``auto`` -- on 2 torch threads.

Same settings everywhere: 2 prompts per step, 32-token completions, temperature 0.8, LoRA rank 8 /
scale 10 on every block, Adam at 1e-5, beta 0.1, alpha 1e-5 (xpo), no validation.

The preference signal cannot be the same: upstream accepts only an LLM judge (here the checkpoint
itself, as in bench_step.py), TRL's XPO only a reward model (a tiny random one, as in bench_trl.py).
Ours and TRL's online DPO use ``mlx_xpo_plugin.rules:coin_reward`` (a random score: the random
model's samples mostly decode to nothing, so a rule on the text would tie every pair and skip the
update). So the main column is the step **without the judge**: the step's wall time minus the
time spent judging (ours ``time/judge``, upstream's ``LLMPairwiseJudge.judge`` timed from outside,
TRL's reward call); the whole step is shown beside it.

Steps: ``--iters`` per run for ours and TRL (default 3); the first step is warm-up (MLX's
compiled kernels, PyTorch's first allocations) and not counted, so a cell is the median of 2 steps
of one run. Upstream takes minutes per step at this size, so it runs ``--upstream-iters`` steps
(default 1), timed by its own per-step timer (``1 / iterations_per_second``; it has no compiled
step to warm up). One run per cell: a range shown is between the steps of that run, not between
runs.

Upstream on the 4-bit checkpoint is not run: it multiplies with bfloat16 activations through
``quantized_matmul`` (0.2-2 GFLOP/s here, bench_limits.py's ``4bit:native`` row), so one step
would take tens of minutes; the limits table gives its scoring rate instead.

Output: results/q05.json and q05.md, and (from bench_limits.py) results/limits.json and limits.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402
import bench_limits as L  # noqa: E402
import bench_trl as T  # noqa: E402

JUDGE = "mlx_xpo_plugin.rules:coin_reward"
LENGTH = 32

#: (label, side, mode, checkpoint, our xpo_bonus); the order of the runs
CELLS = (
    ("xpo", "ours", "xpo", "bf16", "kl"),
    ("xpo", "upstream", "xpo", "bf16", None),
    ("xpo", "trl", "xpo", "bf16", None),
    ("xpo paper form", "ours", "xpo", "bf16", "paper"),
    ("online_dpo", "trl", "online_dpo", "bf16", None),
    ("online_dpo", "upstream", "online_dpo", "bf16", None),
    ("online_dpo", "ours", "online_dpo", "bf16", None),
    ("xpo, 4-bit checkpoint", "ours", "xpo", "4bit", "kl"),
)


def settings(side: str, mode: str, model: str, iters: int, bonus: str | None) -> dict:
    """bench_trl.py's settings for our side; upstream gets the checkpoint as its (LLM) judge, alpha
    as its flag parses it, and no xpo_bonus (a setting it does not have)."""
    s = T.ours_settings(mode, model, LENGTH, iters, bonus, judge=model if side == "upstream" else JUDGE)
    if side == "upstream":
        s.pop("xpo_bonus", None)
        if mode == "xpo":
            s["alpha"] = [1e-5]
    return s


def summarize(side: str, res: dict) -> dict:
    """Timed steps: every step after the first by the wall clock between callbacks; a one-step
    upstream run by upstream's own timer (``1 / iterations_per_second``) instead."""
    steps = [r for r in res["steps"] if r.get("iteration", 0) > 1]
    key = "wall_seconds"
    if not steps and side == "upstream":
        steps, key = res["steps"], "own_step_seconds"
    judge_key = {"ours": "time/judge", "upstream": "bench/judge", "trl": "reward_seconds"}[side]
    wall = [r[key] for r in steps]
    judge = [r.get(judge_key) or 0.0 for r in steps]
    out = {
        "steps": len(wall),
        "step_s": wall,
        "judge_s": judge,
        "no_judge_s": [w - j for w, j in zip(wall, judge)],
        # prompt + completion tokens scored per step (upstream re-tokenises the decoded text)
        "scored_tokens": B.median([r.get("bench/scored_tokens") for r in steps]),
        "peak_rss_mb": res["peak_rss_mb"],
        "completion_tokens": res["completion_tokens"],
        "process_s": res.get("process_seconds"),
        "timer": key,
        "torch_blas": res.get("torch_blas"),
    }
    if side != "trl":
        out["mx_peak_mb"] = max(r["mx_peak_bytes"] for r in steps) / 1e6
    if side == "ours":
        out["phases"] = {p: B.median([r.get(f"time/{p}") for r in steps]) for p in ("rollout", "reference", "policy")}
    return out


def run_cell(cell, paths, ns, work: Path) -> dict:
    label, side, mode, ckpt, bonus = cell
    wd = work / f"{label.replace(' ', '_').replace(',', '')}-{side}"
    t0 = time.perf_counter()
    if side == "trl":
        spec = dict(T.trl_spec(mode, paths[ckpt], LENGTH, ns.iters, wd), reward_function="coin_reward")
        res = T.run_trl(spec, wd, timeout=3600)
    else:
        iters = ns.upstream_iters if side == "upstream" else ns.iters
        res = B.run_one(side, mode, settings(side, mode, paths[ckpt], iters, bonus), wd, timeout=3600)
    s = summarize(side, res)
    print(
        f"[bench_q05] {label:22s} {side:8s}: step {B.median(s['step_s']):.1f} s, without judge "
        f"{B.median(s['no_judge_s']):.1f} s, peak RSS {s['peak_rss_mb']:.0f} MB "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return {"label": label, "side": side, "mode": mode, "checkpoint": ckpt, "xpo_bonus": bonus, **s}


def render(data: dict) -> str:
    rows = data["runs"]

    def cell(label, side):
        return next((r for r in rows if r["label"] == label and r["side"] == side), None)

    def secs(r, key):
        if r is None:
            return "not run"
        v = r[key]
        return f"{B.median(v):.1f}" + (f" [{min(v):.1f}–{max(v):.1f}]" if len(v) > 1 else "")

    def ratio(a, b):
        if a is None or b is None:
            return "–"
        return f"{B.median(a['no_judge_s']) / B.median(b['no_judge_s']):.2f}"

    head = [
        "mode (checkpoint)",
        "side",
        "step without judge, s",
        "whole step, s",
        "judge, s",
        "tokens scored / step",
        "MLX peak MB",
        "peak RSS MB",
        "ours / this side",
    ]
    table = []
    for label in dict.fromkeys(r["label"] for r in rows):
        ours = cell(label, "ours")
        others = [cell(label, side) for side in ("upstream", "trl") if cell(label, side)]
        if ours is not None and not others:  # a variant of ours: compared with its mode's other sides
            vs = [(side, cell(ours["mode"], side)) for side in ("upstream", "trl")]
            note = "; ".join(
                f"{ratio(ours, r)} vs {side}"
                + ("" if r["checkpoint"] == ours["checkpoint"] else f" ({r['checkpoint']})")
                for side, r in vs
                if r is not None
            )
        for side in ("ours", "upstream", "trl"):
            r = cell(label, side)
            if r is None:
                continue
            target = note if side == "ours" and not others else ""
            table.append(
                [
                    label,
                    side,
                    secs(r, "no_judge_s"),
                    secs(r, "step_s"),
                    f"{B.median(r['judge_s']):.2f}",
                    B.fmt(r.get("scored_tokens"), 0),
                    B.fmt(r.get("mx_peak_mb"), 0),
                    f"{r['peak_rss_mb']:.0f}",
                    target if side == "ours" else ratio(ours, r) + target,
                ]
            )
    phases = [
        [r["label"], f"{B.median(r['no_judge_s']):.1f}"]
        + [f"{r['phases'][p]:.1f}" for p in ("rollout", "reference", "policy")]
        for r in rows
        if r["side"] == "ours"
    ]
    return "\n".join(
        [
            f"Machine: {B.machine_line(data['machine'])}.",
            rates_line(data.get("rates")),
            f"TRL side: {data.get('trl_versions')}, torch BLAS: {data.get('trl_blas')}, {T.THREADS} threads.",
            f"Load average before / after: {data['loadavg_before']} / {data['loadavg_after']}; "
            f"{data['wall_seconds'] / 60:.0f} minutes.",
            f"Steps per run: ours and TRL {data['iters']} (the first one warm-up), upstream "
            f"{data['upstream_iters']} (timed by its own timer when 1); one run per cell, [min–max] over "
            "its timed steps.",
            "",
            B.md_table(head, table),
            "",
            "Our step by phase (seconds, median over the timed steps):",
            "",
            B.md_table(["mode (checkpoint)", "step without judge", "rollout", "reference", "policy"], phases),
        ]
    )


def machine_rates() -> dict:
    """This machine's rates, measured in this process with the BLAS a run uses: float32 sgemm at a
    q05 MLP's shape (256 x 896 @ 896 x 4864) and memory read with one thread per core."""
    from mlx_xpo_plugin.cpu import fast_blas

    fast_blas.request()
    fast_blas.preload()
    return {
        "sgemm_gflops": L.sgemm_gflops(896, 4864, 10),
        "read_gbs": L.read_bandwidth(3),
        "blas_threads": fast_blas.current_threads(),
    }


def rates_line(rates: dict | None) -> str:
    if not rates:
        return "Machine rates: not measured in this run."
    return (
        f"Machine rates at the start of this run: float32 sgemm {rates['sgemm_gflops']:.0f} GFLOP/s "
        f"({rates['blas_threads']} BLAS threads), memory read {rates['read_gbs']:.1f} GB/s (one thread per core)."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3, help="steps per run, ours and TRL (the first is warm-up)")
    ap.add_argument(
        "--upstream-iters", type=int, default=1, help="steps per upstream run (1: timed by upstream's own timer)"
    )
    ap.add_argument("--only", default="", help="comma-separated labels of CELLS to run (default: all)")
    ap.add_argument("--sides", default="ours,upstream,trl", help="comma-separated sides to run (default: all)")
    ap.add_argument("--skip-limits", action="store_true", help="do not run bench_limits.py afterwards")
    ap.add_argument("--limits-rounds", type=int, default=1)
    ap.add_argument(
        "--torch-index",
        default=T.CPU_INDEX if sys.platform == "linux" else "",
        help="as in bench_trl.py: extra index for the torch CPU build when bench/.trl-venv is created",
    )
    ap.add_argument("--name", default="q05")
    ap.add_argument("--render-only", action="store_true")
    ns = ap.parse_args()
    if ns.render_only:
        B.rerender(ns.name, render)
        return 0
    versions = T.ensure_venv(ns.torch_index)
    paths = {"bf16": L.build("q05", None), "4bit": L.build("q05", 4)}
    only = {x.strip() for x in ns.only.split(",") if x.strip()}
    t0, la0 = time.perf_counter(), B.loadavg()
    rates = machine_rates()
    print("[bench_q05] " + rates_line(rates), flush=True)
    work = Path(tempfile.mkdtemp(prefix="mlx-xpo-bench-q05-"))
    runs, failed = [], []
    for c in CELLS:
        if (only and c[0] not in only) or c[1] not in ns.sides.split(","):
            continue
        try:
            runs.append(run_cell(c, paths, ns, work))
        except Exception as e:  # one failed run must not lose the others
            failed.append(f"{c[0]} {c[1]}: {e}")
            print(f"[bench_q05] FAILED {c[0]} {c[1]}: {e}", flush=True)
    data = {
        "benchmark": "bench_q05",
        "machine": B.machine(),
        "rates": rates,
        "trl_versions": versions,
        "trl_blas": next((r["torch_blas"] for r in runs if r["side"] == "trl"), None),
        "iters": ns.iters,
        "upstream_iters": ns.upstream_iters,
        "loadavg_before": la0,
        "loadavg_after": B.loadavg(),
        "wall_seconds": time.perf_counter() - t0,
        "runs": runs,
        "failed": failed,
    }
    md = render(data)
    j, m = B.write_results(ns.name, data, md)
    print("\n" + md + f"\n[bench_q05] wrote {j} and {m}", flush=True)
    B.cleanup(work)
    if not ns.skip_limits:
        cmd = [sys.executable, str(B.BENCH / "bench_limits.py"), "--rounds", str(ns.limits_rounds)]
        failed += [] if subprocess.run(cmd).returncode == 0 else ["bench_limits.py"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
