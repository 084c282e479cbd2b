"""Path 1: vendor/sync.sh builds the patched upstream from the pin; the series hosts plugin modes.

The sdist is taken from the git-ignored cache vendor/mlx_lm_lora-<version>.tar.gz when present,
otherwise downloaded from PyPI by the script (and cached there). vendor/make-patches.sh writes
the series back from the vendored tree's commits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYNC = REPO / "vendor" / "sync.sh"
PIN = REPO / "vendor" / "mlx-lm-lora.pin"
MAKE_PATCHES = REPO / "vendor" / "make-patches.sh"
SERIES = sorted((REPO / "patches").glob("*.patch"))
PLUGINS = Path(__file__).resolve().parent / "plugins"
BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = BIN / "mlx_lm_lora.train"
BUILTINS = "sft,dpo,dsla,ftpo,cpo,orpo,grpo,klpo,online_dpo,xpo,rlhf_reinforce,ppo"


def pin():
    return dict(ln.split("=", 1) for ln in PIN.read_text().split() if "=" in ln)


def sync(*args, env=None):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SYNC), *map(str, args)], capture_output=True, text=True, env=e, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("vendor-src")
    r = sync("--dest", dest)
    assert r.returncode == 0, r.stderr
    return dest / f"mlx_lm_lora-{pin()['version']}"


def run(tree, cmd, *plugins, env=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if k not in ("MLX_XPO_PLUGIN", "PYTHONPATH")}
    e.update({"NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    e["PYTHONPATH"] = os.pathsep.join([str(tree)] + [str(PLUGINS / p) for p in plugins])
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], env=e, capture_output=True, text=True, timeout=180, cwd=cwd)


# -- the sync script --------------------------------------------------------------------------


def test_sync_builds_the_patched_tree_from_the_pin(tree):
    assert (tree / "mlx_lm_lora" / "plugins.py").is_file()
    assert "plugins.train_modes(" in (tree / "mlx_lm_lora" / "train.py").read_text()
    cached = REPO / "vendor" / f"mlx_lm_lora-{pin()['version']}.tar.gz"
    assert cached.is_file()  # downloaded once, then reused
    # a git repository: the sdist as published (tag upstream), then one commit per patch
    log = git(tree, "log", "--format=%s", "upstream..HEAD").stdout.split("\n")[:-1]
    assert log[::-1] == [subject(p) for p in SERIES]
    assert git(tree, "status", "--porcelain").stdout == ""
    # idempotent: a second run re-unpacks from scratch
    (tree / "stray.txt").write_text("x")
    r = sync("--dest", tree.parent)
    assert r.returncode == 0, r.stderr
    assert "using cached" in r.stdout and "applied 0001-" in r.stdout
    assert not (tree / "stray.txt").exists() and (tree / "mlx_lm_lora" / "plugins.py").is_file()
    assert [p.name for p in tree.parent.iterdir()] == [tree.name]  # no temp folders left


def test_wrong_hash_fails_clearly(tmp_path, tree):
    bad = tmp_path / "bad.pin"
    bad.write_text(re.sub(r"sha256=\w+", "sha256=" + "0" * 64, PIN.read_text()))
    r = sync("--pin", bad, "--dest", tmp_path / "out")
    assert r.returncode != 0
    assert "sha256 mismatch" in r.stderr and "0" * 64 in r.stderr and pin()["sha256"] in r.stderr
    assert list((tmp_path / "out").iterdir()) == []


# -- the series --------------------------------------------------------------------------------


def git(where, *args, **kw):
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(Path(where).parent))
    return subprocess.run(["git", *map(str, args)], cwd=where, capture_output=True, text=True, env=env, **kw)


def subject(patch: Path) -> str:
    head = patch.read_text().split("\n\n", 1)[0]
    line = re.search(r"^Subject: \[PATCH \d+/\d+\] (.*(?:\n .*)*)", head, flags=re.M).group(1)
    return " ".join(line.split())


def pristine(tmp_path) -> Path:
    sdist = REPO / "vendor" / f"mlx_lm_lora-{pin()['version']}.tar.gz"
    with tarfile.open(sdist) as t:
        t.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return tmp_path / f"mlx_lm_lora-{pin()['version']}"


def test_series_applies_cleanly_to_the_pristine_sdist(tmp_path, tree):
    """Each patch, on the sdist with the patches before it applied: `patch --dry-run` without
    fuzz or offset, and `git apply --check`."""
    src = pristine(tmp_path)
    assert len(SERIES) == 5
    for p in SERIES:
        if shutil.which("patch"):
            r = subprocess.run(
                ["patch", "-p1", "--dry-run", "--batch", "-d", src, "-i", p], capture_output=True, text=True
            )
            assert r.returncode == 0, r.stdout + r.stderr
            assert not re.search(r"offset|fuzz|FAILED|rej", r.stdout), r.stdout
        r = git(src, "apply", "--check", "-v", p.resolve())
        assert r.returncode == 0, r.stderr
        assert git(src, "apply", p.resolve()).returncode == 0


def test_series_is_regenerated_byte_for_byte_by_make_patches(tmp_path, tree):
    out = tmp_path / "series"
    r = subprocess.run(
        ["bash", MAKE_PATCHES, "--src", tree, "--patches", out], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in SERIES]
    for p in SERIES:
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_make_patches_refuses_uncommitted_changes(tmp_path, tree):
    work = tmp_path / tree.name
    shutil.copytree(tree, work)
    (work / "README.md").write_text("changed")
    r = subprocess.run(
        ["bash", MAKE_PATCHES, "--src", work, "--patches", tmp_path / "out"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "uncommitted changes" in r.stderr
    assert not (tmp_path / "out").exists()


# argparse's private attributes, which the series never touches (spelt without their "_" here)
PRIVATE_ARGPARSE = tuple(
    "_" + name for name in ("actions", "group_actions", "action_groups", "option_string_actions", "print_message")
)


def test_series_reads_like_upstream_commits():
    """Subjects as upstream writes them ("feat: ...", "fix: ...", "refactor: ..."), one concern
    each; one real author; no argparse internals; unittest tests under tests/ with each change."""
    subjects = [subject(p) for p in SERIES]
    assert [s.split(":")[0] for s in subjects] == ["refactor", "fix", "fix", "fix", "feat"], subjects
    authors = set()
    for p in SERIES:
        text = p.read_text()
        assert text.startswith("From 0000000000000000000000000000000000000000 ")
        assert re.match(r"(feat|fix|refactor|docs|test): [a-zA-Z-]", subject(p)), subject(p)
        authors.add(re.search(r"^From: (.*)$", text, flags=re.M).group(1))
        added = [ln for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        assert not [ln for ln in added if any(a in ln for a in PRIVATE_ARGPARSE) or "SUPPRESS" in ln]
        changed = re.findall(r"^diff --git a/(\S+) b/", text, flags=re.M)
        assert [f for f in changed if f.startswith("tests/test_")], f"{p.name} comes without a test"
    assert len(authors) == 1 and "mlx-xpo-plugin" not in authors.pop()  # not a placeholder
    files = {f for p in SERIES for f in re.findall(r"^diff --git a/(\S+) b/", p.read_text(), flags=re.M)}
    assert files == {
        "README.md",
        "mlx_lm_lora/__main__.py",
        "mlx_lm_lora/mcp_server.py",
        "mlx_lm_lora/plugins.py",
        "mlx_lm_lora/train.py",
        "mlx_lm_lora/train_modes.py",
        "tests/test_cli_help.py",
        "tests/test_config_precedence.py",
        "tests/test_entry_points.py",
        "tests/test_mcp_server.py",
        "tests/test_plugins.py",
        "tests/test_train_modes.py",
    }
    assert "import pluggy" not in "".join(p.read_text() for p in SERIES)  # no new dependency


SERIES_TESTS = ["test_train_modes", "test_entry_points", "test_config_precedence", "test_cli_help", "test_plugins"]


def test_upstream_style_tests_pass_inside_the_patched_tree(tree):
    modules = [f"tests.{m}" for m in SERIES_TESTS]
    r = run(tree, [sys.executable, "-m", "unittest", "-q", *modules], cwd=tree)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(re.search(r"Ran (\d+) tests", r.stderr).group(1)) >= 25 and "OK" in r.stderr


# -- the patched upstream ---------------------------------------------------------------------

SKIPPED = "mlx_lm_lora: skipped plugin "


def replaces(mode, dist):
    return (
        f"mlx_lm_lora: train mode {mode!r} is provided by {dist} and replaces the built-in one; "
        "MLX_LM_LORA_PLUGINS=0 runs the built-in"
    )


def said_replaced(stderr, mode, project):
    """The host's replacement lines for ``mode`` by ``project`` (any version) in ``stderr``."""
    pattern = re.escape(replaces(mode, "@")).replace("@", re.escape(project) + r" \S+")
    return [ln for ln in stderr.splitlines() if re.fullmatch(pattern, ln)]


