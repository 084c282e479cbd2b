"""Shared helpers of the benchmark scripts: models and data, one run per subprocess, statistics,
Markdown tables and the machine description."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from mlx_xpo_plugin.loop.jsonio import dumps as strict_dumps

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DRIVER = BENCH / "_driver.py"


def cache_dir() -> Path:
    from mlx_xpo_plugin.commands.tiny import default_cache_dir

    return Path(os.environ.get("MLX_XPO_BENCH_CACHE") or default_cache_dir() / "bench")


def model_path(preset: str) -> str:
    """The embedded random-weight model of `preset` (built once, then reused)."""
    from mlx_xpo_plugin.commands.tiny import build_tiny_model

    return str(build_tiny_model(cache_dir() / f"model-{preset}", preset=preset, seed=0))


def data_path() -> str:
    """The embedded prompt set with train.jsonl only: no valid.jsonl, so neither trainer validates
    during the timed steps (upstream validates at step 1 and at the last step when it has one)."""
    from mlx_xpo_plugin.commands.tiny import write_prompt_dataset

    d = cache_dir() / "data-train-only"
    if not (d / "train.jsonl").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
        write_prompt_dataset(tmp)
        (tmp / "valid.jsonl").unlink()
        (tmp / "test.jsonl").unlink()
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    return str(d)


def shared_blas() -> str | None:
    """The BLAS both sides run MLX on: our start-up hook's choice (``MLX_XPO_BLAS``, the system's
    OpenBLAS, scipy-openblas32; ``MLX_XPO_BLAS=off`` measures MLX's bundled reference BLAS), loaded
    by _driver.py in both sides' processes since upstream runs without our hook."""
    import mlx  # noqa: F401  (bundled_reference_blas looks next to it)

    from mlx_xpo_plugin.cpu.fast_blas import bundled_reference_blas, choose

    return choose()[0] if bundled_reference_blas() else None


