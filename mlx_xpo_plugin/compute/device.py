"""What a run asks of the device, as mlx-lm and mlx-lm-lora ask it: the wired limit.

On a GPU that reports a recommended working set (Metal: ``mx.device_info()
["max_recommended_working_set_size"]``), mlx-lm-lora's trainers call
``mx.set_wired_limit(<that size>)`` before training, mlx-lm's trainer does the same through
``maybe_set_recommended_wired_limit``, and mlx-lm's generation (``wired_limit``,
``BatchGenerator``) sets it and, when done, waits for the device and puts the previous limit back.
Memory kept wired is not paged out, so a model's weights stay resident between steps.

:func:`wired_limit` does the same around a run (training, evaluation): it sets the recommended
size where the device reports one and restores the previous limit after, and does nothing where
the device reports none (MLX's CPU backend reports only its architecture and name).
"""

from __future__ import annotations

import contextlib

import mlx.core as mx

RECOMMENDED = "max_recommended_working_set_size"


def recommended_working_set() -> int | None:
    """The device's recommended working set in bytes, or None where it reports none."""
    size = mx.device_info().get(RECOMMENDED)
    return int(size) if size else None


@contextlib.contextmanager
def wired_limit():
    """Keep up to the recommended working set wired while the block runs, then restore the
    previous limit once the device has finished (as mlx-lm's ``generate.wired_limit``); nothing
    where the device reports no recommended working set. Also a decorator."""
    size = recommended_working_set()
    if size is None:
        yield
        return
    previous = mx.set_wired_limit(size)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)
