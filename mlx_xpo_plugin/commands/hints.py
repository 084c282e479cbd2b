"""Commands as a user can type them: what a hint prints must work when copied into the shell."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def command(name: str, cwd: str | None = None) -> str:
    """How to run the console script ``name`` of this environment from ``cwd``.

    The bare name when the shell finds this environment's copy (the virtual environment is
    activated, or installed system-wide); else its path next to the running interpreter
    (``.venv/bin/mlx-xpo`` after ``make``), relative to ``cwd`` when it lies below it.
    """
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        return name
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(exe):
        return name
    cwd = os.path.abspath(cwd or os.getcwd())
    rel = os.path.relpath(exe, cwd)
    return rel if not rel.startswith("..") else str(exe)
