"""What a run tells its user besides its results: commands as they can be typed (a hint must work
when copied into the shell), how loud a run is, the first run's kernel compile, settings the
mode or the chosen judge ignores."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.host.startup import OFF_VALUES, ON_VALUES


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


VERBOSE_ENV = "MLX_XPO_VERBOSE"


def verbose(env=None) -> bool:
    """Whether a run prints its detail lines too (upstream's model-loading lines, how the reference
    and the judge are held): ``MLX_XPO_VERBOSE=1`` (``mlx-xpo demo -v`` sets it); default off."""
    value = (os.environ if env is None else env).get(VERBOSE_ENV, "").strip().lower()
    if value in ("",) + OFF_VALUES:
        return False
    if value in ON_VALUES:
        return True
    raise ConfigError(VERBOSE_ENV, value, "use 1 (detail lines too) or 0 (the default)")


def kernel_cache(env=None, version: str | None = None) -> str:
    """Where MLX's CPU backend keeps the kernels it compiles: ``<temp>/mlx/<version>/cpu``, with
    ``<temp>`` as C++'s ``temp_directory_path()`` finds it (TMPDIR, TMP, TEMP, TEMPDIR, /tmp)."""
    import mlx.core as mx  # here: this module is imported before the BLAS under MLX is chosen

    env = os.environ if env is None else env
    temp = next((env[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if env.get(k)), "/tmp")
    return os.path.join(temp, "mlx", version or mx.__version__, "cpu")


def kernel_note(device=None, env=None, version: str | None = None) -> Optional[str]:
    """A line saying that the first steps compile kernels, when MLX runs on the CPU and its kernel
    cache holds none yet (a first run: step 1 then takes many times longer than the next)."""
    import mlx.core as mx  # here: this module is imported before the BLAS under MLX is chosen

    if (device or mx.default_device()) != mx.cpu:
        return None
    d = kernel_cache(env, version)
    try:
        cold = not any(n.startswith("lib") and n.endswith(".so") for n in os.listdir(d))
    except OSError:  # not there yet
        cold = True
    return f"compiling kernels (once; MLX keeps them in {d}): the first step takes longer" if cold else None


def note_unused_upstream(mode: str, given) -> None:
    """Print to stderr a note naming upstream's settings among the keys ``given`` that ``mode``
    does not read (options of upstream's other modes), if there are any."""
    from mlx_xpo_plugin import config  # here: `mlx-xpo --help` imports this module and stays quick

    keys = config.unused_upstream(given)
    if keys:
        print(
            f"note: --train-mode {mode} does not use {', '.join(keys)} (settings of upstream's other modes): ignored",
            file=sys.stderr,
        )


def ignored_judge_system(judge_system, factory) -> Optional[str]:
    """A note when ``judge_system`` is set for a kind of judge that reads no system prompt."""
    if judge_system and not getattr(factory, "uses_judge_system", True):
        return (
            f"note: judge_system is set, but the {factory.name} judge ignores it (only model and "
            "http judges read a system prompt)"
        )
    return None
