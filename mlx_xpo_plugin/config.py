"""The settings schema: one table that drives defaults, YAML validation, CLI flags,
the training-args dataclass, the JSON Schema (`mlx-xpo schema`), the README table and what a
setting given again may do when a run resumes its checkpoint (``on_resume``: config_resume.py).

Precedence is explicit: command line > YAML > default. Defaults of the online-preference
settings follow the MLX-LoRA-Studio XPO / Online DPO settings table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from mlx_xpo_plugin.config_checks import check_cross
from mlx_xpo_plugin.errors import ConfigError, did_you_mean

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
    exclusive_maximum: bool = False
    pattern: Optional[str] = None  # a str must match it (re.fullmatch); `help` says what it means
    secret: bool = False  # a value that may be a credential is never echoed in full
    nullable: bool = False
    studio: bool = False  # shown in MLX-LoRA-Studio's Online Preference block
    modes: tuple = ONLINE_MODES
    plugin: bool = True  # False: an upstream setting this plugin reads and validates
    on_resume: str = "same"  # given again on a resume: same | free | length | folder | this_run | judge (config_resume)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: The online-preference settings this plugin adds or redefines.
# (a table, one setting per entry: kept as written by the formatter)
# fmt: off
PLUGIN_SETTINGS: tuple[Setting, ...] = (
    Setting("beta", "floats", 0.1, "DPO temperature; a list gives one value per epoch (last held).",
       minimum=0.0, exclusive_minimum=True),
    Setting("alpha", "floats", 1e-5, "XPO exploration-bonus coefficient; a float, or a per-epoch list "
       "such as 1e-4,1e-5,1e-6 (last entry held to the end).", minimum=0.0, studio=True,
       modes=("xpo",)),
    Setting("xpo_bonus", "str", "kl", "XPO term, averaged over every sampled pair (ties and invalid "
       "verdicts included). 'kl': - alpha * (KL on both samples), its gradient a score-function "
       "estimate of -2 alpha grad KL(policy at the sampling temperature || reference); needs LoRA "
       "dropout 0. 'kl_upstream': mlx-lm-lora's formula, differentiated as written: zero-mean "
       "gradient at temperature 1, at other temperatures a bias whose direction depends on the "
       "model. 'paper': a policy sample vs a reference sample, loss + alpha * log pi(y_ref), a tie "
       "won by the policy sample (the XPO paper and TRL).",
       choices=("kl", "kl_upstream", "paper"), modes=("xpo",)),
    Setting("dpo_cpo_loss_type", "str", "sigmoid", "DPO loss variant. ipo compares per-token mean "
       "log-probs (the IPO paper, TRL's DPOTrainer); TRL's XPO and Online DPO trainers compare sums.",
       choices=("sigmoid", "hinge", "ipo", "dpop")),
    Setting("delta", "float", 50.0, "Drift-penalty coefficient of the dpop loss.", minimum=0.0),
    Setting("judge", "str", "Qwen/Qwen3-0.6B", "Pairwise judge: 'human', an http(s):// "
       "OpenAI-compatible endpoint, 'module:callable' / 'file.py:callable', or an MLX model "
       "path or id. Unlike upstream's own online modes, which have no default and require a "
       "judge, this one defaults to Qwen/Qwen3-0.6B (the settings table).", studio=True, on_resume="judge"),
    Setting("judge_system", "str", None, "Rubric system prompt for model and endpoint judges.",
       nullable=True, studio=True),
    Setting("judge_config", "dict", {}, "Options of the chosen judge (every judge's keys: docs/judges.md).",
       on_resume="judge"),
    Setting("max_completion_length", "int", 512, "Maximum sampled completion length in tokens.",
       minimum=1, studio=True),
    Setting("temperature", "float", 0.8, "Sampling temperature of the policy (0 = greedy). Applied after "
       "top_p/top_k/min_p, which filter the untempered distribution (as mlx_lm.generate does; "
       "HF/TRL filter the tempered one).",
       minimum=0.0, studio=True),
    Setting("top_p", "float", 1.0, "Nucleus sampling: keep the smallest token set with this mass "
       "(1 = off).", minimum=0.0, maximum=1.0, exclusive_minimum=True),
    Setting("top_k", "int", 0, "Sample from the k most likely tokens only (0, or k >= the "
       "vocabulary size, = off).", minimum=0),
    Setting("min_p", "float", 0.0, "Drop tokens below min_p times the top token's probability "
       "(0 = off).", minimum=0.0, maximum=1.0),
    Setting("reference_model_path", "str", None, "Frozen reference model. Empty with LoRA/DoRA: "
       "the base model with adapters off (no second copy).", nullable=True),
    Setting("missing_eos_penalty", "float", None, "Subtracted from the judge's preference score of a "
       "completion that ended without EOS (as in TRL).", nullable=True, minimum=0.0),
    Setting("entropy_coef", "float", 0.0, "Entropy bonus on the policy's completion tokens "
       "(the recipe's entropy_regularization); 0 = off.", minimum=0.0),
    Setting("log_completions_every", "int", None, "Write sample completions to completions.jsonl "
       "every N steps (default: steps_per_report).", nullable=True, minimum=1, on_resume="free"),
    Setting("compute_dtype", "str", "auto", "Precision the frozen base weights compute in (policy, "
            "reference, model judge). auto: float32 on a CPU backend, where float32 products run on "
            "BLAS (a quantized base is dequantized once at load to the exact values quantized_matmul "
            "uses, so adapters stay valid for the checkpoint), unless that adds more than half of the "
            "available memory; the checkpoint's own precision on a GPU (Metal). float32 / bfloat16 / "
            "float16: that dtype on any device. native: the checkpoint's own.",
            choices=("auto", "float32", "bfloat16", "float16", "native")),
    Setting("max_nonfinite_steps", "int", 3, "Stop after this many consecutive steps with a "
       "non-finite loss (each one is skipped).", minimum=1, on_resume="free"),
    Setting("max_judgeless_steps", "int", 10, "Stop (exit status 3) after this many consecutive steps "
       "in which the judge gave no valid pair (errors, invalid answers, ties); the checkpoint is "
       "the state before them. Empty: no limit.", nullable=True, minimum=1, on_resume="free"),
    Setting("start_over", "bool", False, "Train on an adapter_path that holds another run's files: "
       "they are first moved to <adapter_path>.<date-time> (nothing is deleted). Without it such a "
       "folder is refused, unless the run resumes its checkpoint.", on_resume="this_run"),
)

#: Upstream settings our modes read; validated with the same machinery (not re-documented).
UPSTREAM_SETTINGS: tuple[Setting, ...] = tuple(
    Setting(n, k, d, h, choices=c, minimum=mn, nullable=nl, plugin=False, **kw)
    for n, k, d, h, c, mn, nl, kw in [
        ("model", "str", "mlx_model", "Base model path or id.", None, None, False, {}),
        ("data", "str", "data/", "Folder with train/valid/test.jsonl prompt files.", None, None, False, {}),
        ("train", "bool", False, "Train.", None, None, False, {"on_resume": "free"}),
        ("test", "bool", False, "Evaluate on the test prompts after training.",
         None, None, False, {"on_resume": "free"}),
        ("train_type", "str", "lora", "lora, dora or full.", ("lora", "dora", "full"), None, False, {}),
        ("train_mode", "str", "sft", "Training mode.", None, None, False, {}),
        ("batch_size", "int", 1, "Prompts per micro-batch (2 completions each).", None, 1, False, {}),
        ("iters", "int", None, "Optimizer steps (default: epochs, else 1 epoch).",
         None, 1, True, {"on_resume": "length"}),
        ("epochs", "int", None, "Passes over the training prompts.", None, 1, True, {"on_resume": "length"}),
        ("gradient_accumulation_steps", "int", 1, "Micro-batches per optimizer step.", None, 1, False, {}),
        ("micro_batch_size", "int", 1, "Pairs per scoring forward and backward (2 rows each): bounds "
         "the activation memory whatever batch_size is; null scores the whole batch at once.",
          None, 1, True, {"on_resume": "free"}),
        ("learning_rate", "float", 1e-5, "Learning rate.", None, 0.0, False, {}),
        ("lr_schedule", "dict", None, "mlx-lm learning-rate schedule.", None, None, True, {}),
        ("optimizer", "str", "adam", "Optimizer.", ("adam", "adamw", "muon"), None, False, {}),
        ("optimizer_config", "dict", {}, "Optimizer options per optimizer.", None, None, False, {}),
        ("steps_per_report", "int", 10, "Steps between metric reports.", None, 1, False, {"on_resume": "free"}),
        ("steps_per_eval", "int", 200, "Steps between validations.", None, 1, False, {"on_resume": "free"}),
        ("val_batches", "int", 25, "Validation batches (-1: all).", None, -1, False, {"on_resume": "free"}),
        ("test_batches", "int", 500, "Test batches (-1: all).", None, -1, False, {"on_resume": "free"}),
        ("save_every", "int", 100, "Steps between checkpoints.", None, 1, False, {"on_resume": "free"}),
        ("adapter_path", "str", "adapters", "Output folder.", None, None, False, {"on_resume": "folder"}),
        ("resume_adapter_file", "str", None, "Checkpoint or adapter file to resume from.",
         None, None, True, {"on_resume": "this_run"}),
        ("max_seq_length", "int", 2048, "Maximum prompt + completion length.", None, 2, False, {}),
        ("seed", "int", 0, "Random seed.", None, 0, False, {}),
        ("num_layers", "int", -1, "Layers with adapters (-1: all).", None, -1, False, {}),
        ("lora_parameters", "dict", {"rank": 8, "dropout": 0.0, "scale": 10.0}, "LoRA rank/dropout/scale.",
         None, None, False, {}),
        ("load_in_4bits", "bool", False, "Quantize the base to 4 bits.", None, None, False, {}),
        ("load_in_6bits", "bool", False, "Quantize the base to 6 bits.", None, None, False, {}),
        ("load_in_8bits", "bool", False, "Quantize the base to 8 bits.", None, None, False, {}),
        ("load_in_mxfp4", "bool", False, "Quantize the base to mxfp4.", None, None, False, {}),
        ("grad_checkpoint", "bool", False, "Gradient checkpointing.", None, None, False, {"on_resume": "free"}),
        ("fuse", "bool", False, "Fuse adapters into the model after training.",
         None, None, False, {"on_resume": "free"}),
        ("wandb", "str", None, "WandB project to report the run to (needs the wandb package).",
         None, None, True, {"on_resume": "free"}),
        ("qat_enable", "bool", False, "QAT (not applicable to online modes).", None, None, False, {}),
        ("config", "str", None, "YAML file.", None, None, True, {"on_resume": "this_run"}),
    ]
)
# fmt: on

SETTINGS: dict[str, Setting] = {s.name: s for s in UPSTREAM_SETTINGS + PLUGIN_SETTINGS}


def known_upstream_keys() -> set:
    """Every key upstream's YAML/CLI accepts (so that they are not 'unknown' to us)."""
    try:
        from mlx_lm_lora.train import CONFIG_DEFAULTS

        keys = set(CONFIG_DEFAULTS)
    except Exception:  # pragma: no cover - upstream missing
        keys = set()
    extra = "wandb list_reward_functions hf_dataset train_key mask_prompt " + " ".join(
        f"{k}_feature" for k in ("prompt", "text", "chat", "completion", "chosen", "rejected", "system")
    )  # upstream's keys that have no entry in CONFIG_DEFAULTS
    return keys | set(extra.split())


