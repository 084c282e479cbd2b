"""Step time and peak RSS: our xpo / online_dpo (MLX, CPU) vs Hugging Face TRL 1.13.0 (PyTorch, CPU).

    python bench/bench_trl.py --setup          # only create bench/.trl-venv (torch 2.13.0 CPU, trl 1.13.0)
    python bench/bench_trl.py                  # tiny and small presets, completion lengths 16 and 64
    python bench/bench_trl.py --quick          # tiny preset only, 2 runs per side (a few minutes)
    python bench/bench_trl.py --presets small --lengths 64 --modes xpo --repeats 5

Optional: TRL runs in its own virtual environment, bench/.trl-venv (git-ignored, about 1.5 GB),
which this script creates on first use (``--setup`` does only that): torch==2.13.0 (on Linux from
the PyTorch CPU index, ``--torch-index ''`` to use only pip's configured indexes), trl==1.13.0 (the
last release with XPO, ``trl.experimental.xpo``), peft, and ``requests`` (TRL needs it but does not
declare it). TRL runs in bench/_trl_side.py; ours runs as in bench_step.py (bench/_driver.py).

Same on both sides: the weights (the embedded random-weight qwen2 of the preset; transformers loads
the folder as Qwen2ForCausalLM in fp32 as it is, no conversion), the prompts (train.jsonl, chat
template applied), batch size 2 prompts per step, completion length, temperature 0.8, seed 0, LoRA
rank 8 / scale 10 / dropout 0 on all linear layers of every block, Adam at 1e-5 (TRL: adamw_torch,
weight decay 0, constant schedule, no gradient clipping, as ours), beta 0.1, alpha 1e-5 (xpo), no
gradient checkpointing, no evaluation, no saving, a report every step. TRL gets 2 torch threads.
xpo runs our ``xpo_bonus: paper`` (TRL's formulation: one policy and one reference sample,
``L_DPO + alpha * log pi(y_ref)``); ``--xpo-bonus kl`` runs our default form instead.
Preference signal: ours a pointwise reward function, ``judge: mlx_xpo_plugin.rules:letter_e_reward``;
TRL online_dpo the same function (TRL accepts reward functions there); TRL xpo a tiny random-weight
Qwen2ForSequenceClassification (its XPOTrainer accepts only a reward model). Every run is a fresh
process; the sides alternate (ours, trl, trl, ours, ...); step 1 of every run is warm-up.

Output: bench/results/trl.json (every run, every step) and bench/results/trl.md (table).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as B  # noqa: E402

VENV = B.BENCH / ".trl-venv"
VENV_PY = VENV / "bin" / "python"
TRL_SIDE = B.BENCH / "_trl_side.py"
TORCH = "torch==2.13.0"
TRL_REQS = ["trl==1.13.0", "transformers==5.23.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0", "requests"]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
JUDGE = "mlx_xpo_plugin.rules:letter_e_reward"
THREADS = 2
DEFAULTS = {"tiny": (4, 8), "small": (4, 8)}  # (runs per side: even, so ABBA is balanced; steps per run)


# ------------------------------------------------------------------ TRL virtual environment


def venv_versions() -> dict | None:
    """Versions in bench/.trl-venv, or None when it is missing or incomplete."""
    if not VENV_PY.exists():
        return None
    code = (
        "import json, torch, transformers, trl, peft, accelerate, requests; print(json.dumps({"
        "'torch': torch.__version__, 'transformers': transformers.__version__, 'trl': trl.__version__, "
        "'peft': peft.__version__, 'accelerate': accelerate.__version__}))"
    )
    p = subprocess.run([str(VENV_PY), "-c", code], capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None


def ok(versions: dict | None) -> bool:
    return bool(versions) and versions["torch"].split("+")[0] == "2.13.0" and versions["trl"] == "1.13.0"


def pip(*args: str) -> None:
    cmd = [str(VENV_PY), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("[bench_trl] $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_venv(torch_index: str) -> dict:
    """Create bench/.trl-venv with torch 2.13.0 (CPU) and trl 1.13.0 unless it is already there."""
    versions = venv_versions()
    if ok(versions):
        return versions
    print(f"[bench_trl] setting up {VENV} (torch 2.13.0 CPU, trl 1.13.0; about 1.5 GB) ...", flush=True)
    if not VENV_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip(TORCH, *(["--extra-index-url", torch_index] if torch_index else []))
    pip(TORCH, *TRL_REQS)  # torch pinned again: no dependency may swap it for another build
    versions = venv_versions()
    if not ok(versions):
        raise SystemExit(f"[bench_trl] {VENV} is not usable after the install: {versions}")
    print(f"[bench_trl] ready: {versions}", flush=True)
    return versions


# ------------------------------------------------------------------ one run per side


def lora_defaults() -> dict:
    from mlx_xpo_plugin import config as C

    return dict(C.SETTINGS["lora_parameters"].default)


def rules_path() -> str:
    """rules.py by path: the TRL venv does not have our package (or MLX); rules.py imports neither."""
    from mlx_xpo_plugin import rules

    return str(Path(rules.__file__).resolve())


def ours_settings(mode: str, model: str, length: int, iters: int, xpo_bonus: str, judge: str = JUDGE) -> dict:
    s = B.ours_settings(model, length, iters, judge, beta=0.1, grad_checkpoint=False)
    if mode == "xpo":
        s.update(alpha=1e-5, xpo_bonus=xpo_bonus)
    return s


#: what TRL's side takes from our settings, so that both sides run the same values
SHARED = (
    "model",
    "data",
    "iters",
    "batch_size",
    "max_completion_length",
    "temperature",
    "learning_rate",
    "beta",
    "seed",
)


def trl_spec(mode: str, model: str, length: int, iters: int, workdir: Path) -> dict:
    ours = ours_settings("xpo", model, length, iters, "paper")
    return {
        "mode": mode,
        **{k: ours[k] for k in SHARED},
        "alpha": ours["alpha"],
        "threads": THREADS,
        "lora": lora_defaults(),
        "rules": rules_path(),
        "output_dir": str(workdir / "trainer"),
    }


def trl_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRL_EXPERIMENTAL_SILENCE="1",
    )
    return env


def run_trl(spec: dict, workdir: Path, timeout: float = 1800) -> dict:
    """One TRL run in the TRL venv (bench/_trl_side.py); returns its result dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    sp, out, log = workdir / "spec.json", workdir / "result.json", workdir / "log.txt"
    sp.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(
            [str(VENV_PY), str(TRL_SIDE), str(sp), str(out)],
            env=trl_env(),
            cwd=workdir,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"trl {spec['mode']} run failed (status {p.returncode}); log {log}:\n{log.read_text()[-3000:]}"
        )
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t0
    return res


