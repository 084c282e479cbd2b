"""Python API shared by the two modes: a config object in, a finished run out (no CLI involved)."""

from __future__ import annotations

from typing import Any, Mapping, Union

from mlx_xpo_plugin import config
from mlx_xpo_plugin.commands.hints import note_unused_upstream
from mlx_xpo_plugin.cpu.fast_blas import request

request()  # a program that imports the API is one of this project's: a fast BLAS goes under MLX


def as_config(mode: str, source: Union[Mapping[str, Any], Any]):
    """A dict (every key counts as given), an OnlineArgs, or a path to a YAML file -> OnlineArgs.
    With ``resume_adapter_file``, the checkpoint's settings are the base, as on the command line
    (``{"resume_adapter_file": "adapters/xpo_int"}`` alone resumes that run; config_resume.py)."""
    from mlx_xpo_plugin.config_resume import resolve_run  # here: it loads mlx.core, after request() chose the BLAS

    if isinstance(source, config.OnlineArgs):  # every setting is a field: those of other modes are left out
        values = {k: v for k, v in vars(source).items() if config.read_by(k, mode)}
    elif isinstance(source, str):
        values = {**config.load_yaml(source), "config": source}
    else:
        values = dict(source)
    values.setdefault("train", True)
    values["train_mode"] = mode
    cfg = resolve_run(mode, values, set(values), {})
    note_unused_upstream(mode, values)
    return cfg


def train_method(method_cls, source, training_callback=None, progress: bool = True) -> int:
    """Resolve `source` (see :func:`as_config`) for the method's mode and run it; returns the
    exit status (0 on success). Raises ConfigError on bad settings, and on an ``adapter_path``
    that holds another run (as the command line does: resume it, or pass ``start_over: True``)."""
    from mlx_xpo_plugin.commands.runner import run  # here, not above: mlx.core must load after request() chose the BLAS

    return run(as_config(method_cls.mode, source), method_cls, training_callback, progress=progress)