def test_patched_console_script_dispatches(tree, tmp_path):
    out = tmp_path / "echo.json"
    argv = ["--train-mode", "echo_mode", "--echo-out", out, "--batch-size", "2", "--echo-status", "4"]
    r = run(tree, [CONSOLE_SCRIPT, *argv, "--model", tmp_path / "none"], "echo")
    assert r.returncode == 4, r.stderr
    assert "Configuration Summary" not in r.stdout and "echo_mode wrote" in r.stdout
    d = json.loads(out.read_text())
    assert d["explicit"] == ["batch_size", "echo_out", "echo_status", "model", "train_mode"]
    assert d["args_type"] == "argparse.Namespace"
    assert d["args"]["batch_size"] == 2 and d["args"]["train_type"] == "lora"
    assert SKIPPED not in r.stderr and "Traceback" not in r.stderr


def test_patched_main_dict_and_yaml_dispatch(tree, tmp_path):
    out = tmp_path / "echo.json"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_mode: echo_mode\necho_out: {out}\nbatch_size: 4\ntemperature: 0.5\n")
    code = (
        "import sys; from mlx_lm_lora.train import main; "
        f"sys.exit(main({{'config': {str(cfg)!r}, 'seed': 3, 'echo_status': 5}}))"
    )
    r = run(tree, [sys.executable, "-c", code], "echo")
    assert r.returncode == 5, r.stderr
    d = json.loads(out.read_text())
    # given: the dict's keys and the YAML's; upstream's --temperature default (1.0) is not
    assert d["explicit"] == ["batch_size", "config", "echo_out", "echo_status", "seed", "temperature", "train_mode"]
    a = d["args"]
    assert (a["batch_size"], a["seed"], a["train_mode"], a["temperature"]) == (4, 3, "echo_mode", 0.5)


