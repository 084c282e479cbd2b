"""The plugin manager, entry-point loading and the TrainMode / judge registries.

Built-in modes and judges register through the same hooks as third-party plugins
(``mlx_xpo_plugin.host.builtins`` is itself an entry point of the ``mlx_lm_lora`` group).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Optional

import pluggy

from mlx_xpo_plugin.contracts import ENTRY_POINT_GROUP, PROJECT, JudgeContext, JudgeFactory, PairwiseJudge, TrainMode
from mlx_xpo_plugin.errors import ConfigError
from mlx_xpo_plugin.host import hookspecs

#: this project's own plugin: registered by name when it is not installed as a distribution
BUILTIN_PLUGIN = "mlx_xpo_plugin.host.builtins"


class DuplicateRegistration(RuntimeError):
    pass


@dataclass
class Registry:
    modes: dict = field(default_factory=dict)  # name -> TrainMode
    judges: dict = field(default_factory=dict)  # name -> JudgeFactory
    _owner: dict = field(default_factory=dict)

    def _add(self, table: dict, kind: str, name: str, obj, owner: str):
        key = (kind, name)
        if key in self._owner:
            raise DuplicateRegistration(f"{kind} {name!r} is registered by two plugins: {self._owner[key]} and {owner}")
        self._owner[key] = owner
        table[name] = obj


def _plugin_label(pm: pluggy.PluginManager, plugin) -> str:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return f"{dist.project_name} {dist.version}"
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def make_plugin_manager(load_entry_points: bool = True, extra_plugins=()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    builtin = importlib.import_module(BUILTIN_PLUGIN)  # by name, as an entry point is loaded
    if not pm.is_registered(builtin):  # not installed as a distribution (e.g. a source checkout)
        pm.register(builtin, name=BUILTIN_PLUGIN)
    for p in extra_plugins:
        pm.register(p)
    return pm


def collect(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin for its modes and judges; two plugins with one name is an error."""
    reg = Registry()
    for impl in pm.hook.register_train_modes.get_hookimpls():
        owner = _plugin_label(pm, impl.plugin)

        def add_mode(mode: TrainMode, owner=owner):
            if not mode.plugin:
                mode.plugin = owner
            reg._add(reg.modes, "train mode", mode.name, mode, owner)

        impl.function(register=add_mode)
    for impl in pm.hook.register_judges.get_hookimpls():
        owner = _plugin_label(pm, impl.plugin)
        impl.function(register=lambda f, owner=owner: reg._add(reg.judges, "judge", f.name, f, owner))
    return reg


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    return collect(make_plugin_manager())


def get_train_mode(name: str) -> Optional[TrainMode]:
    return default_registry().modes.get(name)


def judge_factory_for(spec: str, registry: Optional[Registry] = None) -> JudgeFactory:
    """The factory whose ``matches`` accepts ``spec``, highest priority first."""
    reg = registry or default_registry()
    for f in sorted(reg.judges.values(), key=lambda f: -f.priority):
        if f.matches(spec):
            return f
    raise ConfigError(
        "judge",
        spec,
        "use 'human', an http(s):// URL, 'module:callable', 'path/file.py:callable', or a local model path / model id",
    )


def check_judge(spec: str, ctx: JudgeContext, registry: Optional[Registry] = None) -> JudgeFactory:
    """Validate a ``judge`` setting without loading anything heavy (raises ConfigError)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("judge", spec, "set a judge: 'human', a URL, 'module:callable' or a model path")
    f = judge_factory_for(spec, registry)
    if f.check is not None:
        f.check(spec, ctx)
    return f


def build_judge(spec: str, ctx: JudgeContext, registry: Optional[Registry] = None) -> PairwiseJudge:
    return judge_factory_for(spec, registry).build(spec, ctx)