def env_for(impl: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLX_XPO_PLUGIN"}
    if impl == "upstream":
        env["MLX_XPO_PLUGIN"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_one(impl: str, mode: str, settings: dict, workdir: Path, timeout: float = 1800) -> dict:
    """One training run in a fresh interpreter (see _driver.py); returns its result dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(settings, adapter_path=str(workdir / "adapters"))
    spec, out, log = workdir / "spec.json", workdir / "result.json", workdir / "log.txt"
    spec.write_text(json.dumps({"impl": impl, "mode": mode, "settings": settings}))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, str(DRIVER), str(spec), str(out)],
            env=env_for(impl),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if p.returncode != 0 or not out.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{impl} {mode} run failed (status {p.returncode}); log {log}:\n{tail}")
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t0
    return res


def child_result(argv: list, label: str, timeout: float, env: dict | None = None) -> dict:
    """Run ``argv`` (a Python child that prints ``RESULT <json>``) in a scratch folder, passed as
    its last argument; the parsed JSON, or exit naming ``label`` with the child's stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([*argv, str(Path(tmp) / "run")], capture_output=True, text=True, env=env, timeout=timeout)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{label} failed: {r.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def cli_equivalent(impl: str, mode: str, settings: dict) -> str:
    """The command a user would type for the same run (settings in cfg.yaml)."""
    if impl == "ours":
        return f"mlx_lm_lora.train --train-mode {mode} --config cfg.yaml"
    flags = f" --max-completion-length {settings['max_completion_length']} --temperature {settings['temperature']}"
    return (
        f"MLX_XPO_PLUGIN=0 mlx_lm_lora.train --train-mode {mode} --config cfg.yaml{flags}"
        "   # upstream ignores these three keys in YAML; its default alpha [1e-5] is used (the "
        "flag --alpha cannot parse a number); on CPU it needs the device_info shim"
    )


# ------------------------------------------------------------------ statistics


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def quantile(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def linear_fit(xs, ys):
    """Least squares y = a + b x; returns (a, b, r2)."""
    n = len(xs)
    mx_, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx_) ** 2 for x in xs)
    sxy = sum((x - mx_) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx_
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, (1.0 - ss_res / ss_tot) if ss_tot else 1.0


def fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "–"
    return f"{x:.{nd}f}"


def with_range(d: dict, key: str, nd: int = 3, bold: bool = False) -> str:
    """``d[key] [d[key_min]–d[key_max]]``: a median with the spread of the run medians."""
    mid = f"**{fmt(d[key], nd)}**" if bold else fmt(d[key], nd)
    return f"{mid} [{fmt(d[key + '_min'], nd)}–{fmt(d[key + '_max'], nd)}]"


def md_table(header, rows) -> str:
    """A Markdown table; ``header`` is a list of titles or one string of them separated by " | "."""
    header = header.split(" | ") if isinstance(header, str) else header
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------ machine


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    def ver(p):
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": mem,
        "python": platform.python_version(),
        "mlx_device": str(mx.default_device()),
        "mlx": ver("mlx"),
        "mlx-lm": ver("mlx-lm"),
        "mlx-lm-lora": ver("mlx-lm-lora"),
        "mlx-xpo-plugin": ver("mlx-xpo-plugin"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "blas": shared_blas() or ("bundled reference BLAS" if sys.platform == "linux" else "as shipped"),
    }


def machine_line(m: dict) -> str:
    return (
        f"{m['cpu']} ({m['cpu_count']} cores, {m['ram_gib']} GiB), {m['mlx_device']}, {m['platform']}; "
        f"mlx {m['mlx']}, mlx-lm {m['mlx-lm']}, mlx-lm-lora {m['mlx-lm-lora']}, "
        f"mlx-xpo-plugin {m['mlx-xpo-plugin']}; "
        f"BLAS under MLX (both sides): {m.get('blas', 'not recorded')}; {m['date']}"
    )


def cleanup(work: Path) -> None:
    """Remove a run's temporary folder (adapters, specs, logs) unless MLX_XPO_BENCH_KEEP is set."""
    if os.environ.get("MLX_XPO_BENCH_KEEP"):
        print(f"kept the runs' folders (specs, logs, adapters) in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def grid_parser(doc: str, name: str, repeats_help: str, iters_help: str, quick_help: str):
    """The argument parser of the side-by-side scripts (bench_step.py, bench_trl.py): the grid of
    presets, modes and completion lengths, runs and steps, and the results file name."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--modes", default="xpo,online_dpo")
    ap.add_argument("--lengths", default="16,64")
    ap.add_argument("--repeats", type=int, default=None, help=repeats_help)
    ap.add_argument("--iters", type=int, default=None, help=iters_help)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--name", default=name, help="results file name (bench/results/NAME.json|md)")
    ap.add_argument("--render-only", action="store_true", help="rewrite NAME.md from NAME.json, run nothing")
    return ap


def grid(ns) -> tuple[list[str], list[str], list[int]]:
    """(presets, modes, lengths) from the arguments of grid_parser; --quick keeps the tiny preset
    and, unless --repeats says otherwise, 2 runs per side."""
    if ns.quick:
        ns.presets, ns.repeats = "tiny", ns.repeats or 2
    return (
        [p for p in ns.presets.split(",") if p],
        [m for m in ns.modes.split(",") if m],
        [int(x) for x in ns.lengths.split(",") if x],
    )


def rerender(name: str, render) -> None:
    """Rewrite results/NAME.md from results/NAME.json (--render-only)."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    (RESULTS / f"{name}.md").write_text(render(data).rstrip() + "\n")


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    j.write_text(strict_dumps(data, indent=1) + "\n")  # strict JSON: NaN -> null
    m.write_text(markdown.rstrip() + "\n")
    return j, m


# ------------------------------------------------------------------ the side-by-side scripts' driver
# (bench_step.py: ours vs upstream; bench_trl.py: ours vs TRL; bench_scaling.py uses session/finish)


def ours_settings(model: str, length: int, iters: int, judge: str, **extra) -> dict:
    """Our trainer's settings in every side-by-side run: LoRA, batch 2, the completion length,
    temperature 0.8, Adam 1e-5, seed 0, a report every step (the step timer), no saving, test or fuse."""
    return {
        "model": model,
        "data": data_path(),
        "train": True,
        "train_type": "lora",
        "judge": judge,
        "iters": iters,
        "batch_size": 2,
        "max_completion_length": length,
        "temperature": 0.8,
        "learning_rate": 1e-5,
        "steps_per_report": 1,
        "save_every": 100000,
        "seed": 0,
        "fuse": False,
        "test": False,
        **extra,
    }


def alternate(cell: dict, sides: tuple, repeats: int, run, summarize, raw: list, tag: str, describe) -> dict:
    """``repeats`` runs per side of one cell (preset, mode, completion length), alternating
    A B, B A, A B ... so that drift in the machine's load hits both sides alike. ``run(impl, r)``
    returns (result, extra fields of its raw record); each run's record goes to ``raw`` and one
    line, ``describe(summary)``, to the console. Returns {side: [summaries]}."""
    per = {side: [] for side in sides}
    for r in range(repeats):
        for impl in sides if r % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            res, extra = run(impl, r)
            summ = summarize(res)
            per[impl].append(summ)
            raw.append({**cell, "impl": impl, "repeat": r, "summary": summ, "result": res, **extra})
            print(
                f"[{tag}] {cell['preset']:5s} {cell['mode']:10s} len {cell['max_completion_length']:3d} {impl:8s} "
                f"#{r}: {describe(summ)} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return per


def compare(cell: dict, per: dict, sides: tuple, aggregate, **extra) -> dict:
    """A cell's record: each side's aggregate, and the step-time ratio first side / second side
    (of the medians, with the range of the per-repeat ratios)."""
    a, b = sides
    agg = {side: aggregate(per[side]) for side in sides}
    paired = [x["step_seconds"] / y["step_seconds"] for x, y in zip(per[a], per[b])]
    return {
        **cell,
        **extra,
        a: agg[a],
        b: agg[b],
        "time_ratio": agg[a]["step_seconds"] / agg[b]["step_seconds"],
        "time_ratio_min": min(paired),
        "time_ratio_max": max(paired),
    }


def with_method(lines: list, data: dict) -> str:
    """A results file's Markdown: ``lines``, then the method section."""
    return "\n".join([*lines, "### Method", "", data["method"], ""])


def cell_rows(cells: list, columns) -> list:
    """Table rows: a cell's preset, mode and completion length, then ``columns(cell)``."""
    return [[c["preset"], c["mode"], c["max_completion_length"], *columns(c)] for c in cells]


def session(benchmark: str) -> dict:
    """The start of a results file: the script, the machine, its load and the start time."""
    return {"benchmark": benchmark, "machine": machine(), "loadavg_before": loadavg(), "_t0": time.perf_counter()}


def header(data: dict, *more: str) -> list:
    """The first lines of a results table: the machine, ``more``, the load and the wall time."""
    return [
        f"Machine: {machine_line(data['machine'])}.",
        *more,
        f"Load average before/after: {data['loadavg_before']} / {data['loadavg_after']}; "
        f"script wall time {data['wall_seconds']:.0f} s.",
        "",
    ]


def finish(name: str, tag: str, data: dict, render, work: Path, show: bool = False) -> None:
    """Close a session: the load after and the wall time, results/NAME.json and .md written (the
    table printed too with ``show``), the runs' folder removed."""
    data["loadavg_after"] = loadavg()
    data["wall_seconds"] = time.perf_counter() - data.pop("_t0")
    md = render(data)
    j, m = write_results(name, data, md)
    if show:
        print("\n" + md)
    print(f"[{tag}] wrote {j} and {m} ({data['wall_seconds']:.0f} s)")
    cleanup(work)
