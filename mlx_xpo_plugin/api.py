"""Python API shared by the two modes: a config object in, a finished run out (no CLI involved)."""

from __future__ import annotations

from typing import Any, Mapping, Union

from . import config as C
from .fast_blas import request

request()  # a program that imports the API is one of this project's: a fast BLAS goes under MLX


def as_config(mode: str, config: Union[Mapping[str, Any], Any]):
    """A dict (every key counts as given), an OnlineArgs, or a path to a YAML file -> OnlineArgs."""
    if isinstance(config, C.OnlineArgs):
        values = dict(vars(config))
    elif isinstance(config, str):
        values = {**C.load_yaml(config), "config": config}
    else:
        values = dict(config)
    values.setdefault("train", True)
    values["train_mode"] = mode
    return C.resolve(mode, values, set(values), {})


def train_mode(mode: str, config, training_callback=None, progress: bool = True) -> int:
    """Resolve `config` for `mode` and run it; returns the exit status (0 on success).
    Raises ConfigError on bad settings."""
    from .runner import run
    return run(as_config(mode, config), training_callback, progress=progress)