def test_patched_yaml_beats_parser_defaults_for_a_builtin_mode(tree, tmp_path):
    """The series' YAML-precedence fix, seen from the CLI: a built-in mode gets the YAML's
    temperature and max_completion_length (stock keeps 1.0 and 512)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train_mode: dpo\ntemperature: 0.25\nmax_completion_length: 64\n")
    code = (
        "import sys; import mlx_lm_lora.train as t; "
        "t.run = lambda a: print('RUN', a.train_mode, a.temperature, a.max_completion_length); "
        "sys.exit(t.main())"
    )
    r = run(tree, [sys.executable, "-c", code, "--config", cfg], env={"MLX_LM_LORA_PLUGINS": "0"})
    assert r.returncode == 0, r.stderr
    assert "RUN dpo 0.25 64" in r.stdout


def test_patched_upstream_makes_activation_inert(tree):
    code = (
        "import json, mlx_lm_lora.train as t; print(json.dumps([t.__file__, "
        "hasattr(t.main, '__wrapped__'), hasattr(t, '__mlx_xpo_plugin_activated__')]))"
    )
    r = run(tree, [sys.executable, "-c", code])
    path, wrapped, activated = json.loads(r.stdout)
    assert Path(path).is_relative_to(tree) and not wrapped and not activated


def test_patched_plugin_replaces_a_builtin_and_says_so(tree, tmp_path):
    out = tmp_path / "dpo.json"
    env = {"REPLACE_PLUGIN_OUT": str(out)}
    r = run(tree, [CONSOLE_SCRIPT, "--train-mode", "dpo", "--beta", "0.3"], "replace", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines().count(replaces("dpo", "replace-plugin 1.0")) == 1
    assert json.loads(out.read_text()) == {"explicit": ["beta", "train_mode"], "train_mode": "dpo"}
    # switched off: the built-in dpo runs (and stops at the missing model)
    out.unlink()
    argv = ["--train-mode", "dpo", "--train", "--model", tmp_path / "missing"]
    r = run(tree, [CONSOLE_SCRIPT, *argv], "replace", env={**env, "MLX_LM_LORA_PLUGINS": "0"})
    assert r.returncode != 0 and "Configuration Summary" in r.stdout and "DPO" in r.stdout
    assert "mlx_lm_lora:" not in r.stderr and not out.exists()


def test_patched_help_keeps_upstream_options_and_adds_a_group_per_plugin(tree):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], "echo")
    assert r.returncode == 0, r.stderr
    assert "{" + BUILTINS + "," in r.stdout.replace("\n", "").replace(" ", "")
    head, group = r.stdout.split("\necho-plugin 1.0:\n")
    assert "--echo-out ECHO_OUT" in group and "--echo-out" not in head.split("options:")[1]
    # upstream's options read the same with the plugins as without any (after --train-mode)
    bare = run(tree, [CONSOLE_SCRIPT, "--help"], env={"MLX_LM_LORA_PLUGINS": "0"})
    ours = head.split("  --optimizer", 1)[1].split("\n\n")[0].rstrip("\n")  # the plugins' groups follow
    assert ours == bare.stdout.split("  --optimizer", 1)[1].rstrip("\n")


def test_patched_name_clash_is_named_in_one_line_and_skipped(tree):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], "echo", "clash")
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith(SKIPPED)]
    assert line == (
        "mlx_lm_lora: skipped plugin echo-plugin 1.0 (echo = echo_plugin): "
        "ValueError: train mode 'echo_mode' is provided by clash-plugin 2.0 already"
    )
    assert "echo_mode" in r.stdout and "--echo-out" not in r.stdout


@pytest.mark.parametrize(
    "plugin, says",
    [
        ("broken", "broken-plugin 0.1 (broken = broken_plugin): ImportError: broken_plugin: this test"),
        ("failreg", "failreg-plugin 0.3 (failreg = failreg_plugin): RuntimeError: failreg_plugin: "),
        ("badopts", "badopts-plugin 0.2 (badopts = badopts_plugin): ArgumentError: argument --model: "),
    ],
)
def test_patched_broken_plugin_is_named_once_and_skipped(tree, plugin, says):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], plugin, "echo")
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith(SKIPPED)]
    assert line.startswith(SKIPPED + says) and "Traceback" not in r.stderr
    text = " ".join(r.stdout.split())
    choices = set(text.split("--train-mode {", 1)[1].split("}", 1)[0].split(","))
    assert {"sft", "xpo", "echo_mode"} <= choices and not {"half_mode", "badopts_mode"} & choices
    assert "--badopts-knob" not in r.stdout  # a refused plugin leaves no option behind


def test_patched_mcp_server_lists_plugin_modes(tree):
    code = (
        "from mlx_lm_lora import mcp_server as ms; "
        "print(ms.build_config('a/b', '.', train_mode='echo_mode')[1]); "
        "print(ms.plugins.train_modes()['echo_mode'])"
    )
    r = run(tree, [sys.executable, "-c", code], "echo")
    assert r.returncode == 0, r.stderr
    errors, description = r.stdout.splitlines()[-2:]
    assert "train_mode" not in errors and description.startswith("test mode: writes its arguments")


# Depends on mlx_xpo_plugin's side of the hook contract (its modes and judge registry).


@pytest.mark.parametrize(
    "entry",
    [[CONSOLE_SCRIPT], [sys.executable, "-m", "mlx_lm_lora.train"], [sys.executable, "-m", "mlx_lm_lora", "train"]],
    ids=["console script", "python -m mlx_lm_lora.train", "python -m mlx_lm_lora train"],
)
def test_patched_ours_runs_next_to_a_broken_plugin_and_keeps_the_status(tree, entry):
    r = run(tree, [*entry, "--train-mode", "xpo", "--beta", "-1", "--model", "/nonexistent"], "broken")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines()[-1] == "error: beta: -1.0 is not valid; must be > 0.0"
    lines = r.stderr.splitlines()
    assert len(said_replaced(r.stderr, "xpo", "mlx-xpo-plugin")) == 1
    assert len([ln for ln in lines if "broken-plugin" in ln]) == 1  # named once: host and registry share the scan


def test_patched_sft_still_runs_upstream_next_to_a_broken_plugin(tree, tmp_path):
    r = run(tree, [CONSOLE_SCRIPT, "--train-mode", "sft", "--train", "--model", tmp_path / "missing"], "broken")
    assert r.returncode != 0
    assert "Configuration Summary" in r.stdout and "SFT" in r.stdout
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith(SKIPPED + "broken-plugin 0.1")]) == 1


DESCRIBE = r"""
import json, sys
import mlx_lm_lora.train as t
p = t.build_parser()
print(json.dumps({"ns": vars(p.parse_args(sys.argv[1:])), "defaults": vars(p.parse_args([])),
                  "help": p.format_help()}, default=repr))