# ---------------------------------------------------------------- parsing and checking


def parse_floats(text: str) -> Any:
    """'1e-4' -> 1e-4; '1e-4,1e-5' -> [1e-4, 1e-5] (the CLI form of a per-epoch schedule)."""
    parts = [p.strip() for p in str(text).strip("[] ").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers (e.g. 1e-4,1e-5)"
        )
    if not vals:
        raise argparse.ArgumentTypeError("empty value")
    return vals[0] if len(vals) == 1 else vals


def type_name(s: Setting) -> str:
    return {
        "floats": "a number or a list of numbers",
        "float": "a number",
        "int": "an integer",
        "str": "a string",
        "bool": "true or false",
        "dict": "a mapping",
    }[s.kind]


def _check_number(s: Setting, v, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (s.kind == "int" and not isinstance(v, int)):
        raise ConfigError(where, v, f"expected {type_name(s)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(where, v, "expected a finite number")
    lo, hi = s.minimum, s.maximum
    upper = (f"< {hi}" if s.exclusive_maximum else f"<= {hi}") if hi is not None else ""
    if lo is not None and (v < lo or (s.exclusive_minimum and v == lo)):
        rng = f"> {lo}" if s.exclusive_minimum else f">= {lo}"
        raise ConfigError(where, v, f"must be {rng}" + (f" and {upper}" if upper else ""))
    if hi is not None and (v > hi or (s.exclusive_maximum and v == hi)):
        raise ConfigError(where, v, f"must be {upper}")


def check_value(s: Setting, v) -> Any:
    """Validate (and normalise) one value against its setting; raises ConfigError (a secret's
    value is shown redacted)."""
    try:
        return _check_value(s, v)
    except ConfigError as e:
        if not s.secret:
            raise
        raise ConfigError(e.setting, redact(v), e.valid, e.hint) from None


def redact(v) -> str:
    s = str(v)
    return (s[:3] + "..." + f"({len(s)} characters)") if len(s) > 3 else "***"


def _check_value(s: Setting, v) -> Any:
    if v is None:
        if s.nullable or s.default is None:
            return None
        raise ConfigError(s.name, v, f"expected {type_name(s)}")
    if s.kind == "floats":
        if isinstance(v, str):
            try:
                v = parse_floats(v)
            except argparse.ArgumentTypeError:
                raise ConfigError(s.name, v, f"expected {type_name(s)}")
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
        if s.pattern and not re.fullmatch(s.pattern, v):
            raise ConfigError(s.name, v, f"expected {s.help}")
        return v
    raise AssertionError(s.kind)


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


def read_by(name: str, mode: str) -> bool:
    """Whether the setting ``name`` (a key of :data:`SETTINGS`) is read by ``mode``."""
    s = SETTINGS.get(name)
    return s is not None and (not s.plugin or mode in s.modes)


def unused_upstream(given) -> list:
    """Upstream's settings among the keys ``given`` that the online modes do not read (options of
    its other modes, e.g. ``group_size``), sorted."""
    upstream_keys = known_upstream_keys()
    return sorted(k for k in given if k not in SETTINGS and k in upstream_keys)


def resolve(mode: str, cli: dict, explicit: set, yaml_values: dict, base: Optional[dict] = None) -> Any:
    """Merge command line > YAML > ``base`` > default for `mode` and validate every value.

    ``cli`` holds the parsed values (only those in ``explicit`` count as given); ``base`` the
    settings of a resumed checkpoint (config_resume.resolve_run). Unknown keys,
    given in the YAML or explicitly (the Python API passes every key so), are errors with a
    did-you-mean. Raises ConfigError (one line) on the first bad value.
    """
    upstream_keys = known_upstream_keys()
    given = {**{k: cli[k] for k in explicit if k in cli}, **yaml_values}
    for k, v in given.items():
        if k not in SETTINGS and k not in upstream_keys:
            raise ConfigError(k, v, "unknown setting", did_you_mean(k, set(SETTINGS) | upstream_keys))
        if k in SETTINGS and not read_by(k, mode):
            raise ConfigError(k, v, f"only used by --train-mode {' / '.join(SETTINGS[k].modes)}")
    values, base = {}, base or {}
    for name, s in SETTINGS.items():
        if name in explicit and name in cli:
            v = cli[name]
        elif name in yaml_values:
            v = yaml_values[name]
        else:
            v = base.get(name, s.default)
        values[name] = check_value(s, v)
    values["train_mode"] = mode
    a = OnlineArgs(**values)
    check_cross(a)
    return a