def summarize(res: dict) -> dict:
    """A run's median step time (steps >= 2), its preference-signal seconds, tokens and peak RSS."""
    steps = [r for r in res["steps"] if r.get("iteration", 0) > 1]
    signal = "time/judge" if res["impl"] == "ours" else "reward_seconds"
    return {
        "step_seconds": B.median([r.get("wall_seconds") for r in steps]),
        "step_seconds_all": [r.get("wall_seconds") for r in steps],
        "signal_seconds": B.median([r.get(signal) for r in steps]),
        "peak_rss_mb": res["peak_rss_mb"],
        "rss_after_imports_mb": res["rss_after_imports_mb"],
        "completion_tokens": res["completion_tokens"],
        "process_seconds": res.get("process_seconds"),
    }


def aggregate(runs: list[dict]) -> dict:
    med = [r["step_seconds"] for r in runs]
    return {
        "runs": len(runs),
        "step_seconds": B.median(med),
        "step_seconds_min": min(med),
        "step_seconds_max": max(med),
        "signal_seconds": B.median([r["signal_seconds"] for r in runs]),
        "peak_rss_mb": B.median([r["peak_rss_mb"] for r in runs]),
        "rss_after_imports_mb": B.median([r["rss_after_imports_mb"] for r in runs]),
        "completion_tokens_mean": B.median([r["completion_tokens"]["mean"] for r in runs]),
        "completion_tokens_max": max(r["completion_tokens"]["max"] or 0 for r in runs),
    }