"""


def describe(tree, argv, env):
    r = run(tree, [sys.executable, "-c", DESCRIBE, *argv], env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_builtin_parsing_is_unchanged(tree, tmp_path):
    """With no plugin, the plugin hook changes nothing (same --help and parse as the series up to
    the help-text patch); against the stock sdist, the same options, defaults and parse."""
    argv = ["--train-mode", "dpo", "--train", "--batch-size", "4", "--learning-rate", "2e-5", "--beta", "0.2"]
    argv += ["--data", "d/", "--temperature", "0.5"]
    (tmp_path / "before").mkdir()
    for p in SERIES[:-1]:
        shutil.copy(p, tmp_path / "before")
    assert sync("--dest", tmp_path / "src", "--patches", tmp_path / "before").returncode == 0
    before = tmp_path / "src" / tree.name
    no_plugin = {"MLX_LM_LORA_PLUGINS": "0", "MLX_XPO_PLUGIN": "0"}
    patched = describe(tree, argv, no_plugin)
    assert describe(before, argv, no_plugin) == patched
    stock = describe(tree, argv, {**no_plugin, "PYTHONPATH": ""})
    assert stock["ns"] == patched["ns"] and stock["defaults"] == patched["defaults"]
    options = re.compile(r"--[a-z0-9-]+")
    assert options.findall(stock["help"].split("options:")[0]) == options.findall(patched["help"].split("options:")[0])


def test_patched_upstream_runs_our_xpo_end_to_end(tree, tmp_path, tiny_model_path, prompt_data_dir):
    """Path 1 with this project's own mode: same trainer, same outputs as path 2."""
    import yaml

    out = tmp_path / "ad"
    cfg = tmp_path / "xpo.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": tiny_model_path,
                "data": prompt_data_dir,
                "train": True,
                "adapter_path": str(out),
                "judge": "mlx_xpo_plugin.rules:prefer_letter_e",
                "batch_size": 2,
                "iters": 2,
                "alpha": 1e-3,
                "temperature": 0.6,
                "max_completion_length": 6,
                "max_seq_length": 128,
                "steps_per_report": 1,
            }
        )
    )
    r = run(tree, [CONSOLE_SCRIPT, "--train-mode", "xpo", "--config", cfg])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(said_replaced(r.stderr, "xpo", "mlx-xpo-plugin")) == 1
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [x for x in rows if "judge/pairs" in x]
    assert [x["step"] for x in train] == [1, 2]
    assert all(x["alpha"] == 1e-3 and x["temperature"] == 0.6 and x["max_completion_length"] == 6 for x in train)
    assert (out / "adapters.safetensors").is_file()
