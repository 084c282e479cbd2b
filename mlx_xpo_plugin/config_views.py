"""The settings table in the forms users see: command-line flags (with YAML-style defaults),
the JSON Schema (``mlx-xpo schema``) and the README's settings table."""

from __future__ import annotations

import argparse

import yaml

from .config import PLUGIN_SETTINGS, SETTINGS, Setting, parse_floats, type_name


def yaml_text(value) -> str:
    """``value`` as YAML writes it on one line (``null``, ``true``, ``1.0e-05``, ``[0.1, 0.2]``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("\n...")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's flags to upstream's parser, all in one help group; fix type/help of options
    upstream already has (moved into that group).

    Defaults stay None (argparse), so that YAML values are never masked; the schema default
    applies when neither the command line nor the YAML gives a value.
    """
    existing = {a.dest: a for a in parser._actions}
    group = parser.add_argument_group("online preference (xpo, online_dpo; mlx-xpo-plugin)")
    for s in PLUGIN_SETTINGS:
        kind = {"floats": parse_floats, "float": float, "int": int, "str": str}.get(s.kind)
        help_ = f"[{'/'.join(s.modes)}] {s.help} Default: {yaml_text(s.default)}."
        if s.choices:
            help_ += " One of: " + ", ".join(s.choices) + "."
        if s.name in existing:
            act = existing[s.name]
            act.help = help_
            if s.name == "alpha":  # upstream's type=list[float] splits '1e-4' into characters
                act.type = parse_floats
            for other in parser._action_groups:  # shown with ours, not in upstream's group
                if act in other._group_actions:
                    other._group_actions.remove(act)
            group._group_actions.append(act)
            continue
        if s.kind == "bool":  # a switch: --start-over
            group.add_argument(s.flag, dest=s.name, action="store_const", const=True, default=None, help=help_)
            continue
        if s.kind == "dict":
            kind = yaml.safe_load
        group.add_argument(s.flag, dest=s.name, type=kind, default=None, help=help_)


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of a YAML config for the plugin's modes."""

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
    rows = ["| Setting | Modes | Default | Valid | Studio | What it changes |", "|---|---|---|---|---|---|"]
    for s in PLUGIN_SETTINGS:
        valid = ", ".join(s.choices) if s.choices else _range_text(s)
        rows.append(
            f"| `{s.name}` | {', '.join(s.modes)} | `{yaml_text(s.default)}` | {valid} | "
            f"{'yes' if s.studio else ''} | {s.help} |"
        )
    return "\n".join(rows)


def _range_text(s: Setting) -> str:
    parts = [type_name(s)]
    if s.minimum is not None:
        parts.append((">" if s.exclusive_minimum else ">=") + f" {s.minimum}")
    if s.maximum is not None:
        parts.append(f"<= {s.maximum}")
    if s.nullable:
        parts.append("or empty")
    return " ".join(parts)
