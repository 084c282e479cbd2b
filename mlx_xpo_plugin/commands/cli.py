"""mlx-xpo: helper commands around the xpo and online_dpo train modes of mlx-lm-lora.

mlx-xpo demo       offline XPO demo on an embedded tiny model and prompt set (5-15 s)
mlx-xpo eval       win-rate of trained adapters against the reference on test.jsonl, with its 95% interval
mlx-xpo plot       PNG of a run's training curves (<adapter_path>/training.png)
mlx-xpo schema     JSON Schema of the YAML settings (or --markdown for the settings table)
mlx-xpo estimate   seconds per step by phase and for the whole run, before a run (--config xpo.yaml)

Training itself: mlx_lm_lora.train --train-mode xpo --config xpo.yaml (see README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlx_xpo_plugin.commands.estimate import add_parser as add_estimate
from mlx_xpo_plugin.commands.hints import command
from mlx_xpo_plugin.cpu.fast_blas import request
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.loop.win_rate import describe, interval


def _console(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def demo_model_line(cache: Path) -> str:
    """What the demo says about its model: built now, or reused from ``cache``."""
    if (cache / "demo-model" / "config.json").exists():  # written last by build_tiny_model
        return f"[demo] using the embedded tiny model and prompts cached under {cache}"
    return f"[demo] building the embedded tiny model and prompts under {cache} (once; later runs reuse them) ..."


def demo(ns) -> int:
    from mlx_xpo_plugin.commands.tiny import build_tiny_model, default_cache_dir, write_prompt_dataset

    cache = Path(ns.cache or default_cache_dir())
    t0 = time.time()
    print(demo_model_line(cache))
    model = build_tiny_model(cache / "demo-model", preset="tiny", seed=0)
    data = write_prompt_dataset(cache / "demo-data")
    out = Path(ns.output).resolve()
    cfg = {
        "model": str(model),
        "data": str(data),
        "train": True,
        "train_type": "lora",
        "adapter_path": str(out),
        "start_over": True,  # a demo run moves the previous one's files to <output>.<date-time>
        "judge": "mlx_xpo_plugin.rules:prefer_letter_e",
        "iters": ns.iters,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "alpha": [1e-4, 1e-5],
        "max_completion_length": 16,
        "max_seq_length": 256,
        "temperature": 1.0,
        "steps_per_report": 5,
        "steps_per_eval": max(5, ns.iters // 2),
        "val_batches": -1,
        "save_every": ns.iters,
        "seed": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "demo_xpo.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [_console("mlx_lm_lora.train"), "--train-mode", "xpo", "--config", str(cfg_path)]
    print("[demo] running:", " ".join([command("mlx_lm_lora.train"), *cmd[1:]]))
    env = {**os.environ, "MLX_XPO_VERBOSE": "1"} if ns.verbose else None  # see runner.verbose
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"[demo] training exited with status {rc}", file=sys.stderr)
        return rc
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in rows if "val_wins" in r]
    # the run itself printed where the adapters, metrics and samples are: not said twice
    print(f"\n[demo] done in {time.time() - t0:.0f} s.")
    if val:
        print("  win-rate of the policy against the reference (the judge prefers more letter 'e'):")
        for r in val:
            when = " (untrained)" if r["step"] == 0 else ""
            print(f"    step {r['step']:>4}{when}: {describe(r, prefix='val_')}")
        print("  0.5 is chance; above it the policy learned what the judge prefers.")
    from mlx_xpo_plugin.commands.plot import write_plot

    try:
        print(f"  plot:        {write_plot(str(out))}  (the training curves)")
    except ImportError:  # matplotlib is the optional 'plot' extra
        print(
            f"  plot:        {command('mlx-xpo')} plot {out}   (needs the 'plot' extra: "
            "pip install 'mlx-xpo-plugin[plot]')"
        )
    return 0


def schema(ns) -> int:
    from mlx_xpo_plugin import config_views  # here: `mlx-xpo --help` stays quick

    print(config_views.settings_markdown() if ns.markdown else json.dumps(config_views.json_schema(), indent=2))
    return 0


#: what ``eval`` takes from the training run saved in the adapter folder, unless given
FROM_TRAINING = (
    "model",
    "data",
    "judge",
    "judge_system",
    "judge_config",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_seq_length",
    "reference_model_path",
)


def trained_settings(adapter_path: str) -> dict:
    """The settings of the run that trained ``adapter_path`` (its checkpoint/state.json; the model
    from adapter_config.json otherwise), limited to :data:`FROM_TRAINING`; {} when there are none."""
    cfg = {}
    for name, key in (("checkpoint/state.json", "config"), ("adapter_config.json", None)):
        path = os.path.join(adapter_path, name)
        if not cfg and os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            cfg = (saved.get(key) if key else saved) or {}
    return {k: cfg[k] for k in FROM_TRAINING if cfg.get(k) is not None}


def evaluate(ns) -> int:
    import contextlib

    from mlx_xpo_plugin import config  # here: `mlx-xpo --help` stays quick
    from mlx_xpo_plugin.commands.runner import run
    from mlx_xpo_plugin.online_dpo_trainer import OnlineDPO

    given = {
        "model": ns.model,
        "data": ns.data,
        "judge": ns.judge,
        "seed": ns.seed,
        "max_completion_length": ns.max_completion_length,
        "temperature": ns.temperature,
    }
    given = {k: v for k, v in given.items() if v is not None}
    # the YAML a run was trained with may hold xpo's own settings (alpha, xpo_bonus): not read here
    yaml_values = config.load_yaml(ns.config) if ns.config else {}
    yaml_values = {k: v for k, v in yaml_values.items() if k not in config.SETTINGS or config.read_by(k, "online_dpo")}
    trained = {k: v for k, v in trained_settings(ns.adapter_path).items() if k not in given and k not in yaml_values}
    for key in ("model", "data", "judge"):
        if key not in given and key not in trained and key not in yaml_values:
            raise ConfigError(
                key,
                None,
                f"not given, and {ns.adapter_path!r} holds no training run's settings (checkpoint/state.json)",
                f"pass --{key}",
            )
    values = {
        **trained,
        **given,
        "adapter_path": ns.adapter_path,
        "train": False,
        "test": True,
        "test_batches": -1,
        "batch_size": ns.batch_size,
        "train_type": ns.train_type,
    }
    cfg = config.resolve("online_dpo", values, set(values), yaml_values)
    # with --json, stdout carries the JSON object only: every other line goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if ns.json else contextlib.nullcontext():
        if trained:
            print(
                "eval: from the training run: "
                + ", ".join(
                    f"{k}={trained[k]}" if k in ("max_completion_length", "temperature") else k for k in trained
                )
            )
        rc = run(cfg, OnlineDPO, progress=False)  # evaluation only: the method's sampling is unused
    if rc:
        return rc
    with open(os.path.join(ns.adapter_path, "test_metrics.json")) as f:
        res = json.load(f)
    ci = interval(res["wins"], res["losses"])
    res["win_rate_ci95"] = list(ci) if ci else None
    if ns.json:
        from mlx_xpo_plugin.loop.jsonio import dumps  # strict JSON: an undefined win-rate is null, not NaN

        print(dumps(res))
    else:
        print(f"\nwin-rate vs reference on test.jsonl: {describe(res)}")
        print("0.5 means no change; the policy is better than the reference when the interval lies above 0.5.")
    return 0


def plot(ns) -> int:
    if not os.path.isfile(os.path.join(ns.adapter_path, "metrics.jsonl")):
        print(f"error: adapter_path: {ns.adapter_path!r} has no metrics.jsonl", file=sys.stderr)
        return 2
    from mlx_xpo_plugin.commands.plot import write_plot  # here: `mlx-xpo --help` stays quick

    try:
        print(write_plot(ns.adapter_path, ns.output))
    except ImportError:
        print("error: plot needs matplotlib: pip install 'mlx-xpo-plugin[plot]'", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-xpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="offline XPO demo on an embedded tiny model")
    d.add_argument("--output", default="runs/demo", help="adapter folder (default: runs/demo)")
    d.add_argument("--iters", type=int, default=40, help="training steps (default: 40)")
    d.add_argument("--cache", default=None, help="where the tiny model is cached")
    d.add_argument("-v", "--verbose", action="store_true", help="the run's detail lines too (model loading, ...)")
    d.set_defaults(func=demo)
    s = sub.add_parser(
        "schema",
        help="JSON Schema of the YAML settings",
        description="Print the JSON Schema of a YAML config for the xpo and online_dpo modes. For an editor: "
        "mlx-xpo schema > xpo-schema.json, then '# yaml-language-server: $schema=xpo-schema.json' as the "
        "first line of the YAML file.",
    )
    s.add_argument("--markdown", action="store_true", help="the settings table (docs/settings.md) instead")
    s.set_defaults(func=schema)
    e = sub.add_parser(
        "eval",
        help="win-rate of adapters vs the reference",
        description="Win-rate of trained adapters against the reference on test.jsonl. "
        "model, data, judge (and its system prompt and config), completion length and "
        "sampling settings default to the training run's, read from the adapter folder.",
    )
    e.add_argument("--adapter-path", required=True, help="the adapter folder of the trained run (its adapter_path)")
    e.add_argument("--model", default=None, help="the base model (default: the training run's)")
    e.add_argument("--data", default=None, help="folder with test.jsonl (default: the training run's)")
    e.add_argument(
        "--judge", default=None, help="the judge, as the judge setting; 'human' to judge yourself (default: the run's)"
    )
    e.add_argument(
        "--config",
        default=None,
        help="a YAML file with further settings (judge_system, judge_config, top_p, ...); the run's own "
        "YAML works: what it sets beats the training run's values, and xpo's alpha and xpo_bonus are not read",
    )
    e.add_argument(
        "--train-type",
        default="lora",
        choices=["lora", "dora", "full"],
        help="how the adapters were trained (default: lora)",
    )
    e.add_argument("--batch-size", type=int, default=4, help="prompts sampled and judged at once (default: 4)")
    e.add_argument(
        "--max-completion-length", type=int, default=None, help="tokens per completion (default: the training run's)"
    )
    e.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the training run's)")
    e.add_argument("--seed", type=int, default=None, help="random seed of the sampling (default: 0)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the summary line")
    e.set_defaults(func=evaluate)
    pl = sub.add_parser(
        "plot",
        help="PNG of a run's training curves",
        description="Draw the win-rate against the reference (with its 95%% interval, and the eval result when "
        "there is one) and the training curves of a run into <adapter_path>/training.png.",
    )
    pl.add_argument("adapter_path", help="the run's adapter folder (holding metrics.jsonl)")
    pl.add_argument("--output", default=None, help="where to write the PNG (default: <adapter_path>/training.png)")
    pl.set_defaults(func=plot)
    add_estimate(sub)
    return p


def main(argv=None) -> int:
    request()  # one of this project's commands: a fast BLAS goes under MLX (see fast_blas)
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in eval, estimate or a download: one line, no traceback
        print("error: interrupted", file=sys.stderr)
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
