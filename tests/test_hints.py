"""Hints print commands that work when copied: the bare name only where the shell finds it."""

import os
import sys
from pathlib import Path

from mlx_xpo_plugin.commands import hints

BIN = Path(sys.executable).parent


def test_a_script_of_an_inactive_environment_is_shown_by_its_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert hints.command("mlx-xpo", cwd=str(tmp_path)) == str(BIN / "mlx-xpo")
    rel = hints.command("mlx-xpo", cwd=str(BIN.parent.parent))  # e.g. the repository holding .venv
    assert rel == os.path.relpath(BIN / "mlx-xpo", BIN.parent.parent) and not rel.startswith("/")


def test_the_bare_name_where_the_shell_finds_this_environments_script(monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}:/usr/bin:/bin")
    assert hints.command("mlx-xpo") == "mlx-xpo"
    assert hints.command("mlx_lm_lora.train") == "mlx_lm_lora.train"


def test_a_name_this_environment_lacks_stays_bare():
    assert hints.command("no-such-script-here") == "no-such-script-here"
