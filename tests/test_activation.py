"""Path 2: our .pth + activation make a *stock* mlx-lm-lora host plugin train modes.

CLI runs go through subprocesses of this interpreter (its site-packages holds our .pth); the
test plugins of tests/plugins/ are put on PYTHONPATH as "installed" distributions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mlx_xpo_plugin.host import activation

PLUGINS = Path(__file__).resolve().parent / "plugins"
BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = BIN / "mlx_lm_lora.train"
PREFIX = "mlx-xpo-plugin: activation failed"


def run(cmd, *plugins, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if k != "MLX_XPO_PLUGIN"}
    e.update({"NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    paths = [str(PLUGINS / p) for p in plugins] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])
    if paths:
        e["PYTHONPATH"] = os.pathsep.join(paths)
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], env=e, capture_output=True, text=True, timeout=timeout)


def activation_lines(r):
    return [ln for ln in r.stderr.splitlines() if ln.startswith("mlx-xpo-plugin:")]


@pytest.fixture(scope="module", autouse=True)
def stock_upstream():
    spec = importlib.util.find_spec("mlx_lm_lora")
    if importlib.util.find_spec("mlx_lm_lora.plugins") is not None:
        pytest.skip("the installed mlx-lm-lora hosts plugins itself (patched): path 2 is inert")
    assert spec is not None


def echo(tmp_path, name="echo.json"):
    out = tmp_path / name
    return out, (lambda: json.loads(out.read_text()))


# -- start-up ------------------------------------------------------------------------------


def test_pth_is_installed_and_startup_stays_cheap():
    pth = Path(sysconfig.get_paths()["purelib"], "mlx_xpo_plugin.pth")
    (line,) = pth.read_text().splitlines()
    assert line.startswith("import ") and "__import__('mlx_xpo_plugin.host._bootstrap')" in line
    code = "import sys, json; print(json.dumps([sorted(sys.modules), [type(f).__name__ for f in sys.meta_path]]))"
    r = run([sys.executable, "-c", code])
    mods, finders = json.loads(r.stdout)
    assert finders[0] == "TrainModuleFinder"
    ours = {m for m in mods if m.startswith("mlx_xpo_plugin")}
    assert ours == {
        "mlx_xpo_plugin",
        "mlx_xpo_plugin.host",
        "mlx_xpo_plugin.host._bootstrap",
        "mlx_xpo_plugin.host.startup",
    }  # standard library only
    heavy = ("mlx", "mlx_lm", "mlx_lm_lora", "pluggy", "yaml")
    assert not [m for m in mods if m.split(".")[0] in heavy]
    off = run([sys.executable, "-c", code], env={"MLX_XPO_PLUGIN": "0"})
    mods, finders = json.loads(off.stdout)
    assert "TrainModuleFinder" not in finders
    assert not [m for m in mods if m.startswith("mlx_xpo_plugin")]  # not even imported


# -- dispatch --------------------------------------------------------------------------------


def test_console_script_dispatches_to_a_plugin_mode(tmp_path):
    out, got = echo(tmp_path)
    r = run(
        [
            CONSOLE_SCRIPT,
            "--train-mode",
            "echo_mode",
            "--echo-out",
            out,
            "--batch-size",
            "2",
            "--echo-status",
            "3",
            "--model",
            tmp_path / "no-such-model",
        ],
        "echo",
    )
    assert r.returncode == 3, r.stderr
    assert "echo_mode: echo-plugin 1.0" in r.stdout  # the host prints mode.banner()
    assert not activation_lines(r)
    d = got()
    assert d["explicit"] == ["batch_size", "echo_out", "echo_status", "model", "train_mode"]
    assert d["args_type"] == "argparse.Namespace"
    assert d["args"]["batch_size"] == 2 and d["args"]["train_mode"] == "echo_mode"
    assert d["args"]["train_type"] == "lora"  # upstream's CONFIG_DEFAULTS merge happened
    assert d["args"]["learning_rate"] == 1e-5  # an argparse default


def test_train_mode_from_the_yaml_config(tmp_path):
    out, got = echo(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_mode: echo_mode\necho_out: {out}\nbatch_size: 4\nseed: 9\n")
    r = run([CONSOLE_SCRIPT, "--config", cfg, "--seed", "5"], "echo")
    assert r.returncode == 0, r.stderr
    d = got()
    assert d["explicit"] == ["config", "seed"]
    assert (d["args"]["batch_size"], d["args"]["seed"]) == (4, 5)  # YAML < CLI


def test_main_with_a_dict_dispatches_also_after_a_reload(tmp_path):
    out, got = echo(tmp_path)
    code = (
        "import sys, importlib, mlx_lm_lora.train as t; main = importlib.reload(t).main; "
        f"sys.exit(main({{'train_mode': 'echo_mode', 'echo_out': {str(out)!r}, "
        "'batch_size': 1, 'echo_status': 6}))"
    )
    r = run([sys.executable, "-c", code], "echo")
    assert r.returncode == 6, r.stderr
    d = got()
    assert d["explicit"] == ["batch_size", "echo_out", "echo_status", "train_mode"]
    assert d["args"]["batch_size"] == 1 and d["args_type"] == "argparse.Namespace"


def test_python_dash_m_dispatches(tmp_path):
    out, got = echo(tmp_path)
    r = run(
        [
            sys.executable,
            "-m",
            "mlx_lm_lora.train",
            "--train-mode",
            "echo_mode",
            "--echo-out",
            out,
            "--echo-status",
            "4",
        ],
        "echo",
    )
    assert r.returncode == 4, r.stderr
    assert got()["explicit"] == ["echo_out", "echo_status", "train_mode"]


def test_a_plugin_replaces_a_builtin_mode(tmp_path):
    out = tmp_path / "dpo.json"
    r = run([CONSOLE_SCRIPT, "--train-mode", "dpo", "--beta", "0.5"], "replace", env={"REPLACE_PLUGIN_OUT": str(out)})
    assert r.returncode == 0, r.stderr
    assert "dpo: replace-plugin 1.0, replaces the built-in mode" in r.stdout
    assert json.loads(out.read_text()) == {"explicit": ["beta", "train_mode"], "train_mode": "dpo"}


def test_builtin_modes_still_run_upstream(tmp_path):
    r = run([CONSOLE_SCRIPT, "--train-mode", "sft", "--train", "--model", tmp_path / "missing"], "echo")
    assert r.returncode != 0
    assert "Configuration Summary" in r.stdout and "SFT" in r.stdout  # upstream's own main
    assert "echo_mode wrote" not in r.stdout and not activation_lines(r)


def test_help_lists_the_plugin_modes():
    from mlx_xpo_plugin.host.registry import default_registry

    r = run([CONSOLE_SCRIPT, "--help"], "echo")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    choices = text.split("--train-mode {", 1)[1].split("}", 1)[0].split(",")
    assert choices[:3] == ["sft", "dpo", "dsla"] and "ppo" in choices
    assert set(default_registry().modes) | {"echo_mode"} <= set(choices)
    assert "--echo-out" in text


# -- off switch and failures -------------------------------------------------------------------


def test_env_switch_turns_activation_off():
    r = run([CONSOLE_SCRIPT, "--train-mode", "echo_mode"], "echo", env={"MLX_XPO_PLUGIN": "0"})
    assert r.returncode == 2
    assert "invalid choice: 'echo_mode'" in r.stderr and not activation_lines(r)


def test_broken_plugin_is_reported_once_and_upstream_runs():
    r = run([CONSOLE_SCRIPT, "--help"], "echo", "broken")
    assert r.returncode == 0
    lines = activation_lines(r)
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "broken_plugin" in lines[0]
    assert "{sft,dpo," in r.stdout and "echo_mode" not in r.stdout  # upstream, unchanged


def test_clashing_plugins_are_reported_naming_both():
    r = run([CONSOLE_SCRIPT, "--help"], "echo", "clash")
    assert r.returncode == 0
    (line,) = activation_lines(r)
    assert "echo-plugin 1.0" in line and "clash-plugin 2.0" in line


def test_exception_inside_the_finder_never_breaks_the_import(tmp_path):
    """Make the activation module itself unimportable: the finder reports and steps aside."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['mlx_xpo_plugin.host.activation'] = None\n")
    r = run([CONSOLE_SCRIPT, "--help"], env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and "{sft,dpo," in r.stdout
    (line,) = activation_lines(r)
    assert line.startswith(PREFIX)


# -- pieces, in process ------------------------------------------------------------------------


def test_explicit_options_and_quiet_parse():
    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--a", type=int, default=3)
        p.add_argument("--flag", action="store_true")
        p.add_argument("--mode", choices=["x", "y"])
        return p

    assert activation.explicit_options(parser(), ["--a", "3", "--mode", "x"]) == {"a", "mode"}
    assert activation.explicit_options(parser(), []) == set()
    assert activation._quiet_parse(parser(), ["--mode", "z"]) is None  # error: silent, None
    assert activation._quiet_parse(parser(), ["-h"]) is None
    assert activation._quiet_parse(parser(), ["--flag"]).flag is True
