"""One training run per ``adapter_path``: a lock that a killed run cannot leave stuck.

``<adapter_path>/.lock`` is held with ``flock`` for the whole run and names its holder (pid, host,
start time, command line). The kernel releases the lock when the process ends, however it ends
(SIGKILL included), so a stale file never blocks the next run. A second run on the same folder
is refused before any model is loaded, with a message naming the first.
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
    """ConfigError when ``path`` cannot be created or written (before anything is loaded)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(setting, path, f"cannot write there ({e.strerror or e})", "choose a folder you can write to")


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold(setting: str, path: str):
    """Hold the lock of ``path`` for the body; ConfigError naming the holder when it is taken."""
    if fcntl is None:
        yield
        return
    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, LOCK_NAME), "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise ConfigError(
                setting,
                path,
                f"is in use by another training run ({_holder(f.read())})",
                "wait for it to end, or set another adapter_path",
            ) from None
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
        f.close()  # releases the lock
