"""The settings schema: one table that drives defaults, YAML validation, CLI flags,
the training-args dataclass, the JSON Schema (`mlx-xpo schema`) and the README table.

Precedence is explicit: command line > YAML > default. Defaults of the online-preference
settings follow the MLX-LoRA-Studio XPO / Online DPO settings table.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import ConfigError

ONLINE_MODES = ("xpo", "online_dpo")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # float | int | str | bool | dict | floats (float or per-epoch list) | path
    default: Any
    help: str
    choices: Optional[tuple] = None
    minimum: Optional[float] = None  # inclusive
    maximum: Optional[float] = None  # inclusive
    exclusive_minimum: bool = False
    nullable: bool = False
    studio: bool = False  # shown in MLX-LoRA-Studio's Online Preference block
    modes: tuple = ONLINE_MODES
    plugin: bool = True  # False: an upstream setting this plugin reads and validates

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_S = Setting
#: The online-preference settings this plugin adds or redefines.
PLUGIN_SETTINGS: tuple[Setting, ...] = (
    _S("beta", "floats", 0.1, "DPO temperature; a list gives one value per epoch (last held).",
       minimum=0.0, exclusive_minimum=True),
    _S("alpha", "floats", 1e-5, "XPO exploration-bonus coefficient; a float, or a per-epoch list "
       "such as 1e-4,1e-5,1e-6 (last entry held to the end).", minimum=0.0, studio=True,
       modes=("xpo",)),
    _S("xpo_bonus", "str", "kl", "XPO term. 'kl': + alpha * (KL on chosen + KL on rejected), its "
       "gradient a score-function estimate of grad KL(policy at the sampling temperature || "
       "reference). 'kl_upstream': the same value differentiated as written (mlx-lm-lora's "
       "formula; zero-mean gradient at temperature 1). 'paper': a policy sample vs a reference "
       "sample, loss + alpha * log pi(y_ref) (the XPO paper and TRL).",
       choices=("kl", "kl_upstream", "paper"), modes=("xpo",)),
    _S("dpo_cpo_loss_type", "str", "sigmoid", "DPO loss variant.",
       choices=("sigmoid", "hinge", "ipo", "dpop")),
    _S("delta", "float", 50.0, "Drift-penalty coefficient of the dpop loss.", minimum=0.0),
    _S("judge", "str", "Qwen/Qwen3-0.6B", "Pairwise judge: 'human', an http(s):// "
       "OpenAI-compatible endpoint, 'module:callable' / 'file.py:callable', or an MLX model "
       "path or id.", studio=True),
    _S("judge_system", "str", None, "Rubric system prompt for model and endpoint judges.",
       nullable=True, studio=True),
    _S("judge_config", "dict", {}, "Judge adapter options (see the judge section of the README)."),
    _S("max_completion_length", "int", 512, "Maximum sampled completion length in tokens.",
       minimum=1, studio=True),
    _S("temperature", "float", 0.8, "Sampling temperature of the policy (0 = greedy). Applied after "
       "top_p/top_k/min_p, which filter the untempered distribution (as mlx_lm.generate does; "
       "HF/TRL filter the tempered one).",
       minimum=0.0, studio=True),
    _S("top_p", "float", 1.0, "Nucleus sampling: keep the smallest token set with this mass "
       "(1 = off).", minimum=0.0, maximum=1.0, exclusive_minimum=True),
    _S("top_k", "int", 0, "Sample from the k most likely tokens only (0, or k >= the "
       "vocabulary size, = off).", minimum=0),
    _S("min_p", "float", 0.0, "Drop tokens below min_p times the top token's probability "
       "(0 = off).", minimum=0.0, maximum=1.0),
    _S("reference_model_path", "str", None, "Frozen reference model. Empty with LoRA/DoRA: "
       "the base model with adapters off (no second copy).", nullable=True),
    _S("missing_eos_penalty", "float", None, "Subtracted from the judge's preference score of a "
       "completion that ended without EOS (as in TRL).", nullable=True, minimum=0.0),
    _S("entropy_coef", "float", 0.0, "Entropy bonus on the policy's completion tokens "
       "(the recipe's entropy_regularization); 0 = off.", minimum=0.0),
    _S("log_completions_every", "int", None, "Write sample completions to completions.jsonl "
       "every N steps (default: steps_per_report).", nullable=True, minimum=1),
    _S("compute_dtype", "str", "auto", "Precision the frozen base weights compute in (policy, "
       "reference, model judge). auto: float32 on a CPU backend, where float32 products run on "
       "BLAS (a quantized base is dequantized once at load to the exact values quantized_matmul "
       "uses, so adapters stay valid for the checkpoint), unless that adds more than half of the "
       "available memory; the checkpoint's own precision on a GPU (Metal). float32 / bfloat16 / "
       "float16: that dtype on any device. native: the checkpoint's own.",
       choices=("auto", "float32", "bfloat16", "float16", "native")),
    _S("max_nonfinite_steps", "int", 3, "Stop after this many consecutive steps with a "
       "non-finite loss (each one is skipped).", minimum=1),
)

#: Upstream settings our modes read; validated with the same machinery (not re-documented).
UPSTREAM_SETTINGS: tuple[Setting, ...] = tuple(
    _S(n, k, d, h, choices=c, minimum=mn, nullable=nl, plugin=False, **kw)
    for n, k, d, h, c, mn, nl, kw in [
        ("model", "str", "mlx_model", "Base model path or id.", None, None, False, {}),
        ("data", "str", "data/", "Folder with train/valid/test.jsonl prompt files.", None, None, False, {}),
        ("train", "bool", False, "Train.", None, None, False, {}),
        ("test", "bool", False, "Evaluate on the test prompts after training.", None, None, False, {}),
        ("train_type", "str", "lora", "lora, dora or full.", ("lora", "dora", "full"), None, False, {}),
        ("train_mode", "str", "sft", "Training mode.", None, None, False, {}),
        ("batch_size", "int", 1, "Prompts per micro-batch (2 completions each).", None, 1, False, {}),
        ("iters", "int", None, "Optimizer steps (default: epochs, else 1 epoch).", None, 1, True, {}),
        ("epochs", "int", None, "Passes over the training prompts.", None, 1, True, {}),
        ("gradient_accumulation_steps", "int", 1, "Micro-batches per optimizer step.", None, 1, False, {}),
        ("micro_batch_size", "int", 1, "Pairs per scoring forward and backward (2 rows each): bounds "
         "the activation memory whatever batch_size is; null scores the whole batch at once.", None, 1, True, {}),
        ("learning_rate", "float", 1e-5, "Learning rate.", None, 0.0, False, {}),
        ("lr_schedule", "dict", None, "mlx-lm learning-rate schedule.", None, None, True, {}),
        ("optimizer", "str", "adam", "Optimizer.", ("adam", "adamw", "muon"), None, False, {}),
        ("optimizer_config", "dict", {}, "Optimizer options per optimizer.", None, None, False, {}),
        ("steps_per_report", "int", 10, "Steps between metric reports.", None, 1, False, {}),
        ("steps_per_eval", "int", 200, "Steps between validations.", None, 1, False, {}),
        ("val_batches", "int", 25, "Validation batches (-1: all).", None, -1, False, {}),
        ("test_batches", "int", 500, "Test batches (-1: all).", None, -1, False, {}),
        ("save_every", "int", 100, "Steps between checkpoints.", None, 1, False, {}),
        ("adapter_path", "str", "adapters", "Output folder.", None, None, False, {}),
        ("resume_adapter_file", "str", None, "Checkpoint or adapter file to resume from.", None, None, True, {}),
        ("max_seq_length", "int", 2048, "Maximum prompt + completion length.", None, 2, False, {}),
        ("seed", "int", 0, "Random seed.", None, 0, False, {}),
        ("num_layers", "int", -1, "Layers with adapters (-1: all).", None, -1, False, {}),
        ("lora_parameters", "dict", {"rank": 8, "dropout": 0.0, "scale": 10.0}, "LoRA rank/dropout/scale.", None, None, False, {}),
        ("load_in_4bits", "bool", False, "Quantize the base to 4 bits.", None, None, False, {}),
        ("load_in_6bits", "bool", False, "Quantize the base to 6 bits.", None, None, False, {}),
        ("load_in_8bits", "bool", False, "Quantize the base to 8 bits.", None, None, False, {}),
        ("load_in_mxfp4", "bool", False, "Quantize the base to mxfp4.", None, None, False, {}),
        ("grad_checkpoint", "bool", False, "Gradient checkpointing.", None, None, False, {}),
        ("fuse", "bool", False, "Fuse adapters into the model after training.", None, None, False, {}),
        ("wandb", "str", None, "WandB project.", None, None, True, {}),
        ("qat_enable", "bool", False, "QAT (not applicable to online modes).", None, None, False, {}),
        ("config", "str", None, "YAML file.", None, None, True, {}),
    ]
)

SETTINGS: dict[str, Setting] = {s.name: s for s in UPSTREAM_SETTINGS + PLUGIN_SETTINGS}


def known_upstream_keys() -> set:
    """Every key upstream's YAML/CLI accepts (so that they are not 'unknown' to us)."""
    try:
        from mlx_lm_lora.train import CONFIG_DEFAULTS
        keys = set(CONFIG_DEFAULTS)
    except Exception:  # pragma: no cover - upstream missing
        keys = set()
    return keys | {"wandb", "list_reward_functions", "hf_dataset", "train_key", "prompt_feature",
                   "text_feature", "chat_feature", "completion_feature", "chosen_feature",
                   "rejected_feature", "system_feature", "mask_prompt"}


