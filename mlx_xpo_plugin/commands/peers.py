"""Data parallel (``mlx.launch``): what a process other than 0 does with its own failure, and
how process 0 reports it.

A process other than 0 prints nothing; when it stops with an error (or a non-zero status) it
writes the one-line message to ``<adapter_path>/.process-<rank>.error``. Process 0, when a
collective operation fails because a process is gone (loop/faults.py: PeerLost), reads these
files (waiting up to 3 s) and prints the message once, with the checkpoint that is intact and the
resume command. When process 0 itself is gone, each surviving process says so in one line.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import sys
import time

from mlx_xpo_plugin.errors import ConfigError, SaveFailed
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.faults import JudgeFailure, PeerLost, intact_checkpoint


def peer_error_file(adapter_path: str, rank: int) -> str:
    return os.path.join(adapter_path, f".process-{rank}.error")


def peer_run(cfg, rank: int, body) -> int:
    """A process other than 0. Its own failure goes to a file that process 0 reports (the user
    reads one message, from process 0); it speaks itself only when process 0 is gone."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            status = body()
        msg = ([x.removeprefix("error: ") for x in said.getvalue().splitlines() if x.strip()] or [""])[-1]
    except PeerLost as e:  # process 0 is gone: this process says so
        print(f"error: {e}; {intact_checkpoint(cfg.adapter_path, 'resume')}", file=sys.stderr)
        return Exit.PEER
    except Exception as e:
        status = getattr(e, "exit_status", Exit.NO_UPDATE)
        msg = str(e) if isinstance(e, (ConfigError, JudgeFailure, SaveFailed)) else f"{type(e).__name__}: {e}"
    if status:
        with contextlib.suppress(OSError):
            save_json(peer_error_file(cfg.adapter_path, rank), {"rank": rank, "error": " ".join(msg.split())[:500]})
    return status


def peer_errors(adapter_path: str, wait: float = 3.0) -> list[str]:
    """The messages processes other than 0 left (waits up to ``wait`` seconds for one); removed."""
    deadline = time.time() + wait
    while True:
        found = sorted(glob.glob(os.path.join(adapter_path, ".process-*.error")))
        if found or time.time() > deadline:
            break
        time.sleep(0.1)
    out = []
    for path in found:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                e = json.load(f)
            out.append(f"process {e['rank']} stopped: {e['error']}")
            os.remove(path)
    return out


def discard_peer_errors(adapter_path: str) -> None:
    """Process 0 ended without losing a process: the others' messages said what it said."""
    for path in glob.glob(os.path.join(adapter_path, ".process-*.error")):
        with contextlib.suppress(OSError):
            os.remove(path)
