"""One training run per ``adapter_path``: a lock that a killed run cannot leave stuck.

``<adapter_path>/.lock`` is held with ``flock`` for the whole run and names its holder (pid, host,
start time, command line). The kernel releases the lock when the process ends, however it ends
(SIGKILL included), so a stale file never blocks the next run. A second run on the same folder
is refused before any model is loaded, with a message naming the first. The holder removes the
file when it ends; a run killed by SIGKILL leaves it, unlocked, and the next run takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time

from mlx_xpo_plugin.errors import ConfigError

try:
    import fcntl
except ImportError:  # guard: not on POSIX (MLX runs on macOS and Linux); no lock there
    fcntl = None

LOCK_NAME = ".lock"


def check_writable(setting: str, path: str) -> None:
    """ConfigError when ``path`` cannot be created or written (before anything is loaded). Writes
    nothing that stays: an existing folder gets a probe file, removed at once; a missing one is
    checked on its nearest existing parent (``os.access``, which also reports a read-only mount)."""
    refuse = lambda why: ConfigError(setting, path, f"cannot write there ({why})", "choose a folder you can write to")  # noqa: E731
    if os.path.isdir(path):
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise refuse(e.strerror or e) from None
        return
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise refuse(f"{parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"{parent} is not writable")


@contextlib.contextmanager
def created(path: str):
    """Create the folder ``path`` for the body; when the body raises (a refusal after loading,
    Ctrl-C while loading, a crash), remove the folders it created that are still empty, so that
    a refused start leaves nothing behind (a folder holding files is never removed)."""
    made, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        for d in made:  # deepest first; rmdir removes only an empty folder
            try:
                os.rmdir(d)
            except OSError:
                break
        raise


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _in_use(setting: str, path: str, f) -> ConfigError:
    f.seek(0)
    return ConfigError(
        setting,
        path,
        f"is in use by another training run ({_holder(f.read())})",
        "wait for it to end, or set another adapter_path",
    )


def check_free(setting: str, path: str) -> None:
    """ConfigError naming the holder when a run holds ``path``'s lock (creates nothing)."""
    if fcntl is None:
        return
    try:
        f = open(os.path.join(path, LOCK_NAME))
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(setting, path, f) from None


@contextlib.contextmanager
def hold(setting: str, path: str):
    """Hold the lock of ``path`` for the body; ConfigError naming the holder when it is taken."""
    if fcntl is None:
        yield
        return
    lock_path = os.path.join(path, LOCK_NAME)
    f = open(lock_path, "a+")
    held = False
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(setting, path, f) from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino
        except OSError:
            same = False
        if not same:  # its last holder removed it meanwhile, and another run may have a new one
            raise ConfigError(setting, path, "is in use by another training run (it just started)", "try again")
        held = True
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv)[:300],
                }
            )
            + "\n"
        )
        f.flush()
        yield
    finally:
        if held:  # removed while still held: the next run creates a fresh one (see the inode check)
            with contextlib.suppress(OSError):
                os.remove(lock_path)
        f.close()  # releases the lock
