"""Step time and peak memory: our xpo / online_dpo vs upstream mlx-lm-lora's built-in modes.

    python bench/bench_step.py                 # tiny and small presets, completion lengths 16 and 64
    python bench/bench_step.py --quick         # tiny preset only, 2 repeats (a couple of minutes)
    python bench/bench_step.py --presets tiny --lengths 64 --repeats 5

Both sides get the same model (the embedded random-weight qwen2 of the preset), the same prompts,
batch size 2, completion length, sampling temperature 0.8, seed 0, LoRA (rank 8, all layers),
Adam at 1e-5, the same judge model (the policy's own base model as an LLM judge: ``judge: <path>``
on both sides) and, for xpo, alpha 1e-5. Every run is a fresh process (bench/_driver.py); the two
implementations alternate (ours, upstream, upstream, ours, ...) so that drift in machine load hits
both alike. Step 1 of every run is warm-up and is not counted.

Output: bench/results/step.json (every run, every step) and bench/results/step.md (tables).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402

SIDES = ("ours", "upstream")
PHASES = ("rollout", "judge", "reference", "policy", "optimizer", "other")
CMP = ("rollout", "judge", "scoring", "rest")


def settings_for(impl: str, mode: str, preset: str, length: int, iters: int) -> dict:
    model = B.model_path(preset)
    s = B.ours_settings(model, length, iters, judge=model)  # the model itself as the LLM judge
    if mode == "xpo":
        s["alpha"] = [1e-5] if impl == "upstream" else 1e-5
    return s


def summarize(res: dict, warmup: int) -> dict:
    steps = [r for r in res["steps"] if r.get("iteration", 0) > warmup]
    wall = [r["wall_seconds"] for r in steps if r.get("wall_seconds") is not None]
    out = {
        "measured_steps": len(wall),
        "step_seconds": B.median(wall),
        "step_seconds_all": wall,
        "own_step_seconds": B.median([r.get("own_step_seconds") for r in steps]),
        # step 1 is left out: upstream's first window also covers model loading
        "mx_peak_mb": max(r["mx_peak_bytes"] for r in res["steps"] if r.get("iteration", 0) > 1) / 1e6,
        "mx_active_mb": B.median([r.get("mx_active_bytes") for r in res["steps"] if r.get("iteration", 0) > 1]) / 1e6,
        "peak_rss_mb": res["peak_rss_mb"],
        "rss_after_imports_mb": res["rss_after_imports_mb"],
        "rss_above_imports_mb": res["peak_rss_mb"] - res["rss_after_imports_mb"],
        "completion_tokens": res["completion_tokens"],
        "process_seconds": res.get("process_seconds"),
        "first_report_after_seconds": res.get("first_report_after_seconds"),
    }
    rows_ = sum(r.get("bench/scored_rows", 0) for r in steps)
    out["scored_tokens_per_row"] = sum(r.get("bench/scored_tokens", 0) for r in steps) / rows_ if rows_ else None
    if res["impl"] == "ours":
        fr = {p: [] for p in PHASES}
        secs = {p: [] for p in PHASES}
        outside = []
        for r in steps:
            st = r.get("step_seconds")
            if not st:
                continue
            for p in PHASES:
                v = r.get(f"time/{p}", 0.0) or 0.0
                fr[p].append(v / st)
                secs[p].append(v)
            if r.get("wall_seconds"):
                outside.append((r["wall_seconds"] - st) / r["wall_seconds"])
        out["phase_fraction"] = {p: sum(v) / len(v) if v else None for p, v in fr.items()}
        out["phase_seconds"] = {p: B.median(v) for p, v in secs.items()}
        out["outside_step_timer_fraction"] = sum(outside) / len(outside) if outside else None
        out["judge_invalid"] = sum(r.get("judge/invalid", 0) or 0 for r in res["steps"])
        out["judge_ties"] = sum(r.get("judge/ties", 0) or 0 for r in res["steps"])
        out["judge_pairs"] = sum(r.get("judge/pairs", 0) or 0 for r in res["steps"])
        out["cmp_seconds"] = {
            "rollout": out["phase_seconds"]["rollout"],
            "judge": out["phase_seconds"]["judge"],
            "scoring": B.median([(r.get("time/reference", 0) or 0) + (r.get("time/policy", 0) or 0) for r in steps]),
            "rest": B.median(
                [
                    r["wall_seconds"]
                    - sum(r.get(f"time/{p}", 0) or 0 for p in ("rollout", "judge", "reference", "policy"))
                    for r in steps
                    if r.get("wall_seconds")
                ]
            ),
        }
    else:
        out["upstream_judge_answers"] = res.get("upstream_judge_answers")
        out["cmp_seconds"] = {
            "rollout": B.median([r.get("bench/rollout", 0) for r in steps]),
            "judge": B.median([r.get("bench/judge", 0) for r in steps]),
            "scoring": B.median([r.get("bench/scoring", 0) for r in steps]),
            "rest": B.median(
                [
                    r["wall_seconds"] - sum(r.get(f"bench/{p}", 0) for p in ("rollout", "judge", "scoring"))
                    for r in steps
                    if r.get("wall_seconds")
                ]
            ),
        }
    return out


def aggregate(runs: list[dict]) -> dict:
    meds = [r["step_seconds"] for r in runs]
    pooled = [x for r in runs for x in r["step_seconds_all"]]
    agg = {
        "step_seconds": B.median(meds),
        "step_seconds_min": min(meds),
        "step_seconds_max": max(meds),
        "step_seconds_p25": B.quantile(pooled, 0.25),
        "step_seconds_p75": B.quantile(pooled, 0.75),
        "own_step_seconds": B.median([r["own_step_seconds"] for r in runs]),
        "mx_peak_mb": B.median([r["mx_peak_mb"] for r in runs]),
        "mx_active_mb": B.median([r["mx_active_mb"] for r in runs]),
        "peak_rss_mb": B.median([r["peak_rss_mb"] for r in runs]),
        "rss_above_imports_mb": B.median([r["rss_above_imports_mb"] for r in runs]),
        "completion_tokens_max": max(r["completion_tokens"]["max"] or 0 for r in runs),
        "completion_tokens_mean": B.median([r["completion_tokens"]["mean"] for r in runs]),
        "measured_steps": sum(r["measured_steps"] for r in runs),
        "scored_tokens_per_row": B.median([r["scored_tokens_per_row"] for r in runs]),
        "cmp_seconds": {k: B.median([r["cmp_seconds"][k] for r in runs]) for k in CMP},
    }
    if "phase_fraction" in runs[0]:
        agg["phase_fraction"] = {p: sum(r["phase_fraction"][p] for r in runs) / len(runs) for p in PHASES}
        agg["phase_seconds"] = {p: B.median([r["phase_seconds"][p] for r in runs]) for p in PHASES}
        agg["outside_step_timer_fraction"] = B.median([r["outside_step_timer_fraction"] for r in runs])
        agg["judge_invalid"] = sum(r["judge_invalid"] for r in runs)
        agg["judge_ties"] = sum(r["judge_ties"] for r in runs)
        agg["judge_pairs"] = sum(r["judge_pairs"] for r in runs)
    else:
        ans = [r["upstream_judge_answers"] for r in runs if r.get("upstream_judge_answers")]
        agg["upstream_judge_answers"] = {k: sum(a[k] for a in ans) for k in ("0", "1", "invalid")} if ans else None
    return agg


def memory_columns(c: dict) -> list:
    o, u = c["ours"], c["upstream"]
    return [
        B.fmt(o["mx_peak_mb"], 1),
        B.fmt(u["mx_peak_mb"], 1),
        f"**{B.fmt(c['mx_peak_ratio'], 2)}**",
        f"{B.fmt(o['mx_active_mb'], 1)} / {B.fmt(u['mx_active_mb'], 1)}",
        f"{B.fmt(o['peak_rss_mb'], 0)} ({B.fmt(o['rss_above_imports_mb'], 0)})",
        f"{B.fmt(u['peak_rss_mb'], 0)} ({B.fmt(u['rss_above_imports_mb'], 0)})",
        B.fmt(c["rss_ratio"], 2),
        B.fmt(c["rss_above_imports_ratio"], 2),
        "yes" if c["mx_peak_ratio"] <= 0.6 else "no",
    ]


def phase_columns(c: dict) -> list:
    o = c["ours"]
    f, s = o["phase_fraction"], o["phase_seconds"]
    return (
        [B.fmt(o["own_step_seconds"])]
        + [f"{100 * f[p]:.1f}% ({B.fmt(s[p], 3)})" for p in PHASES]
        + ["yes" if f["other"] < 0.10 else "no", f"{100 * (o['outside_step_timer_fraction'] or 0):.1f}%"]
    )


def difference_columns(c: dict) -> list:
    o, u = c["ours"]["cmp_seconds"], c["upstream"]["cmp_seconds"]
    cells = []
    for k in CMP:
        r = (o[k] / u[k]) if o.get(k) is not None and u.get(k) else None
        cells.append(f"{B.fmt(o[k])} / {B.fmt(u[k])} ({B.fmt(r, 2)})")
    ot, ut = c["ours"]["scored_tokens_per_row"], c["upstream"]["scored_tokens_per_row"]
    per_tok = None
    if ot and ut and o.get("scoring") and u.get("scoring"):
        per_tok = (o["scoring"] / ot) / (u["scoring"] / ut)
    est = None
    if ot and ut and u.get("scoring") is not None:
        up_same = c["upstream"]["step_seconds"] + u["scoring"] * (ot / ut - 1.0)
        est = c["ours"]["step_seconds"] / up_same
    return cells + [f"{B.fmt(ot, 0)} / {B.fmt(ut, 0)}", B.fmt(per_tok, 2), B.fmt(est, 2)]


def check_columns(c: dict) -> list:
    o, u = c["ours"], c["upstream"]
    ans = u.get("upstream_judge_answers") or {}
    n = sum(ans.values()) if ans else 0
    return [
        f"{B.fmt(o['completion_tokens_mean'], 1)} / {o['completion_tokens_max']}",
        f"{B.fmt(u['completion_tokens_mean'], 1)} / {u['completion_tokens_max']}",
        B.fmt(o["own_step_seconds"]),
        B.fmt(u["own_step_seconds"]),
        f"{o.get('judge_invalid', 0):.0f} invalid, {o.get('judge_ties', 0):.0f} ties of {o.get('judge_pairs', 0):.0f}",
        f"{ans.get('invalid', 0)} of {n} not '0'/'1'",
    ]


def render(data: dict) -> str:
    cfgs = data["configs"]
    lines = B.header(data)
    rows = B.cell_rows(
        cfgs,
        lambda c: [
            B.with_range(c["ours"], "step_seconds"),
            B.with_range(c["upstream"], "step_seconds"),
            B.with_range(c, "time_ratio", 2, bold=True),
            "yes" if c["time_ratio"] <= 0.5 else "no",
        ],
    )
    lines += [
        "### Step time (seconds per optimizer step; median of per-run medians [min–max over runs])",
        "",
        B.md_table(["preset", "mode", "completion len", "ours", "upstream", "ours / upstream", "≤ 0.5×"], rows),
        "",
    ]
    rows = B.cell_rows(cfgs, memory_columns)
    lines += [
        "### Peak memory (MB; LoRA; medians over runs)",
        "",
        "MLX peak = largest per-step `mx.get_peak_memory()` (steps ≥ 2). Resident = `mx.get_active_memory()` "
        "between steps (weights of every model copy, adapters, optimizer state). Peak RSS = the process's "
        "`VmHWM`; in brackets the part above the RSS right after the imports (interpreter + libraries, "
        f"~{B.fmt(B.median([c['ours']['peak_rss_mb'] - c['ours']['rss_above_imports_mb'] for c in cfgs]), 0)} MB).",
        "",
        B.md_table(
            (
                "preset | mode | completion len | ours MLX peak | upstream MLX peak | MLX ratio | "
                "resident between steps, ours / upstream | ours peak RSS (above imports) | "
                "upstream peak RSS (above imports) | RSS ratio | RSS-above-imports ratio | MLX ≤ 0.6×"
            ),
            rows,
        ),
        "",
    ]
    rows = B.cell_rows(cfgs, phase_columns)
    lines += [
        "### Where our step goes (share of `step_seconds`, mean over measured steps; median seconds in brackets)",
        "",
        "rollout = sampling both completions, judge = the LLM judge, reference = reference log-probs, "
        "policy = policy forward + backward, optimizer = Adam update, other = everything else inside the "
        "step (batch selection, packing, metrics). The last column is the loop outside the step timer "
        "(reporting, metrics.jsonl, completions.jsonl, progress bar), as a share of the wall time per step.",
        "",
        B.md_table(["preset", "mode", "len", "step s"] + list(PHASES) + ["other < 10%", "outside timer"], rows),
        "",
    ]
    rows = B.cell_rows(cfgs, difference_columns)
    lines += [
        "### Where the difference comes from (median seconds per step, ours / upstream (ratio))",
        "",
        "Upstream has no phase timers, so its phases are timed from outside its functions "
        "(`generate_for_online_dpo`, `LLMPairwiseJudge.judge`, `_preference_microbatches` = reference "
        "+ policy forward/backward); ours: `time/rollout`, `time/judge`, `time/reference + time/policy`. "
        'rest = wall time per step minus those (optimizer, bookkeeping, logging). "scored tokens/row" is '
        "the tokens per scored row (prompt + completion): ours scores the sampled token ids, upstream "
        "re-tokenises the decoded text, which for a random-weight model's output gives a different length "
        '(a trained model\'s text re-encodes to about the sampled length). "per token" = ours/upstream '
        "scoring seconds per scored token; the last column is an estimate, not a measurement: the step "
        "ratio if upstream's scoring phase had processed as many tokens per row as ours (its scoring "
        "time scaled by the token ratio).",
        "",
        B.md_table(
            (
                "preset | mode | len | rollout | judge | scoring (ref + policy) | rest | "
                "scored tokens/row | scoring per token | step ratio at equal tokens (est.)"
            ),
            rows,
        ),
        "",
    ]
    rows = B.cell_rows(cfgs, check_columns)
    lines += [
        "### Checks",
        "",
        "Generated tokens per completion (mean / max; both must stay ≤ the completion length, which "
        "shows that upstream's `--max-completion-length` does limit generation), each trainer's own "
        "step timer (ours `step_seconds`, upstream `1 / iterations_per_second`) next to the wall-clock "
        "medians above, and the judges' verdicts (the random-weight judge rarely answers a clean digit: "
        'upstream then treats the answer as "the second completion wins", ours scores label '
        "log-probabilities, so it always has a verdict unless the two labels tie).",
        "",
        B.md_table(
            (
                "preset | mode | len | ours tokens | upstream tokens | ours own timer s | "
                "upstream own timer s | ours judge | upstream judge"
            ),
            rows,
        ),
        "",
    ]
    return B.with_method(lines, data)


METHOD = (
    "Each (preset, mode, completion length) runs several times per implementation, every run in a fresh "
    "process (`bench/_driver.py`), alternating ours/upstream (ABBA…) so that drift in machine load hits both; "
    "{iters_text}; step 1 is warm-up and not counted. Step time = wall clock between two consecutive "
    "per-step reports (`steps_per_report: 1`, the `TrainingCallback` both trainers call), i.e. a whole loop "
    "iteration; each implementation's own step timer agrees (checks table). A run's value is the median of "
    "its steps; the table shows the median over runs and the min–max of the run medians; the ratio is "
    "median(ours)/median(upstream), in brackets the range of the paired per-repeat ratios. "
    "Same settings on both sides: model, prompts (train.jsonl only: no validation during the timed steps), "
    "batch size 2, completion length, temperature 0.8, seed 0, LoRA rank 8 on all layers, Adam 1e-5, "
    "alpha 1e-5 (xpo), the same model as LLM judge (`judge: <model path>`), default reference (ours: the "
    "base with adapters off; upstream: a second copy of the model; the judge is a separate copy on both "
    "sides). Upstream runs in-process through `mlx_lm_lora.train.run` with its arguments merged as its "
    "`main` merges command-line flags (YAML `alpha`/`temperature`/`max_completion_length` would be "
    "ignored by upstream), and with `mx.device_info()` given the `max_recommended_working_set_size` key "
    "it reads on CPU (shim inside the benchmark process only). Ours runs through "
    "`mlx_xpo_plugin.api.train_method`, the same `runner.run` the CLI uses."
)


#: help of --repeats, --iters and --quick
GRID_HELP = ("runs per implementation (default 3)", "steps per run (default 6)", "tiny preset only, 2 repeats")


def main(argv=None) -> int:
    ap = B.grid_parser(__doc__, "step", *GRID_HELP)
    ns = ap.parse_args(argv)
    if ns.render_only:
        B.rerender(ns.name, render)
        return 0
    presets, modes, lengths = B.grid(ns)
    defaults = {"tiny": (3, 6), "small": (3, 6)}
    data = B.session("bench_step")
    work = Path(tempfile.mkdtemp(prefix="mlx-xpo-bench-step-"))
    configs, raw = [], []
    for preset in presets:
        repeats = ns.repeats or defaults.get(preset, (2, 4))[0]
        iters = ns.iters or defaults.get(preset, (2, 4))[1]
        for length in lengths:
            for mode in modes:
                cell = {"preset": preset, "mode": mode, "max_completion_length": length}

                def run(impl, r):
                    s = settings_for(impl, mode, preset, length, iters)
                    res = B.run_one(impl, mode, s, work / f"{preset}-{mode}-{length}-{impl}-{r}")
                    return res, {"cli": B.cli_equivalent(impl, mode, s)}

                per = B.alternate(
                    cell, SIDES, repeats, run, lambda res: summarize(res, warmup=1), raw, "bench_step", _line
                )
                c = B.compare(cell, per, SIDES, aggregate, repeats=repeats, iters=iters)
                o, u = c["ours"], c["upstream"]
                c["mx_peak_ratio"] = o["mx_peak_mb"] / u["mx_peak_mb"]
                c["rss_ratio"] = o["peak_rss_mb"] / u["peak_rss_mb"]
                c["rss_above_imports_ratio"] = o["rss_above_imports_mb"] / u["rss_above_imports_mb"]
                configs.append(c)
    iters_text = ", ".join(
        f"{p}: {ns.iters or defaults.get(p, (2, 4))[1]} steps per run, "
        f"{ns.repeats or defaults.get(p, (2, 4))[0]} runs per side"
        for p in presets
    )
    data.update(
        method=METHOD.format(iters_text=iters_text),
        targets={"time_ratio": 0.5, "mx_peak_ratio": 0.6, "other_fraction": 0.10},
        configs=configs,
        runs=raw,
    )
    B.finish(ns.name, "bench_step", data, render, work)
    return 0


def _line(summ: dict) -> str:
    return (
        f"{summ['step_seconds']:.3f} s/step, MLX peak {summ['mx_peak_mb']:.1f} MB, "
        f"peak RSS {summ['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    sys.exit(main())
