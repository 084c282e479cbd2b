"""Path 1: vendor/sync.sh builds the patched upstream from the pin; the patch hosts plugin modes.

The sdist is taken from the git-ignored cache vendor/mlx_lm_lora-<version>.tar.gz when present,
otherwise downloaded from PyPI by the script (and cached there).
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
PATCH = REPO / "patches" / "0001-add-pluggy-plugin-host-for-train-modes.patch"
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


def run(tree, cmd, *plugins, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("MLX_XPO_PLUGIN", "PYTHONPATH")}
    e.update({"NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    e["PYTHONPATH"] = os.pathsep.join([str(tree)] + [str(PLUGINS / p) for p in plugins])
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], env=e, capture_output=True, text=True, timeout=120)


# -- the sync script --------------------------------------------------------------------------


def test_sync_builds_the_patched_tree_from_the_pin(tree):
    assert (tree / "mlx_lm_lora" / "plugins.py").is_file()
    assert "plugins.add_arguments(parser)" in (tree / "mlx_lm_lora" / "train.py").read_text()
    assert "pluggy" in (tree / "requirements.txt").read_text()
    cached = REPO / "vendor" / f"mlx_lm_lora-{pin()['version']}.tar.gz"
    assert cached.is_file()  # downloaded once, then reused
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


def test_patch_applies_cleanly_to_the_pristine_sdist(tmp_path, tree):
    sdist = REPO / "vendor" / f"mlx_lm_lora-{pin()['version']}.tar.gz"
    with tarfile.open(sdist) as t:
        t.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    src = tmp_path / f"mlx_lm_lora-{pin()['version']}"
    if shutil.which("patch"):
        r = subprocess.run(
            ["patch", "-p1", "--dry-run", "--batch", "-d", src, "-i", PATCH], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert not re.search(r"offset|fuzz|FAILED|rej", r.stdout), r.stdout
    r = subprocess.run(
        ["git", "apply", "--check", "-v", PATCH.resolve()],
        cwd=src,
        capture_output=True,
        text=True,
        env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path)),
    )
    assert r.returncode == 0, r.stderr


def test_patch_is_a_small_format_patch():
    text = PATCH.read_text()
    assert text.startswith("From ") and "\nSubject: [PATCH] " in text and "\n---\n" in text
    files = re.findall(r"^diff --git a/(\S+) b/", text, flags=re.M)
    assert sorted(files) == ["mlx_lm_lora/plugins.py", "mlx_lm_lora/train.py", "requirements.txt"]
    changed = [
        ln
        for ln in text.split("\ndiff --git", 1)[1].splitlines()
        if ln[:1] in "+-" and not ln.startswith(("+++ ", "--- "))
    ]
    assert 0 < len(changed) < 120, len(changed)
    assert not [ln for ln in changed if ln.startswith("-")]  # additions only


# -- the patched upstream ---------------------------------------------------------------------


def test_patched_console_script_dispatches(tree, tmp_path):
    out = tmp_path / "echo.json"
    r = run(
        tree,
        [
            CONSOLE_SCRIPT,
            "--train-mode",
            "echo_mode",
            "--echo-out",
            out,
            "--batch-size",
            "2",
            "--echo-status",
            "4",
            "--model",
            tmp_path / "none",
        ],
        "echo",
    )
    assert r.returncode == 4, r.stderr
    assert "echo_mode: echo-plugin" in r.stdout and "Configuration Summary" not in r.stdout
    d = json.loads(out.read_text())
    assert d["explicit"] == ["batch_size", "echo_out", "echo_status", "model", "train_mode"]
    assert d["args_type"] == "argparse.Namespace"
    assert d["args"]["batch_size"] == 2 and d["args"]["train_type"] == "lora"
    assert "mlx-xpo-plugin: activation" not in r.stderr


def test_patched_main_dict_and_yaml_dispatch(tree, tmp_path):
    out = tmp_path / "echo.json"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_mode: echo_mode\necho_out: {out}\nbatch_size: 4\n")
    code = (
        "import sys; from mlx_lm_lora.train import main; "
        f"sys.exit(main({{'config': {str(cfg)!r}, 'seed': 3, 'echo_status': 5}}))"
    )
    r = run(tree, [sys.executable, "-c", code], "echo")
    assert r.returncode == 5, r.stderr
    d = json.loads(out.read_text())
    assert d["explicit"] == ["config", "echo_status", "seed"]
    a = d["args"]
    assert (a["batch_size"], a["seed"], a["train_mode"]) == (4, 3, "echo_mode")  # YAML < dict


def test_patched_upstream_makes_activation_inert(tree):
    code = (
        "import json, mlx_lm_lora.train as t; print(json.dumps([t.__file__, "
        "hasattr(t.main, '__wrapped__'), hasattr(t, '__mlx_xpo_plugin_activated__')]))"
    )
    r = run(tree, [sys.executable, "-c", code])
    path, wrapped, activated = json.loads(r.stdout)
    assert Path(path).is_relative_to(tree) and not wrapped and not activated


def test_patched_plugin_replaces_a_builtin(tree, tmp_path):
    out = tmp_path / "dpo.json"
    r = run(
        tree, [CONSOLE_SCRIPT, "--train-mode", "dpo", "--beta", "0.3"], "replace", env={"REPLACE_PLUGIN_OUT": str(out)}
    )
    assert r.returncode == 0, r.stderr
    assert "dpo: replace-plugin 1.0, replaces the built-in mode" in r.stdout
    assert json.loads(out.read_text()) == {"explicit": ["beta", "train_mode"], "train_mode": "dpo"}


def test_patched_help_lists_builtins_then_plugins(tree):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], "echo")
    assert r.returncode == 0, r.stderr
    assert "{" + BUILTINS + "," in r.stdout.replace("\n", "").replace(" ", "")
    assert "echo_mode" in r.stdout and "--echo-out" in r.stdout


def test_patched_clash_is_an_error_naming_both(tree):
    r = run(tree, [CONSOLE_SCRIPT, "--help"], "echo", "clash")
    assert r.returncode != 0
    assert re.search(
        r"PluginError: train mode 'echo_mode' is registered by two plugins: "
        r"(echo-plugin 1.0 and clash-plugin 2.0|clash-plugin 2.0 and echo-plugin 1.0)",
        r.stderr,
    ), r.stderr[-800:]


DESCRIBE = r"""
import json, sys
import mlx_lm_lora.train as t
if hasattr(t, "plugins"):
    t.plugins.train_modes = lambda: {}  # patched upstream with no plugin installed
p = t.build_parser()
acts = [[a.option_strings, a.dest, repr(a.default), repr(a.type), a.choices, a.help, a.nargs,
         type(a).__name__] for a in p._actions]
ns = vars(p.parse_args(sys.argv[1:]))
print(json.dumps({"actions": acts, "ns": ns, "usage": p.format_help()}, default=repr))
"""


def test_builtin_parsing_is_unchanged(tree):
    argv = [
        "--train-mode",
        "dpo",
        "--train",
        "--batch-size",
        "4",
        "--learning-rate",
        "2e-5",
        "--beta",
        "0.2",
        "--data",
        "d/",
    ]
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
    assert "xpo: mlx-xpo-plugin" in r.stdout and "replaces the built-in mode" in r.stdout
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [x for x in rows if "judge/pairs" in x]
    assert [x["step"] for x in train] == [1, 2]
    assert all(x["alpha"] == 1e-3 and x["temperature"] == 0.6 and x["max_completion_length"] == 6 for x in train)
    assert (out / "adapters.safetensors").is_file()
