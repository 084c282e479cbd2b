"""``mlx-xpo estimate --config run.yaml``: what a run will cost on this machine, before it starts.

The seconds per step by phase come from :mod:`mlx_xpo_plugin.compute.cost` (its formulas), with
the model's shape read from ``config.json`` (no weights are loaded), the run's settings (batch,
gradient accumulation, completion length, judge, ``compute_dtype``), the mean prompt length of
the training prompts as the tokenizer's chat template makes them (at most :data:`SAMPLE` prompts
read), and this machine's rates (:mod:`mlx_xpo_plugin.commands.calibration`, measured once and
cached). The run's steps are those the runner plans (``iters``, else ``epochs`` over the training
prompts), plus the validation passes.

Completions are counted at ``max_completion_length``: one that ends early costs less, so the
projection is an upper bound on the rollout and scoring of a step.
"""

from __future__ import annotations

import json
import math
import os
import sys

from mlx_xpo_plugin.compute import cost
from mlx_xpo_plugin.errors import ConfigError

SAMPLE = 256
#: the projection is shown at the start of a run when the whole run is expected to take longer
SHOW_ABOVE_S = 60.0
#: rates slower than any machine this runs on (the reference BLAS of a small CPU, a busy machine):
#: a run projected under :data:`SHOW_ABOVE_S` with them needs no calibration to say nothing
SLOW = cost.Rates(
    sgemm=1e9,
    stream=1e9,
    fwd_rate=((64, 1e9),),
    bwd_rate=((64, 1e9),),
    call=(0.01, 0.01),
    token=(0.002, 0.003),
    fwd=(0.01, 0.01),
    bwd=(0.02, 0.03),
    opt=(0.01, 0.005),
)


def mean_prompt_tokens(folder: str, data_dir: str, split: str = "train") -> float:
    """Mean token count of the first :data:`SAMPLE` prompts of ``split`` with the chat template and
    its generation prompt, as the trainer tokenizes them; ``chars / 4`` where no tokenizer loads."""
    from mlx_xpo_plugin.commands.data import read_rows, split_path

    rows = read_rows(split_path(data_dir, split))[:SAMPLE]
    if not rows:
        return 0.0
    try:
        from transformers import AutoTokenizer  # heavy: only when estimating

        tok = AutoTokenizer.from_pretrained(folder)
        lens = []
        for msgs in rows:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
            lens.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    except Exception:
        lens = [sum(len(m.get("content") or "") for m in msgs) / 4 + 8 for msgs in rows]
    return sum(lens) / len(lens)


def rough_prompt_tokens(data_dir: str, split: str = "train") -> float:
    """A generous prompt length without a tokenizer: 2 characters per token plus 32 for the
    template, over the first :data:`SAMPLE` prompts."""
    from mlx_xpo_plugin.commands.data import read_rows, split_path

    rows = read_rows(split_path(data_dir, split))[:SAMPLE]
    chars = [sum(len(m.get("content") or "") for m in msgs) for msgs in rows]
    return sum(chars) / max(1, len(chars)) / 2 + 32


def weight_bytes(cfg, model_cfg: dict) -> float:
    """Bytes per weight as the base computes: 4 where ``compute_dtype`` gives float32 (``auto`` on
    a CPU), else the setting's or the checkpoint's dtype (4-bit and the like count as 2)."""
    from mlx_xpo_plugin.compute.precision import on_cpu_backend

    setting = cfg.compute_dtype
    if setting == "float32" or (setting == "auto" and on_cpu_backend()):
        return 4.0
    if setting in ("bfloat16", "float16"):
        return 2.0
    return 4.0 if str(model_cfg.get("torch_dtype", "")).endswith("32") else 2.0


def judge_work(cfg) -> dict:
    """The judge's part of :class:`.cost.Work`: its kind and, for a model judge, its shape and
    how many chats and generated tokens a pair takes."""
    from mlx_xpo_plugin.compute.models import model_folder
    from mlx_xpo_plugin.host.registry import judge_factory_for

    kind = judge_factory_for(cfg.judge).name
    if kind != "llm":
        return {"judge_kind": kind}
    from mlx_xpo_plugin.judges import llm
    from mlx_xpo_plugin.judges.common import resolve_options

    opts = resolve_options("model", cfg.judge_config, llm.OPTIONS)
    return {
        "judge_kind": "llm",
        "judge_shape": cost.read_shape(model_folder("judge", cfg.judge, weights=False)),
        "judge_rows": 2 if opts["both_orders"] else 1,
        "judge_tokens": int(opts["max_tokens"]) if opts["mode"] == "generate" else 0,
    }


