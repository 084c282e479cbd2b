"""Compatibility with each supported mlx-lm-lora release (``make compat``; marked ``compat``, so
left out of the default test command: it installs packages from the package index).

For each release: a fresh virtual environment gets ``mlx-lm-lora==<release>`` first, then this
project (as a user would add it); the release must still be the installed one afterwards, and
``python -m mlx_lm_lora.train`` must run 2 steps of xpo and of online_dpo on the tiny offline
model with the start-up hook path (stock upstream). pip's cache is reused; each environment is
deleted once its release is checked, so at most one exists at a time.

``MLX_XPO_COMPAT_RELEASES="5.9.0 5.10.2"`` checks other releases than the supported ones.

One more environment gets exactly the lowest versions pyproject.toml declares (each ``>=`` bound of
the dependencies that apply to this platform, pinned with ``==``): they must install together, stay
installed next to the plugin, and run the same 2 steps of each mode.

Also here: upstream's own test suite (shipped in the pinned sdist) ends the same way with and
without the series in patches/ (a few minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compat

REPO = Path(__file__).resolve().parent.parent
#: every release from the lower bound of pyproject.toml's range up to the newest one published
SUPPORTED_RELEASES = ("5.8.6", "5.9.0", "5.10.0", "5.10.1", "5.10.2")
RELEASES = tuple(os.environ.get("MLX_XPO_COMPAT_RELEASES", "").split()) or SUPPORTED_RELEASES


def sh(cmd, timeout=900, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture
def venv_with(tmp_path):
    made = []

    def make(name: str, pins: list) -> Path:
        env = tmp_path / f"venv-{name}"
        made.append(env)
        sh([sys.executable, "-m", "venv", env])
        py = env / "bin" / "python"
        sh([py, "-m", "pip", "install", "-q", *pins])
        leftover = not (REPO / "build").exists()
        sh([py, "-m", "pip", "install", "-q", REPO])  # not editable: as a user installs it
        if leftover:  # pip builds in the source tree
            shutil.rmtree(REPO / "build", ignore_errors=True)
        return py

    yield make
    for env in made:
        shutil.rmtree(env, ignore_errors=True)


def installed_version(py, name):
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    return sh([py, "-c", code]).stdout.strip()


def lowest_declared() -> dict:
    """``{distribution: version}``: the ``>=`` bound of each of pyproject.toml's dependencies that
    applies to this platform (its extras kept in the name, e.g. ``mlx[cpu]``)."""
    import tomllib

    from packaging.requirements import Requirement  # installed with transformers; only this test needs it

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        req = Requirement(dep)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (low,) = [s.version for s in req.specifier if s.operator == ">="]
        out[req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")] = low
    return out


def test_lowest_declared_covers_every_dependency():
    """The lowest set names every dependency of this platform, mlx-lm-lora at its oldest release."""
    low = lowest_declared()
    assert {"mlx-lm", "mlx-lm-lora", "pyyaml", "numpy", "pluggy", "tqdm"} <= set(low)
    assert any(k.startswith("mlx") and k not in ("mlx-lm", "mlx-lm-lora") for k in low)
    assert low["mlx-lm-lora"] == SUPPORTED_RELEASES[0]


def train_two_steps_of_each_mode(py, tmp_path, tiny_model_path, label):
    """2 steps of xpo and of online_dpo through ``python -m mlx_lm_lora.train`` in the venv of ``py``."""
    from mlx_xpo_plugin.commands.tiny import write_prompt_dataset

    data = write_prompt_dataset(tmp_path / "data")
    judge = tmp_path / "judge.py"  # never a tie: 2 steps of 6-token completions tied on letter e alone
    judge.write_text(
        "def judge(prompt, a, b):\n    return 0 if (a.count('e'), len(a)) >= (b.count('e'), len(b)) else 1\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLX_XPO_PLUGIN", "VIRTUAL_ENV")}
    env.update({"NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})
    for mode in ("xpo", "online_dpo"):
        out = tmp_path / f"ad-{mode}"
        argv = [py, "-m", "mlx_lm_lora.train", "--train-mode", mode, "--model", tiny_model_path, "--data", data]
        argv += ["--train", "--adapter-path", out, "--iters", "2", "--batch-size", "2", "--max-seq-length", "128"]
        argv += ["--judge", f"{judge}:judge", "--max-completion-length", "6"]
        argv += ["--steps-per-report", "1"]
        r = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{label} {mode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert f"train mode '{mode}' is provided by mlx-xpo-plugin" in r.stderr and "replaces the built-in" in r.stderr
        rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
        assert [x["step"] for x in rows if "judge/pairs" in x] == [1, 2]
        assert (out / "adapters.safetensors").is_file()


@pytest.mark.parametrize("release", RELEASES)
def test_release_keeps_its_version_and_trains_xpo_and_online_dpo(release, venv_with, tmp_path, tiny_model_path):
    py = venv_with(release, [f"mlx-lm-lora=={release}"])
    assert installed_version(py, "mlx-lm-lora") == release  # installing the plugin kept the release
    train_two_steps_of_each_mode(py, tmp_path, tiny_model_path, release)


def test_the_lowest_declared_versions_install_together_and_train(venv_with, tmp_path, tiny_model_path):
    """Exactly the lowest versions pyproject.toml admits, installed first, then the plugin: each is
    still the installed version, and both modes train."""
    from packaging.version import Version  # installed with transformers; only this test needs it

    low = lowest_declared()
    # wheels only: a set that installs together needs no build (pip would backtrack into old sdists)
    py = venv_with("lowest", ["--only-binary", ":all:", *(f"{name}=={version}" for name, version in low.items())])
    for name, version in low.items():
        got = installed_version(py, name.split("[")[0])
        assert Version(got) == Version(version), f"{name}: {got} installed, {version} declared as the lowest"
    train_two_steps_of_each_mode(py, tmp_path, tiny_model_path, "lowest")


def outcomes(tree: Path, junit: Path) -> dict:
    """``{test id: outcome}`` of upstream's own suite (its ``tests/``) run with pytest in ``tree``."""
    import xml.etree.ElementTree as ET

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # upstream's suite alone: no installed plugin (this project's included) takes part
    env.update({"PYTHONPATH": str(tree), "MLX_XPO_PLUGIN": "0", "MLX_LM_LORA_PLUGINS": "0", "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"]
    subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        out[f"{case.get('classname')}.{case.get('name')}"] = sorted(kinds)[0] if kinds else "passed"
    return out


def test_upstream_suite_gives_the_same_result_with_and_without_the_series(tmp_path):
    """The pinned sdist's own tests: every test present in both trees ends the same way, and the
    series' new tests pass."""
    from tests.test_patch import pin, pristine, sync

    r = sync("--dest", tmp_path / "patched")  # first: it downloads the pinned sdist that pristine() unpacks
    assert r.returncode == 0, r.stderr
    (tmp_path / "stock").mkdir()
    stock = pristine(tmp_path / "stock")
    patched = tmp_path / "patched" / f"mlx_lm_lora-{pin()['version']}"
    before, after = outcomes(stock, tmp_path / "stock.xml"), outcomes(patched, tmp_path / "patched.xml")
    assert before, "the sdist's tests did not run"
    assert {k: after.get(k) for k in before} == before
    new = {k: v for k, v in after.items() if k not in before}
    assert new and set(new.values()) == {"passed"}, new
