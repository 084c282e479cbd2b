"""The TrainMode registry: built-ins and third-party plugins register through the same hook."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mlx_xpo_plugin import __version__
from mlx_xpo_plugin.contracts import BUILTIN_TRAIN_MODES
from mlx_xpo_plugin.host.registry import collect, get_train_mode, make_plugin_manager

PLUGINS = Path(__file__).resolve().parent / "plugins"


def fresh_registry(monkeypatch, *plugin_dirs):
    """A registry built from the entry points visible with ``plugin_dirs`` on sys.path."""
    for d in plugin_dirs:
        monkeypatch.syspath_prepend(str(PLUGINS / d))
    return collect(make_plugin_manager())


def test_builtins_register_through_the_entry_point_hook():
    eps = [ep for ep in md.entry_points(group="mlx_lm_lora") if ep.value == "mlx_xpo_plugin.host.builtins"]
    assert eps, "mlx-xpo-plugin is not installed with its mlx_lm_lora entry point"
    pm = make_plugin_manager()
    owners = {impl.plugin.__name__ for impl in pm.hook.register_train_modes.get_hookimpls()}
    assert "mlx_xpo_plugin.host.builtins" in owners
    reg = collect(pm)
    for name in ("xpo", "online_dpo"):
        assert reg.owner(name) == f"mlx-xpo-plugin {__version__}"
        assert callable(reg.modes[name].main)


def test_our_modes_replace_builtins_and_share_one_add_arguments():
    """A host calls a shared add_arguments once: the options of both modes in one group."""
    xpo, online_dpo = get_train_mode("xpo"), get_train_mode("online_dpo")
    assert xpo.replaces_builtin and online_dpo.replaces_builtin
    assert xpo.add_arguments is online_dpo.add_arguments
    parser = argparse.ArgumentParser()
    xpo.add_arguments(parser.add_argument_group(f"mlx-xpo-plugin {__version__}"))
    assert parser.parse_args(["--xpo-bonus", "paper"]).xpo_bonus == "paper"


def test_builtin_names_match_upstream():
    """BUILTIN_TRAIN_MODES is upstream's own --train-mode choice list (read from its source)."""
    pkg = importlib.util.find_spec("mlx_lm_lora").submodule_search_locations[0]
    train_py = Path(pkg, "train.py")
    for node in ast.walk(ast.parse(train_py.read_text())):
        if (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--train-mode"
        ):
            choices = next(k.value for k in node.keywords if k.arg == "choices")
            assert tuple(ast.literal_eval(choices)) == BUILTIN_TRAIN_MODES
            return
    pytest.fail("no --train-mode option in upstream's train.py")


def test_third_party_mode_registers_and_runs(monkeypatch, tmp_path):
    reg = fresh_registry(monkeypatch, "echo")
    mode = reg.modes["echo_mode"]
    assert reg.owner("echo_mode") == "echo-plugin 1.0"
    assert {"xpo", "online_dpo"} <= set(reg.modes)  # ours still there

    parser = argparse.ArgumentParser()
    mode.add_arguments(parser.add_argument_group("echo-plugin 1.0"))
    out = tmp_path / "echo.json"
    args = parser.parse_args(["--echo-out", str(out), "--echo-status", "5"])
    assert mode.main(args, {"echo_out", "echo_status"}) == 5
    got = json.loads(out.read_text())
    assert got["explicit"] == ["echo_out", "echo_status"]
    assert got["args"]["echo_out"] == str(out)


def test_a_clashing_name_is_skipped_naming_both(monkeypatch):
    reg = fresh_registry(monkeypatch, "echo", "clash")
    assert reg.owner("echo_mode") == "clash-plugin 2.0"  # first by distribution name keeps it
    (line,) = reg.problems
    assert "'echo_mode'" in line and "clash-plugin 2.0 and echo-plugin 1.0" in line
    assert line.endswith("echo-plugin 1.0's is not used")
    assert {"xpo", "online_dpo"} <= set(reg.modes)


