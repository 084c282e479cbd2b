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
    assert len(SERIES) == 3
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


def test_series_reads_like_upstream_commits():
    """Subjects as upstream writes them ("feat: ...", "fix: ...", "refactor: ..."); no argparse
    internals; tests (unittest, under tests/) and a README section come with the feature."""
    for p in SERIES:
        text = p.read_text()
        assert text.startswith("From 0000000000000000000000000000000000000000 ")
        assert re.match(r"(feat|fix|refactor|docs|test): [a-z]", subject(p)), subject(p)
        added = [ln for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        assert not [ln for ln in added if "_actions" in ln or "._option" in ln or "SUPPRESS" in ln]
    files = {f for p in SERIES for f in re.findall(r"^diff --git a/(\S+) b/", p.read_text(), flags=re.M)}
    assert files == {
        "README.md",
        "mlx_lm_lora/__main__.py",
        "mlx_lm_lora/plugins.py",
        "mlx_lm_lora/train.py",
        "tests/test_entry_points.py",
        "tests/test_mcp_server.py",
        "tests/test_plugins.py",
    }
    assert "pluggy" not in "".join(p.read_text() for p in SERIES)  # no new dependency


def test_upstream_style_tests_pass_inside_the_patched_tree(tree):
    r = run(tree, [sys.executable, "-m", "unittest", "-q", "tests.test_plugins", "tests.test_entry_points"], cwd=tree)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"Ran (\d+) tests", r.stderr) and "OK" in r.stderr


# -- the patched upstream ---------------------------------------------------------------------


def test_patched_console_script_dispatches(tree, tmp_path):
    out = tmp_path / "echo.json"
    argv = ["--train-mode", "echo_mode", "--echo-out", out, "--batch-size", "2", "--echo-status", "4"]
    r = run(tree, [CONSOLE_SCRIPT, *argv, "--model", tmp_path / "none"], "echo")
    assert r.returncode == 4, r.stderr
    assert "Training mode 'echo_mode' is provided by echo-plugin 1.0\n" in r.stdout
    assert "Configuration Summary" not in r.stdout
    d = json.loads(out.read_text())
    assert d["explicit"] == ["batch_size", "echo_out", "echo_status", "model", "train_mode"]
    assert d["args_type"] == "argparse.Namespace"
    assert d["args"]["batch_size"] == 2 and d["args"]["train_type"] == "lora"
    assert "mlx-xpo-plugin:" not in r.stderr and "mlx_lm_lora:" not in r.stderr


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
    r = run(
        tree, [CONSOLE_SCRIPT, "--train-mode", "dpo", "--beta", "0.3"], "replace", env={"REPLACE_PLUGIN_OUT": str(out)}
    )
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "Training mode 'dpo'" in ln]
    assert line.endswith(
        "Training mode 'dpo' is provided by replace-plugin 1.0, replacing the built-in mode "
        "(WandB reporting and fusing are up to the plugin)"
    )
    assert json.loads(out.read_text()) == {"explicit": ["beta", "train_mode"], "train_mode": "dpo"}


def test_patched_help_lists_builtins_then_plugins(tree):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], "echo")
    assert r.returncode == 0, r.stderr
    assert "{" + BUILTINS + "," in r.stdout.replace("\n", "").replace(" ", "")
    assert "echo_mode" in r.stdout and "--echo-out" in r.stdout


UPSTREAM_LINE = "mlx_lm_lora: skipped"


def test_patched_clash_is_named_in_one_line_and_skipped(tree):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], "echo", "clash")
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith(UPSTREAM_LINE)]
    assert line == "mlx_lm_lora: skipped train mode 'echo_mode' of echo-plugin 1.0: clash-plugin 2.0 registers it too"
    assert "echo_mode" in r.stdout


@pytest.mark.parametrize(
    "plugin, says",
    [
        ("broken", "skipped plugin broken-plugin 0.1"),
        ("failreg", "skipped plugin failreg-plugin 0.3"),
        ("badopts", "skipped train mode 'badopts_mode' of badopts-plugin 0.2"),
    ],
)
def test_patched_broken_plugin_is_named_and_skipped(tree, plugin, says):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], plugin, "echo")
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"mlx_lm_lora: {says}") and "Traceback" not in r.stderr
    text = " ".join(r.stdout.split())
    assert {"sft", "xpo", "echo_mode"} <= set(text.split("--train-mode {", 1)[1].split("}", 1)[0].split(","))


@pytest.mark.parametrize(
    "entry",
    [[CONSOLE_SCRIPT], [sys.executable, "-m", "mlx_lm_lora.train"], [sys.executable, "-m", "mlx_lm_lora", "train"]],
    ids=["console script", "python -m mlx_lm_lora.train", "python -m mlx_lm_lora train"],
)
def test_patched_ours_runs_next_to_a_broken_plugin_and_keeps_the_status(tree, entry):
    r = run(tree, [*entry, "--train-mode", "xpo", "--beta", "-1", "--model", "/nonexistent"], "broken")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.splitlines()[-1] == "error: beta: -1.0 is not valid; must be > 0.0"
    assert "Training mode 'xpo' is provided by mlx-xpo-plugin" in r.stdout


def test_patched_sft_still_runs_upstream_next_to_a_broken_plugin(tree, tmp_path):
    r = run(tree, [CONSOLE_SCRIPT, "--train-mode", "sft", "--train", "--model", tmp_path / "missing"], "broken")
    assert r.returncode != 0
    assert "Configuration Summary" in r.stdout and "SFT" in r.stdout
    assert r.stderr.startswith(f"{UPSTREAM_LINE} plugin broken-plugin 0.1")


DESCRIBE = r"""
import json, sys
import mlx_lm_lora.train as t
if hasattr(t, "plugins"):
    t.plugins.entry_points = lambda **kw: []  # patched upstream with no plugin installed
p = t.build_parser()
acts = [[a.option_strings, a.dest, repr(a.default), repr(a.type), a.choices, a.help, a.nargs,
         type(a).__name__] for a in p._actions]
ns = vars(p.parse_args(sys.argv[1:]))
print(json.dumps({"actions": acts, "ns": ns, "usage": p.format_help()}, default=repr))
"""


def test_builtin_parsing_is_unchanged(tree):
    """The stock 5.10.2 tree and the patched one with no plugin: same actions, parse and --help."""
    argv = ["--train-mode", "dpo", "--train", "--batch-size", "4", "--learning-rate", "2e-5", "--beta", "0.2"]
    argv += ["--data", "d/"]
    stock = run(tree, [sys.executable, "-c", DESCRIBE, *argv], env={"PYTHONPATH": "", "MLX_XPO_PLUGIN": "0"})
    patched = run(tree, [sys.executable, "-c", DESCRIBE, *argv])
    assert stock.returncode == 0 and patched.returncode == 0, stock.stderr + patched.stderr
    assert json.loads(stock.stdout) == json.loads(patched.stdout)


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
    assert "Training mode 'xpo' is provided by mlx-xpo-plugin" in r.stdout and "replacing the built-in" in r.stdout
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [x for x in rows if "judge/pairs" in x]
    assert [x["step"] for x in train] == [1, 2]
    assert all(x["alpha"] == 1e-3 and x["temperature"] == 0.6 and x["max_completion_length"] == 6 for x in train)
    assert (out / "adapters.safetensors").is_file()
