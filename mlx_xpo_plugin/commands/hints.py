"""What a run tells its user besides its results: commands as they can be typed (a hint must work
when copied into the shell), the line that resumes a run, how loud a run is, the first run's
kernel compile, settings the mode or the chosen judge ignores."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
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


def resume_line(mode: str, folder: str, processes: int = 1, launcher: Optional[str] = None) -> str:
    """The command that resumes the run in ``folder`` with its checkpoint's settings (the
    checkpoint keeps them: no --config, no other flag). A run of several processes is resumed
    under ``mlx.launch`` again: ``launcher`` is how this one was launched (:func:`launched_by`);
    unknown, the line says which options to give it."""
    args = f"--train-mode {mode} --resume-adapter-file {shlex.quote(folder)}"
    if processes <= 1:
        return f"{shlex.quote(command('mlx_lm_lora.train'))} {args}"
    if launcher:
        return f"{launcher} {args}"
    train = shlex.quote(command("mlx_lm_lora.train"))
    return f"mlx.launch <the options that start {processes} processes> {train} {args}"


def _argv_of(pid: int) -> Optional[list]:
    """The command line of the process ``pid``: /proc on Linux; elsewhere ``ps`` (arguments split
    at spaces: one holding a space no longer matches, and the caller gives up)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() or None


def launched_by(argv=None, parent=None) -> Optional[str]:
    """How ``mlx.launch`` started this process, up to its own arguments: the launcher's command
    line less this program's arguments (``mlx.launch -n 2 --backend ring .venv/bin/mlx_lm_lora.train``),
    read from the parent process; None when the parent is not ``mlx.launch`` (another launcher,
    a remote host: then a resume line says which options to give)."""
    mine = list(sys.argv[1:] if argv is None else argv)
    theirs = _argv_of(os.getppid()) if parent is None else list(parent)
    if not theirs or len(theirs) <= len(mine) or theirs[len(theirs) - len(mine) :] != mine:
        return None
    head = theirs[: len(theirs) - len(mine)]
    at = next((i for i, a in enumerate(head) if os.path.basename(a) == "mlx.launch"), None)
    if at is None or at + 1 >= len(head):
        return None
    ours = Path(sys.executable).with_name("mlx.launch")
    exe = command("mlx.launch") if os.path.realpath(head[at]) == os.path.realpath(ours) else head[at]
    return " ".join([shlex.quote(exe), *map(shlex.quote, head[at + 1 :])])


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
