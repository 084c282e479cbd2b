"""Data parallel (``mlx.launch``): how the processes start together, and how a process other
than 0 gets its own failure said by process 0. The processes may share no disk: only process 0
reads and writes the run's files (loop/share.py carries what the others need).

* Start-up: every process runs its own checks (process 0's include ``adapter_path``); the
  verdicts are then shared (:func:`start_together`), so all start or all refuse: process 0 prints
  the one line (its own refusal, or ``process <r> of <n> refused to start: ...``) and every
  process exits with that status.
* During training, a step that one process cannot finish ends on every process
  (share.stop_together): process 0 saves and says why.
* Any other failure of a process other than 0 ends it: it prints nothing and writes the one-line
  message to ``<adapter_path>/.process-<rank>.error`` (on its own disk: seen by process 0 only on
  a shared one). Process 0, when a collective operation fails because a process is gone
  (loop/faults.py: PeerLost), reads these files (waiting up to 3 s) and prints the message once,
  with the checkpoint that is intact and the resume command. When process 0 itself is gone,
  each surviving process says so in one line.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import sys
import time
from typing import Callable

import mlx.core as mx

from mlx_xpo_plugin.errors import ConfigError, SaveFailed
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.loop.atomic import save_json
from mlx_xpo_plugin.loop.faults import JudgeFailure, PeerLost, is_peer_loss
from mlx_xpo_plugin.loop.share import Elsewhere, exit_status, gather, wait_for_process_0


class PeerRefused(RuntimeError):
    """On process 0: another process refused to start; ``str()`` is the one line, with its reason."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.exit_status = status


def one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, (ConfigError, JudgeFailure, SaveFailed)) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


def start_together(check: Callable[[], object]):
    """``check()`` on every process, then its verdict shared: when a process refused, every
    process raises -- process 0 its own error, else :class:`PeerRefused` naming the first process
    that refused; the others :class:`.share.Elsewhere` with that status. Returns check()'s value."""
    group = mx.distributed.init()
    if group.size() == 1:
        return check()
    own, value = None, None
    try:
        value = check()
    except Exception as e:
        own = e
    verdicts = gather(None if own is None else {"status": exit_status(own), "error": one_line(own)})
    refused = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if not refused:
        return value
    rank, first = refused[0]
    if group.rank() == 0:
        if own is not None:
            raise own
        raise PeerRefused(f"process {rank} of {group.size()} refused to start: {first['error']}", first["status"])
    raise Elsewhere(first["status"])


def peer_error_file(adapter_path: str, rank: int) -> str:
    return os.path.join(adapter_path, f".process-{rank}.error")


def peer_run(cfg, rank: int, body) -> int:
    """A process other than 0. It prints nothing and writes nothing while process 0 runs: a stop
    shared with process 0 (start-up, a step, a refused resume) is said by process 0, and this
    process ends after it, with the same status; any other failure of its own goes to a file
    that process 0 reports when it finds it (a shared disk). It speaks itself only when
    process 0 is gone."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            status = body()
    except Elsewhere as e:  # process 0 says why
        status = e.exit_status
    except PeerLost as e:  # process 0 is gone: this process says so
        where = os.path.join(cfg.adapter_path, "checkpoint")
        print(f"error: {e}; its last checkpoint is on its host ({where}): resume from it", file=sys.stderr)
        return Exit.PEER
    except Exception as e:
        if is_peer_loss(mx.distributed.init().size(), e):  # process 0 gone before training: it said why
            return Exit.PEER
        with contextlib.suppress(OSError):
            save_json(peer_error_file(cfg.adapter_path, rank), {"rank": rank, "error": one_line(e)})
        return exit_status(e)
    if status:
        wait_for_process_0()
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