SIDES = ("ours", "trl")


def run_cell(preset, mode, length, repeats, iters, xpo_bonus, work, raw) -> dict:
    """One (preset, mode, length): `repeats` runs per side, alternating ours/trl/trl/ours."""
    model = B.model_path(preset)
    cell = {"preset": preset, "mode": mode, "max_completion_length": length}

    def run(impl, r):
        wd = work / f"{preset}-{mode}-{length}-{impl}-{r}"
        if impl == "ours":
            return B.run_one("ours", mode, ours_settings(mode, model, length, iters, xpo_bonus), wd), {}
        return run_trl(trl_spec(mode, model, length, iters, wd), wd), {}

    def line(summ):
        return f"{summ['step_seconds']:.3f} s/step, peak RSS {summ['peak_rss_mb']:.0f} MB"

    per = B.alternate(cell, SIDES, repeats, run, summarize, raw, "bench_trl", line)
    c = B.compare(cell, per, SIDES, aggregate, repeats=repeats, iters=iters)
    c["rss_ratio"] = c["ours"]["peak_rss_mb"] / c["trl"]["peak_rss_mb"]
    return c


# ------------------------------------------------------------------ report


def signal_name(mode: str) -> str:
    return "tiny reward model" if mode == "xpo" else "letter_e_reward"


def columns(c: dict) -> list:
    o, t = c["ours"], c["trl"]
    return [
        B.with_range(o, "step_seconds"),
        B.with_range(t, "step_seconds"),
        B.with_range(c, "time_ratio", 2, bold=True),
        "yes" if c["time_ratio"] <= 1.0 else "no",
        B.fmt(o["peak_rss_mb"], 0),
        B.fmt(t["peak_rss_mb"], 0),
        f"{B.fmt(1000 * o['signal_seconds'], 1)} / {B.fmt(1000 * t['signal_seconds'], 1)} ({signal_name(c['mode'])})",
        f"{B.fmt(o['completion_tokens_mean'], 1)} / {B.fmt(t['completion_tokens_mean'], 1)}",
    ]


def render(data: dict) -> str:
    v = data["trl_versions"]
    lines = B.header(
        data,
        f"TRL side: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, "
        f"accelerate {v['accelerate']}; BLAS {data.get('trl_blas', '?')}; {THREADS} torch threads, fp32.",
    )
    rows = B.cell_rows(data["configs"], columns)
    lines += [
        "### Step time (seconds per optimizer step; median of per-run medians [min–max over runs])",
        "",
        B.md_table(
            (
                "preset | mode | completion len | ours | TRL | ours / TRL | ≤ 1.0 | ours peak RSS MB | "
                "TRL peak RSS MB | judge / reward ms per step, ours / TRL (TRL's signal) | "
                "tokens/completion, ours / TRL"
            ),
            rows,
        ),
        "",
    ]
    return B.with_method(lines, data)


