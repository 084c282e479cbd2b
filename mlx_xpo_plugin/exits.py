"""The exit statuses of a run: one table, used by every command and shown in docs/faults.md."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    DONE = 0  #: done, with at least one update (or the human judge quit)
    NO_UPDATE = 1  #: max_nonfinite_steps non-finite losses, or every update skipped for one
    BAD_INPUT = 2  #: bad settings, or a refused start (nothing was written)
    JUDGE = 3  #: the judge failed, or no step had a valid pair
    SAVE = 4  #: a save failed (disk full, folder not writable)
    PEER = 5  #: data parallel: another process was lost or stopped with an error
    INTERRUPTED = 130  #: Ctrl-C / SIGTERM


def of_run(result: dict, guard_status, judgeless: int) -> Exit:
    """The status of a training run from what ``OnlineTrainer.train`` returned; the first rule
    that applies: interrupted -> INTERRUPTED; a stop the fault guard asked for -> its status; a
    stop by the judge (the human judge's quit) -> DONE; any other stop -> NO_UPDATE (non-finite
    losses). Then a run without a single update is never DONE: JUDGE when some step had no valid
    pair, else NO_UPDATE."""
    status = Exit.DONE
    if result["interrupted"]:
        status = Exit.INTERRUPTED
    elif guard_status:
        status = Exit(guard_status)
    elif result["stop_reason"] and "judge" not in result["stop_reason"]:
        status = Exit.NO_UPDATE
    if status == Exit.DONE and not result["updates"]:
        status = Exit.JUDGE if judgeless else Exit.NO_UPDATE
    return status
