"""The settings table in the forms users see: command-line flags (with YAML-style defaults),
the JSON Schema (``mlx-xpo schema``), the settings table of docs/settings.md and the
``judge_config`` tables of docs/judges.md."""

from __future__ import annotations

import argparse

import yaml

from .config import PLUGIN_SETTINGS, SETTINGS, Setting, parse_floats, type_name


def yaml_text(value) -> str:
    """``value`` as YAML writes it on one line (``null``, ``true``, ``1.0e-05``, ``[0.1, 0.2]``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("\n...")


#: settings of the online modes that upstream's parser defines itself (in every supported release,
#: 5.8.6 to 5.10.2): the plugin adds no option for them and reads them as upstream parsed them
UPSTREAM_OPTIONS = frozenset(
    "alpha beta delta dpo_cpo_loss_type judge max_completion_length reference_model_path temperature".split()
)


def add_arguments(group) -> None:
    """Add the online modes' own options to ``group``, the argument group the host made for this
    plugin; an option upstream already defines (:data:`UPSTREAM_OPTIONS`) is left exactly as
    upstream defines it.

    Defaults stay None (argparse), so that YAML values are never masked; the schema default
    applies when neither the command line nor the YAML gives a value.
    """
    for s in PLUGIN_SETTINGS:
        if s.name in UPSTREAM_OPTIONS:
            continue
        kind = {"floats": parse_floats, "float": float, "int": int, "str": str, "dict": yaml.safe_load}.get(s.kind)
        help_ = f"[{'/'.join(s.modes)}] {s.help} Default: {yaml_text(s.default)}."
        if s.choices:
            help_ += " One of: " + ", ".join(s.choices) + "."
        if s.kind == "bool":  # a switch: --start-over
            group.add_argument(s.flag, dest=s.name, action="store_const", const=True, default=None, help=help_)
        else:
            group.add_argument(s.flag, dest=s.name, type=kind, default=None, help=help_)


def read_upstream_options(args):
    """``args`` with upstream's forms of the options it defines read as the online modes' settings.

    Stock releases parse ``--alpha 1e-4`` with ``type=list[float]`` into its characters
    (``['1', 'e', '-', '4']``): they are joined back (``'1e-4'``, or ``'1e-4,1e-5'`` for a per-epoch
    list) for the settings check to read. A release whose ``--alpha`` takes numbers
    (``nargs="+", type=float``) gives ``[1e-4]`` or ``[1e-4, 1e-5]``, which is kept as it is.
    ``args`` itself is left unchanged."""
    values = args if isinstance(args, dict) else vars(args)
    alpha = values.get("alpha")
    if not (isinstance(alpha, list) and alpha and all(isinstance(c, str) and len(c) == 1 for c in alpha)):
        return args
    joined = {**values, "alpha": "".join(alpha)}
    return joined if isinstance(args, dict) else argparse.Namespace(**joined)


def json_schema(upstream_keys=None) -> dict:
    """JSON Schema (draft 2020-12) of a YAML config for the plugin's modes. Closed
    (``additionalProperties: false``), so that an editor flags a misspelt key as the run would:
    besides the settings table it lists the keys of mlx-lm-lora's other modes, which a run accepts
    and does not use (``upstream_keys``; default: those of the installed mlx-lm-lora)."""
    from .config import known_upstream_keys  # imports mlx_lm_lora.train: only when a schema is asked for

    other = sorted(set(known_upstream_keys() if upstream_keys is None else upstream_keys) - set(SETTINGS))

    def one(s: Setting) -> dict:
        t = {
            "float": {"type": "number"},
            "int": {"type": "integer"},
            "str": {"type": "string"},
            "bool": {"type": "boolean"},
            "dict": {"type": "object"},
        }.get(s.kind)
        if s.kind == "floats":
            num = {"type": "number"}
            t = {"oneOf": [num, {"type": "array", "items": num, "minItems": 1}]}
        t = dict(t)
        num_target = t if "type" in t else None
        if num_target is not None:
            if s.minimum is not None:
                num_target["exclusiveMinimum" if s.exclusive_minimum else "minimum"] = s.minimum
            if s.maximum is not None:
                num_target["exclusiveMaximum" if s.exclusive_maximum else "maximum"] = s.maximum
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
        "properties": {
            **{s.name: one(s) for s in SETTINGS.values()},
            **{k: {"description": "an mlx-lm-lora setting of other train modes (accepted, not used)"} for k in other},
        },
        "additionalProperties": False,
    }


def settings_markdown() -> str:
    """The settings table of docs/settings.md, generated from PLUGIN_SETTINGS."""
    rows = ["| Setting | Modes | Default | Valid | Studio | What it changes |", "|---|---|---|---|---|---|"]
    for s in PLUGIN_SETTINGS:
        valid = ", ".join(s.choices) if s.choices else _range_text(s)
        rows.append(
            f"| `{s.name}` | {', '.join(s.modes)} | `{yaml_text(s.default)}` | {valid} | "
            f"{'yes' if s.studio else ''} | {s.help} |"
        )
    return "\n".join(rows)


def options_markdown(options: dict) -> str:
    """The table of a judge's ``judge_config`` keys (docs/judges.md), from its OPTIONS."""
    rows = ["| key | default | valid | what it changes |", "|---|---|---|---|"]
    for key, s in options.items():
        valid = ", ".join(s.choices) if s.choices else _range_text(s)
        rows.append(f"| `{key}` | `{yaml_text(s.default)}` | {valid} | {s.help} |")
    return "\n".join(rows)


def _range_text(s: Setting) -> str:
    parts = [type_name(s)]
    if s.minimum is not None:
        parts.append((">" if s.exclusive_minimum else ">=") + f" {s.minimum}")
    if s.maximum is not None:
        parts.append(("<" if s.exclusive_maximum else "<=") + f" {s.maximum}")
    if s.nullable:
        parts.append("or empty")
    return " ".join(parts)