METHOD = (
    "Ours: mlx-xpo-plugin on MLX (CPU), run through `mlx_xpo_plugin.api.train_method` in a fresh process "
    "(`bench/_driver.py`), judge `mlx_xpo_plugin.rules:letter_e_reward` (pointwise reward function){bonus}. "
    "TRL: `trl.experimental.xpo.XPOTrainer` / `trl.experimental.online_dpo.OnlineDPOTrainer` 1.13.0 on "
    "PyTorch CPU in its own virtual environment (`bench/_trl_side.py`), the same model folder loaded with "
    "`AutoModelForCausalLM` in fp32 (no conversion: same weights, same tokenizer, same chat template), "
    "conversational prompts so that the chat template applies, a PEFT `LoraConfig` matching ours (r 8, "
    "lora_alpha 80 = scale 10, dropout 0, q/k/v/o/gate/up/down projections), `adamw_torch` with weight "
    "decay 0 (= Adam), constant learning rate, `max_grad_norm` 0 (ours does not clip), "
    "`torch.set_num_threads({threads})`, no gradient checkpointing, `logging_steps` 1, no eval, no saving, "
    "`report_to` none. Preference signal: TRL's online_dpo gets the same `letter_e_reward` function (TRL "
    "accepts reward functions there); TRL's XPOTrainer scores only with a sequence-classification model "
    "(`get_reward`), so it gets a tiny random-weight `Qwen2ForSequenceClassification` (hidden 64, 2 layers, "
    "1 label, the policy's vocabulary); the signal column shows its cost (timed from outside), next to "
    "our judge time. Both sides: batch 2 prompts per step (2 completions each), the completion length of "
    "the row, temperature 0.8, seed 0, Adam 1e-5, beta 0.1, alpha 1e-5 (xpo). Each cell runs {iters_text}, "
    "alternating ours/TRL (ABBA…) so that drift in machine load hits both; every run is a fresh process. "
    "Step time = wall clock between consecutive per-step callbacks (ours: the `TrainingCallback` with "
    "`steps_per_report: 1`; TRL: a `TrainerCallback.on_step_end`), i.e. one whole loop iteration including "
    "logging; step 1 (warm-up) is not counted. A run's value is the median of its steps; the table shows "
    "the median over runs with the min–max of the run medians; the ratio is median(ours)/median(TRL), in "
    "brackets the range of the paired per-repeat ratios. Peak RSS = the process's `VmHWM` at the end "
    "(median over runs; TRL's includes PyTorch and transformers, ~{trl_base:.0f} MB right after the "
    "imports, ours ~{ours_base:.0f} MB). Tokens/completion = generated tokens per completion (mean), "
    "to check that both sides generate as many tokens."
)


def method_text(configs, presets, ns) -> str:
    iters_text = "; ".join(
        f"{p}: {ns.repeats or DEFAULTS[p][0]} runs per side of {ns.iters or DEFAULTS[p][1]} steps" for p in presets
    )
    bonus = f"; xpo with `xpo_bonus: {ns.xpo_bonus}`" + (
        " (TRL's formulation)" if ns.xpo_bonus == "paper" else " (our default, not TRL's formulation)"
    )
    return METHOD.format(
        bonus=bonus,
        threads=THREADS,
        iters_text=iters_text,
        trl_base=B.median([c["trl"]["rss_after_imports_mb"] for c in configs]),
        ours_base=B.median([c["ours"]["rss_after_imports_mb"] for c in configs]),
    )


#: help of --repeats, --iters and --quick
GRID_HELP = (
    "runs per side (default 4)",
    "steps per run (default 8; step 1 is warm-up)",
    "tiny preset only, 2 runs per side",
)


def main(argv=None) -> int:
    ap = B.grid_parser(__doc__, "trl", *GRID_HELP)
    ap.add_argument(
        "--xpo-bonus",
        default="paper",
        choices=("paper", "kl"),
        help="our xpo form: paper = TRL's (default), kl = our default",
    )
    ap.add_argument("--setup", action="store_true", help="only create bench/.trl-venv, run nothing")
    ap.add_argument(
        "--torch-index",
        default=CPU_INDEX if platform.system() == "Linux" else "",
        help="extra index for the torch CPU build ('' = pip's configured indexes only)",
    )
    ns = ap.parse_args(argv)
    if ns.render_only:
        B.rerender(ns.name, render)
        return 0
    versions = ensure_venv(ns.torch_index)
    if ns.setup:
        return 0
    presets, modes, lengths = B.grid(ns)
    data = B.session("bench_trl")
    work = Path(tempfile.mkdtemp(prefix="mlx-xpo-bench-trl-"))
    configs, raw = [], []
    for preset in presets:
        repeats, iters = ns.repeats or DEFAULTS[preset][0], ns.iters or DEFAULTS[preset][1]
        for length in lengths:
            for mode in modes:
                configs.append(run_cell(preset, mode, length, repeats, iters, ns.xpo_bonus, work, raw))
    data.update(
        trl_versions=versions,
        trl_blas=next((r["result"].get("torch_blas") for r in raw if r["impl"] == "trl"), None),
        method=method_text(configs, presets, ns),
        xpo_bonus=ns.xpo_bonus,
        threads=THREADS,
        targets={"time_ratio": 1.0},
        configs=configs,
        runs=raw,
    )
    B.finish(ns.name, "bench_trl", data, render, work, show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