# ---------------------------------------------------------------- parsing and checking


def parse_floats(text: str) -> Any:
    """'1e-4' -> 1e-4; '1e-4,1e-5' -> [1e-4, 1e-5] (the CLI form of a per-epoch schedule)."""
    parts = [p.strip() for p in str(text).strip("[] ").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers (e.g. 1e-4,1e-5)")
    if not vals:
        raise argparse.ArgumentTypeError("empty value")
    return vals[0] if len(vals) == 1 else vals


def _type_name(s: Setting) -> str:
    return {"floats": "a number or a list of numbers", "float": "a number", "int": "an integer",
            "str": "a string", "bool": "true or false", "dict": "a mapping"}[s.kind]


def _check_number(s: Setting, v, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (s.kind == "int" and not isinstance(v, int)):
        raise ConfigError(where, v, f"expected {_type_name(s)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(where, v, "expected a finite number")
    lo, hi = s.minimum, s.maximum
    if lo is not None and (v < lo or (s.exclusive_minimum and v == lo)):
        rng = f"> {lo}" if s.exclusive_minimum else f">= {lo}"
        raise ConfigError(where, v, f"must be {rng}" + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and v > hi:
        raise ConfigError(where, v, f"must be <= {hi}")


def check_value(s: Setting, v) -> Any:
    """Validate (and normalise) one value against its setting; raises ConfigError."""
    if v is None:
        if s.nullable or s.default is None:
            return None
        raise ConfigError(s.name, v, f"expected {_type_name(s)}")
    if s.kind == "floats":
        if isinstance(v, str):
            try:
                v = parse_floats(v)
            except argparse.ArgumentTypeError:
                raise ConfigError(s.name, v, f"expected {_type_name(s)}")
        if isinstance(v, (list, tuple)):
            if not v:
                raise ConfigError(s.name, v, "a schedule needs at least one entry")
            for x in v:
                _check_number(dataclasses.replace(s, kind="float"), x, s.name)
            return [float(x) for x in v] if len(v) > 1 else float(v[0])
        _check_number(dataclasses.replace(s, kind="float"), v, s.name)
        return float(v)
    if s.kind in ("float", "int"):
        _check_number(s, v, s.name)
        return float(v) if s.kind == "float" else int(v)
    if s.kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(s.name, v, "expected true or false")
        return v
    if s.kind == "dict":
        if not isinstance(v, dict):
            raise ConfigError(s.name, v, "expected a mapping (key: value pairs)")
        return v
    if s.kind == "str":
        if not isinstance(v, str):
            raise ConfigError(s.name, v, "expected a string")
        if s.choices and v not in s.choices:
            raise ConfigError(s.name, v, "valid: " + ", ".join(s.choices))
        return v
    raise AssertionError(s.kind)


def did_you_mean(name: str, candidates) -> str:
    m = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{m[0]}'?" if m else ""


def load_yaml(path) -> dict:
    """Read a YAML config with upstream's loader (which also reads 1e-5 as a float)."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError("config", path, "the file does not exist")
    try:
        from mlx_lm_lora.train import yaml_loader as loader
    except Exception:  # pragma: no cover
        loader = yaml.SafeLoader
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError("config", str(path), f"not valid YAML{where}: {getattr(e, 'problem', e)}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "the top level must be a mapping of settings")
    return data


# ---------------------------------------------------------------- the resolved run config


def _field(s: Setting):
    d = s.default
    return field(default_factory=lambda d=d: dict(d)) if isinstance(d, dict) else field(default=d)


#: The training-args dataclass, generated from the table.
OnlineArgs = dataclasses.make_dataclass(
    "OnlineArgs",
    [(s.name, Any, _field(s)) for s in SETTINGS.values()],
    namespace={"__doc__": "Every resolved setting of an online preference run (see config.SETTINGS)."},
)


def resolve(mode: str, cli: dict, explicit: set, yaml_values: dict) -> Any:
    """Merge command line > YAML > default for `mode` and validate every value.

    ``cli`` holds the parsed values (only those in ``explicit`` count as given). Unknown YAML keys
    are errors with a did-you-mean. Raises ConfigError (one line) on the first bad value.
    """
    upstream_keys = known_upstream_keys()
    for k in yaml_values:
        if k not in SETTINGS and k not in upstream_keys:
            raise ConfigError(k, yaml_values[k], "unknown setting",
                              did_you_mean(k, set(SETTINGS) | upstream_keys))
        s = SETTINGS.get(k)
        if s is not None and s.plugin and mode not in s.modes:
            raise ConfigError(k, yaml_values[k], f"only used by --train-mode {' / '.join(s.modes)}")
    values = {}
    for name, s in SETTINGS.items():
        if name in explicit and name in cli:
            v = cli[name]
        elif name in yaml_values:
            v = yaml_values[name]
        else:
            v = s.default
        values[name] = check_value(s, v)
    values["train_mode"] = mode
    a = OnlineArgs(**values)
    _check_cross(a)
    return a


def _check_cross(a) -> None:
    if a.qat_enable:
        raise ConfigError("qat_enable", True, f"QAT is not supported by --train-mode {a.train_mode}; "
                          "remove qat_enable (QAT applies to sft only)")
    if a.max_completion_length >= a.max_seq_length:
        raise ConfigError("max_completion_length", a.max_completion_length,
                          f"must be smaller than max_seq_length ({a.max_seq_length}) to leave room for the prompt")
    if a.adapter_path and os.path.isfile(a.adapter_path):
        raise ConfigError("adapter_path", a.adapter_path, "is a file; give a folder for adapters and metrics")
    if not (a.train or a.test):
        raise ConfigError("train", a.train, "set train: true (or --train) and/or test: true (or --test)")
    quant = [k for k in ("load_in_4bits", "load_in_6bits", "load_in_8bits", "load_in_mxfp4") if getattr(a, k)]
    if len(quant) > 1:
        raise ConfigError(quant[1], True, f"choose one quantization; {quant[0]} is already set")
    lp = a.lora_parameters
    for key in lp:
        if key not in ("rank", "dropout", "scale", "keys", "alpha"):
            raise ConfigError(f"lora_parameters.{key}", lp[key], "unknown key; valid: rank, dropout, scale, keys")


# ---------------------------------------------------------------- CLI flags, JSON Schema, docs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's flags to upstream's parser; fix type/help of options upstream already has.

    Defaults stay None (argparse), so that YAML values are never masked; the schema default
    applies when neither the command line nor the YAML gives a value.
    """
    existing = {a.dest: a for a in parser._actions}
    group = None
    for s in PLUGIN_SETTINGS:
        kind = {"floats": parse_floats, "float": float, "int": int, "str": str}.get(s.kind)
        help_ = f"[{'/'.join(s.modes)}] {s.help} Default: {s.default!r}."
        if s.choices:
            help_ += " One of: " + ", ".join(s.choices) + "."
        if s.name in existing:
            act = existing[s.name]
            act.help = help_
            if s.name == "alpha":  # upstream's type=list[float] splits '1e-4' into characters
                act.type = parse_floats
            continue
        if s.kind == "dict":
            kind = yaml.safe_load
        if group is None:
            group = parser.add_argument_group("online preference (xpo, online_dpo; mlx-xpo-plugin)")
        group.add_argument(s.flag, dest=s.name, type=kind, default=None, help=help_)


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of a YAML config for the plugin's modes."""
    def one(s: Setting) -> dict:
        t = {"float": {"type": "number"}, "int": {"type": "integer"}, "str": {"type": "string"},
             "bool": {"type": "boolean"}, "dict": {"type": "object"}}.get(s.kind)
        if s.kind == "floats":
            num = {"type": "number"}
            t = {"oneOf": [num, {"type": "array", "items": num, "minItems": 1}]}
        t = dict(t)
        num_target = t if "type" in t else None
        if num_target is not None:
            if s.minimum is not None:
                num_target["exclusiveMinimum" if s.exclusive_minimum else "minimum"] = s.minimum
            if s.maximum is not None:
                num_target["maximum"] = s.maximum
        if s.choices:
            t["enum"] = list(s.choices)
        if s.nullable:
            t = {"anyOf": [t, {"type": "null"}]}
        t["description"] = s.help
        if s.default is not None:
            t["default"] = s.default
        return t

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mlx-xpo-plugin config (xpo, online_dpo)",
        "type": "object",
        "properties": {s.name: one(s) for s in SETTINGS.values()},
    }


def settings_markdown() -> str:
    """The README's settings table, generated from PLUGIN_SETTINGS."""
    rows = ["| Setting | Modes | Default | Valid | Studio | What it changes |",
            "|---|---|---|---|---|---|"]
    for s in PLUGIN_SETTINGS:
        valid = ", ".join(s.choices) if s.choices else _range_text(s)
        rows.append(f"| `{s.name}` | {', '.join(s.modes)} | `{s.default!r}` | {valid} | "
                    f"{'yes' if s.studio else ''} | {s.help} |")
    return "\n".join(rows)


def _range_text(s: Setting) -> str:
    parts = [_type_name(s)]
    if s.minimum is not None:
        parts.append((">" if s.exclusive_minimum else ">=") + f" {s.minimum}")
    if s.maximum is not None:
        parts.append(f"<= {s.maximum}")
    if s.nullable:
        parts.append("or empty")
    return " ".join(parts)
