"""pluggy hook specifications for the project name ``mlx_lm_lora``.

A plugin is any module exposed in the ``mlx_lm_lora`` entry-point group that implements one
or both hooks with ``@hookimpl``::

    from mlx_xpo_plugin import TrainMode, hookimpl

    @hookimpl
    def register_train_modes(register):
        register(TrainMode(name="my_mode", ...))

The marker is pluggy's ``HookimplMarker("mlx_lm_lora")``; a patched mlx-lm-lora declares the same
project name and hook signatures, so one plugin module serves both integration paths.
"""

from __future__ import annotations

from typing import Callable

from mlx_xpo_plugin.contracts import JudgeFactory, TrainMode, hookspec


@hookspec
def register_train_modes(register: Callable[[TrainMode], None]) -> None:
    """Call ``register(mode)`` once for each train mode this plugin provides.

    ``mode`` is a :class:`mlx_xpo_plugin.TrainMode` or any object with ``name``, ``description``,
    ``add_arguments(group)`` (or None) and ``main(args, given)``. Registering a name that another
    plugin already registered is an error naming both plugins.
    """


@hookspec
def register_judges(register: Callable[[JudgeFactory], None]) -> None:
    """Call ``register(factory)`` for each judge kind this plugin provides.

    ``factory`` is a :class:`mlx_xpo_plugin.JudgeFactory`: a name, a ``matches(spec) -> bool``
    test on the ``judge`` setting, ``check(spec, context)`` and ``build(spec, context)``.
    """
