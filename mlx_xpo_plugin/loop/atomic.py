"""Atomic saves: write to a temporary file in the same folder, then rename over the target.

A run that is killed mid-save leaves the previous file intact. The file gets the mode ``open()``
would give a new file (0666 less the umask), as every other output of a run; the temporary file
is created 0600.
"""

from __future__ import annotations

import os
import tempfile

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_xpo_plugin.loop.jsonio import dumps


def new_file_mode() -> int:
    """0666 less the process's umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_arrays(path: str, arrays: dict, metadata: dict | None = None) -> None:
    atomic_write_bytes(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=metadata or {}))


def save_json(path: str, obj) -> None:
    text = dumps(obj, indent=2)  # strict JSON: NaN/inf become null

    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write_bytes(path, w)


def trainable_weights(model) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def optimizer_arrays(optimizer) -> dict:
    return {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