def project(cfg, n_train: int, rates: cost.Rates, prompt_len: float, n_valid: int = 0) -> dict:
    """Seconds per step by phase, the run's steps, validation passes and total seconds."""
    from mlx_xpo_plugin.commands.build import plan_steps
    from mlx_xpo_plugin.compute.models import model_folder

    folder = model_folder("model", cfg.model, weights=False)
    with open(os.path.join(folder, "config.json")) as f:
        model_cfg = json.load(f)
    shape = cost.shape_of(model_cfg)
    work = cost.Work(
        prompts=cfg.batch_size,
        micro=cfg.gradient_accumulation_steps,
        prompt_len=prompt_len,
        completion_len=cfg.max_completion_length,
        weight_bytes=weight_bytes(cfg, model_cfg),
        **judge_work(cfg),
    )
    step = cost.step_seconds(shape, rates, work)
    steps = plan_steps(cfg, n_train)[0] if cfg.train else 0
    n_val = n_valid if cfg.val_batches < 0 else min(n_valid, cfg.val_batches * cfg.batch_size)
    evals = (1 + steps // cfg.steps_per_eval + (1 if steps % cfg.steps_per_eval else 0)) if n_val and steps else 0
    one_eval = cost.evaluation_seconds(shape, rates, work, n_val, cfg.batch_size)
    return {
        "model": folder,
        "shape": shape.__dict__,
        "parameters": shape.body + shape.head,
        "prompt_tokens": prompt_len,
        "step": step,
        "steps": steps,
        "validations": evals,
        "validation_prompts": n_val,
        "validation_seconds": evals * one_eval,
        "total_seconds": steps * step["total"] + evals * one_eval,
        "judge_kind": work.judge_kind,
    }


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _phases(step: dict) -> str:
    return ", ".join(
        f"{p} {'?' if step[p] is None else f'{step[p]:.2f}'}" for p in cost.PHASES if step[p] is None or step[p] > 0
    )


def summary_line(res: dict) -> str:
    """One line: seconds per step by phase and the run's total."""
    unknown = res["step"]["judge"] is None
    return (
        f"projected on this machine: {res['step']['total']:.2f} s per step ({_phases(res['step'])} s), "
        f"{res['steps']} steps"
        + (f" + {res['validations']} validations" if res["validations"] else "")
        + f" = about {_duration(res['total_seconds'])}"
        + (f" plus the {res['judge_kind']} judge's time" if unknown else "")
    )


def _counts(cfg) -> tuple[int, int]:
    from mlx_xpo_plugin.commands.data import read_rows, split_path

    n_train = len(read_rows(split_path(cfg.data, "train"))) if cfg.train else 0
    valid = split_path(cfg.data, "valid")
    return n_train, len(read_rows(valid)) if os.path.isfile(valid) else 0


def projection_line(cfg, n_prompts: int | None = None, world: int = 1) -> str | None:
    """The projection as one line when the whole run is expected to take over :data:`SHOW_ABOVE_S`
    seconds, else None (also None when it cannot be made: a model or data it cannot read). Under
    ``mlx.launch`` each of ``world`` processes takes its share of the prompts of every step.
    Calibrates this machine once (a few seconds) when nothing is cached for it, unless the run
    is under a minute even at the rates of :data:`SLOW` with :func:`rough_prompt_tokens`."""
    from mlx_xpo_plugin.commands import calibration, calibration_age
    from mlx_xpo_plugin.compute.models import model_folder

    try:
        n_train, n_valid = _counts(cfg)
        n_train = (n_train if n_prompts is None else n_prompts) // max(1, world)  # each process's share
        if project(cfg, n_train, SLOW, rough_prompt_tokens(cfg.data), n_valid)["total_seconds"] <= SHOW_ABOVE_S:
            return None  # under a minute even on the slowest machine: no tokenizer, no calibration
        plen = mean_prompt_tokens(model_folder("model", cfg.model, weights=False), cfg.data)
        res = project(cfg, n_train, calibration.rates()[0], plen, n_valid)
    except (ConfigError, OSError, KeyError, ValueError):
        return None
    if res["total_seconds"] <= SHOW_ABOVE_S:
        return None
    when = calibration_age.when_measured(calibration.cached() or {})  # the calibration just used
    return summary_line(res) + (f" (this machine's rates measured {when})" if when else "")


def render(cfg, res: dict, record: dict, cache_file: str) -> str:
    from mlx_xpo_plugin.commands import calibration_age

    m, r = res["shape"], record["rates"]
    st = res["step"]
    lines = [
        f"model: {res['model']} ({res['parameters'] / 1e6:.0f} M parameters in the projections and the output "
        f"layer; hidden {m['hidden']}, {m['layers']} layers, vocabulary {m['vocab']})",
        f"step: {cfg.batch_size} prompts x {cfg.gradient_accumulation_steps} micro-batch(es), 2 completions each, "
        f"prompts {res['prompt_tokens']:.0f} tokens on average, completions up to {cfg.max_completion_length} tokens; "
        f"judge: {res['judge_kind']}; compute_dtype: {cfg.compute_dtype}",
        f"machine: sgemm {r['sgemm'] / 1e9:.1f} GFLOP/s, decoding reads weights at {r['stream'] / 1e9:.1f} GB/s "
        f"(measured {calibration_age.when_measured(record)}; cached in {cache_file})",
        "",
        "| phase | seconds per step |",
        "|---|---|",
    ]
    for p in cost.PHASES:
        lines.append(f"| {p} | {'not estimated (depends on the judge)' if st[p] is None else f'{st[p]:.2f}'} |")
    lines += [f"| **step** | **{st['total']:.2f}** |", "", summary_line(res)]
    if res["validations"]:
        lines.append(
            f"validation: {res['validations']} passes over {res['validation_prompts']} prompts, "
            f"{_duration(res['validation_seconds'])} in all"
        )
    if cfg.compute_dtype not in ("auto", "float32"):
        lines.append(
            f"note: compute_dtype {cfg.compute_dtype} computes outside BLAS on a CPU; the rates above are "
            "float32's, so this projection is optimistic there"
        )
    return "\n".join(lines)


def estimate(ns) -> int:
    """The ``estimate`` subcommand."""
    from mlx_xpo_plugin import config
    from mlx_xpo_plugin.commands import calibration
    from mlx_xpo_plugin.compute.models import model_folder

    values = config.load_yaml(ns.config)
    mode = ns.train_mode or values.pop("train_mode", None) or "xpo"
    if mode not in ("xpo", "online_dpo"):
        raise ConfigError("train_mode", mode, "valid: xpo, online_dpo")
    values.pop("train_mode", None)
    cfg = config.resolve(mode, {}, set(), values)
    folder = model_folder("model", cfg.model, weights=False)
    n_train, n_valid = _counts(cfg)
    plen = mean_prompt_tokens(folder, cfg.data)
    rates, record = calibration.rates(refresh=ns.recalibrate, log=lambda s: print(s, file=sys.stderr))
    res = project(cfg, n_train, rates, plen, n_valid)
    if ns.json:
        print(json.dumps({**res, "machine": record}, indent=1, default=str))
    else:
        print(render(cfg, res, record, str(calibration.cache_path(record["identity"]))))
    return 0 if math.isfinite(res["total_seconds"]) else 1


def add_parser(sub) -> None:
    """Register ``estimate`` on the ``mlx-xpo`` subcommand parsers."""
    e = sub.add_parser(
        "estimate",
        help="seconds per step and for the whole run, before a run",
        description="Expected seconds per step by phase (rollout, judge, reference, policy) and for the "
        "whole run, from the model's config.json, the run's settings and this machine's rates "
        "(calibrated in a few seconds, then cached; measured again when a day old, or when made while other "
        "processes kept the cores busy and they no longer do).",
    )
    e.add_argument("--config", required=True, help="the run's YAML settings")
    e.add_argument("--train-mode", default=None, choices=["xpo", "online_dpo"], help="default: xpo")
    e.add_argument("--recalibrate", action="store_true", help="measure this machine's rates again")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=estimate)
