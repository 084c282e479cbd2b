"""Data parallel on hosts that share no disk: process 0 reads, every process receives.

Under ``mlx.launch`` the processes may run on machines that share no disk, so only process 0
reads (and writes) the run's files. What the others need from them goes through MLX's
distributed operations: bytes are summed with ``all_sum`` over the group, process 0 giving the
value and every other process zeros, so the sum is process 0's value on every process, bit for
bit (arrays travel as their bytes: no float addition ever touches them).

* :func:`from_rank0` -- ``read()`` on process 0, its JSON-able value on every process.
* :func:`arrays_from_rank0` -- the same for a dict of arrays (names, shapes and dtypes first).
* :func:`gather` -- one JSON-able value from every process, the list of them on every process.
* :func:`stop_together` -- a step that one process cannot finish (its judge raised or asked to
  stop) ends on every process, with that process's reason.
* :func:`first_said` -- the first process's text of several (a judge's last error, for process 0's line).
* :func:`wait_for_process_0` -- a process that stops with process 0 ends after it, and
  :func:`ignore_sigterm` lets a process whose run is over end with its status (mlx.launch's
  SIGTERM comes while it ends).

An exception raised by ``read()`` on process 0 is raised there as it was; every other process
raises :class:`Elsewhere` with the exit status process 0 will end with (process 0 says why; the
others stop silently with the same status). With one process each is a plain call.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np

from mlx_xpo_plugin.errors import StopTraining
from mlx_xpo_plugin.exits import Exit
from mlx_xpo_plugin.loop.faults import JudgeFailure


class Elsewhere(Exception):
    """Raised on a process whose run stops because of an error another process reports: it
    prints nothing and ends with ``exit_status``, the status of the process that says why."""

    def __init__(self, exit_status: int, message: str = ""):
        super().__init__(message or f"stopped with process 0 (exit status {exit_status})")
        self.exit_status = exit_status


def group():
    return mx.distributed.init()


def _sum(x):
    return mx.distributed.all_sum(x, group=group())


def _bytes_from_rank0(data: bytes) -> bytes:
    """``data`` of process 0 on every process (the others pass b"")."""
    n = int(_sum(mx.array([len(data)], dtype=mx.int32)).item())
    if n == 0:
        return b""
    mine = mx.array(np.frombuffer(data, dtype=np.uint8)) if data else mx.zeros((n,), dtype=mx.uint8)
    return bytes(np.array(_sum(mine), copy=False))


def exit_status(e: BaseException) -> int:
    """The status a run ends with for the error ``e`` (its ``exit_status``; a judge's: JUDGE)."""
    if isinstance(e, KeyboardInterrupt):
        return Exit.INTERRUPTED
    return int(getattr(e, "exit_status", Exit.JUDGE if isinstance(e, JudgeFailure) else Exit.NO_UPDATE))


def from_rank0(read: Callable[[], Any]) -> Any:
    """``read()`` called on process 0 only; its value (JSON-able) returned on every process.
    An exception of ``read()`` is raised on process 0, :class:`Elsewhere` on the others."""
    g = group()
    if g.size() == 1:
        return read()
    if g.rank() != 0:
        got = json.loads(_bytes_from_rank0(b""))
        if "raised" in got:
            raise Elsewhere(got["raised"])
        return got["value"]
    try:
        value = read()
    except BaseException as e:
        _bytes_from_rank0(json.dumps({"raised": exit_status(e)}).encode())
        raise
    _bytes_from_rank0(json.dumps({"value": value}).encode())
    return value


def arrays_from_rank0(read: Callable[[], dict]) -> dict:
    """``read()`` (a dict of name -> mx.array) called on process 0 only; the same arrays, bit for
    bit, on every process (each array's bytes summed with zeros)."""
    g = group()
    if g.size() == 1:
        return read()
    held: dict = {}

    def spec():
        held.update(read())
        return {k: [list(v.shape), str(v.dtype).removeprefix("mlx.core.")] for k, v in held.items()}

    out = {}
    for name, (shape, dtype) in from_rank0(spec).items():
        dt = getattr(mx, dtype)
        size = int(np.prod(shape)) if shape else 1
        if size == 0:
            out[name] = mx.zeros(shape, dtype=dt)
            continue
        mine = mx.view(held[name].reshape(-1), mx.uint8) if g.rank() == 0 else mx.zeros((size * dt.size,), mx.uint8)
        summed = _sum(mine)
        out[name] = mx.view(summed, dt).reshape(shape)
    mx.eval(out)
    return out


def gather(value: Any) -> list:
    """Every process's ``value`` (JSON-able), in rank order, on every process."""
    g = group()
    if g.size() == 1:
        return [value]
    mine = json.dumps(value).encode()
    sizes = np.zeros(g.size(), dtype=np.int32)
    sizes[g.rank()] = len(mine)
    sizes = np.array(_sum(mx.array(sizes)))
    width = int(sizes.max())
    rows = np.zeros((g.size(), max(1, width)), dtype=np.uint8)
    rows[g.rank(), : len(mine)] = np.frombuffer(mine, dtype=np.uint8)
    rows = np.array(_sum(mx.array(rows)))
    return [json.loads(bytes(rows[r, : sizes[r]])) for r in range(g.size())]


def stop_together(failure: Optional[BaseException]) -> None:
    """Called by every process once some process of the step failed (the step's counts said so):
    raises the first failing process's error on every process -- JudgeFailure (its message naming
    the process) or StopTraining -- so that all take the same way out of the step, and process 0
    saves and says why."""
    g = group()
    mine = None
    if failure is not None:
        mine = {"stop": isinstance(failure, StopTraining), "message": " ".join(str(failure).split())[:500]}
    rank, said = next((r, x) for r, x in enumerate(gather(mine)) if x is not None)
    if said["stop"]:
        raise StopTraining(said["message"])
    raise JudgeFailure(f"{said['message']} (on process {rank} of {g.size()})" if rank else said["message"])


def first_said(text: Optional[str]) -> Optional[str]:
    """Every process's ``text`` (None: nothing to say); the first one, naming its process when it
    is not process 0's, on every process."""
    said = [(r, x) for r, x in enumerate(gather(text)) if x is not None]
    if not said:
        return None
    rank, first = said[0]
    return first if rank == 0 else f"{first} (on process {rank} of {group().size()})"


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: what the backend itself prints about a closed connection."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def wait_for_process_0() -> None:
    """Return once process 0 has ended: a collective operation that only its exit completes (with
    an error). A process that stops together with process 0 calls this before it exits, since
    mlx.launch terminates every process as soon as one ends with a non-zero status: process 0
    is not cut short before it has saved and said why. This process ends next, with the same
    status: the SIGTERM mlx.launch sends it once process 0 has ended is ignored from here on."""
    if group().size() == 1:
        return
    ignore_sigterm()
    with _quiet_stderr(), contextlib.suppress(RuntimeError):
        mx.eval(_sum(mx.array(0)))


def ignore_sigterm() -> None:
    """Data parallel, a process whose run is over (it ends next, with its status): mlx.launch
    sends SIGTERM to every process once one has ended with a non-zero status, and a process still
    ending (Python's and MLX's teardown, after which the others see it gone) would be killed by it
    and reported with code -15. Ignored, not handled: a Python handler is removed before that
    teardown ends. Only under mlx.launch and in the main thread."""
    if group().size() > 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
