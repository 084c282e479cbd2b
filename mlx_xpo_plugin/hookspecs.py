"""pluggy hook specifications for the project name ``mlx_lm_lora``.

A plugin is any module exposed in the ``mlx_lm_lora`` entry-point group that implements one
or both hooks with ``@hookimpl``::

    from mlx_xpo_plugin.hookspecs import hookimpl

    @hookimpl
    def register_train_modes(register):
        register(TrainMode(name="my_mode", ...))

The marker is pluggy's ``HookimplMarker("mlx_lm_lora")``; a patched mlx-lm-lora declares the same
project name and hook signatures, so one plugin module serves both integration paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # annotations only: importing these here would cost start-up time
    from .judges.base import JudgeFactory
    from .registry import TrainMode

PROJECT = "mlx_lm_lora"
ENTRY_POINT_GROUP = "mlx_lm_lora"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_train_modes(register: Callable[["TrainMode"], None]) -> None:
    """Call ``register(mode)`` once for each train mode this plugin provides.

    ``mode`` is a :class:`mlx_xpo_plugin.registry.TrainMode`. Registering a name that another
    plugin already registered is an error naming both plugins.
    """


@hookspec
def register_judges(register: Callable[["JudgeFactory"], None]) -> None:
    """Call ``register(factory)`` for each judge kind this plugin provides.

    ``factory`` is a :class:`mlx_xpo_plugin.judges.base.JudgeFactory`: a name, a
    ``matches(spec) -> bool`` test on the ``judge`` setting, and ``build(spec, context)``.
    """