def test_a_plugin_cannot_take_our_names(monkeypatch, tmp_path):
    """A third-party plugin registering "xpo" is skipped; ours keeps the name."""
    mod = tmp_path / "takexpo_plugin.py"
    mod.write_text(
        "import pluggy\n"
        "class M:\n    name = 'xpo'\n    add_arguments = None\n"
        "@pluggy.HookimplMarker('mlx_lm_lora')\n"
        "def register_train_modes(register):\n    register(M())\n"
    )
    info = tmp_path / "aaa_takexpo-1.0.dist-info"  # sorts before mlx-xpo-plugin
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aaa-takexpo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlx_lm_lora]\ntakexpo = takexpo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = collect(make_plugin_manager())
    assert reg.owner("xpo") == f"mlx-xpo-plugin {__version__}"
    (line,) = reg.problems
    assert "'xpo'" in line and "aaa-takexpo 1.0" in line


def test_a_plugin_that_fails_to_import_is_skipped(monkeypatch):
    reg = fresh_registry(monkeypatch, "echo", "broken")
    (line,) = reg.problems
    assert line.startswith("skipped plugin broken-plugin 0.1 (entry point broken = broken_plugin): ImportError: ")
    assert {"echo_mode", "xpo", "online_dpo"} <= set(reg.modes)
    assert "xpo" in {f for f in reg.modes} and reg.judges  # ours: modes and judges


def test_a_plugin_whose_hook_raises_adds_nothing(monkeypatch):
    reg = fresh_registry(monkeypatch, "failreg", "echo")
    (line,) = reg.problems
    assert "failreg-plugin 0.3" in line and "RuntimeError: failreg_plugin: registration always fails" in line
    assert "half_mode" not in reg.modes and {"echo_mode", "xpo"} <= set(reg.modes)


def test_default_registry_reports_each_problem_on_one_line():
    import io

    from mlx_xpo_plugin.host.registry import Registry, report_problems

    out = io.StringIO()
    report_problems(Registry(problems=["skipped plugin a 1", "skipped plugin b 2"]), out)
    assert out.getvalue() == "mlx-xpo-plugin: skipped plugin a 1\nmlx-xpo-plugin: skipped plugin b 2\n"


def test_a_plugin_may_replace_a_builtin_name(monkeypatch):
    reg = fresh_registry(monkeypatch, "replace")
    assert reg.owner("dpo") == "replace-plugin 1.0"


def upstream_hosting(monkeypatch, *loaded):
    """A patched mlx-lm-lora as the registry sees it: ``mlx_lm_lora.plugins.load()`` gives the
    modules of its one scan (it has named the failures itself)."""
    import types

    import mlx_lm_lora

    host = types.ModuleType("mlx_lm_lora.plugins")
    scan = types.SimpleNamespace(plugins=[types.SimpleNamespace(module=m) for m in loaded], failures=["..."])
    host.load = lambda: scan
    monkeypatch.setitem(sys.modules, "mlx_lm_lora.plugins", host)
    monkeypatch.setattr(mlx_lm_lora, "plugins", host, raising=False)


def test_where_upstream_hosts_plugins_its_scan_is_reused(monkeypatch):
    """A broken plugin is upstream's to report: the registry scans nothing again (no second line),
    and it takes judges only (the modes are upstream's)."""
    from mlx_xpo_plugin.host import builtins

    for d in ("echo", "broken", "failreg"):
        monkeypatch.syspath_prepend(str(PLUGINS / d))
    import echo_plugin

    upstream_hosting(monkeypatch, builtins, echo_plugin)
    reg = collect(make_plugin_manager())
    assert reg.problems == [] and reg.modes == {}
    assert {"human", "http", "function", "llm"} <= set(reg.judges)


def test_a_stock_upstream_has_no_scan_to_reuse():
    from mlx_xpo_plugin.host.registry import upstream_scan

    if importlib.util.find_spec("mlx_lm_lora.plugins") is None:
        assert upstream_scan() is None
