"""The plugin manager, entry-point loading and the TrainMode / judge registries.

Built-in modes and judges register through the same hooks as third-party plugins
(``mlx_xpo_plugin.plugin`` is itself an entry point of the ``mlx_lm_lora`` group).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .errors import ConfigError
from .judges.base import JudgeContext, JudgeFactory, PairwiseJudge

#: upstream mlx-lm-lora 5.10.2's own --train-mode choices
BUILTIN_TRAIN_MODES = (
    "sft", "dpo", "dsla", "ftpo", "cpo", "orpo", "grpo", "klpo",
    "online_dpo", "xpo", "rlhf_reinforce", "ppo",
)


@dataclass
class TrainMode:
    """A train mode a plugin offers to ``mlx_lm_lora.train``.

    ``main(args, explicit)`` owns the whole run of the mode: ``args`` is upstream's namespace after
    its YAML/default merge, ``explicit`` the set of setting names given on the command line (or in
    the dict passed to ``main``); it validates before loading anything and returns an exit status.
    ``train`` / ``evaluate`` are the Python API of the mode; ``settings`` its schema.
    """

    name: str
    description: str
    main: Callable[[Any, set], int]
    train: Optional[Callable] = None
    evaluate: Optional[Callable] = None
    settings: tuple = ()
    needs_reference: bool = True
    needs_judge: bool = True
    dataset_kind: str = "prompt"  # what each dataset row must carry
    add_arguments: Optional[Callable[[Any], None]] = None  # add CLI flags to upstream's parser
    plugin: str = ""  # "<distribution> <version>", filled in at registration

    @property
    def replaces_builtin(self) -> bool:
        return self.name in BUILTIN_TRAIN_MODES

    def banner(self) -> str:
        """The line a run prints so that the user sees which implementation runs."""
        s = f"{self.name}: {self.plugin}"
        return s + (", replaces the built-in mode" if self.replaces_builtin else "")


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
            raise DuplicateRegistration(
                f"{kind} {name!r} is registered by two plugins: {self._owner[key]} and {owner}")
        self._owner[key] = owner
        table[name] = obj


def _plugin_label(pm: pluggy.PluginManager, plugin) -> str:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return f"{dist.project_name} {dist.version}"
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def make_plugin_manager(load_entry_points: bool = True, extra_plugins=()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    from . import plugin as builtin
    if not pm.is_registered(builtin):  # not installed as a distribution (e.g. a source checkout)
        pm.register(builtin, name="mlx_xpo_plugin.plugin")
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
    raise ConfigError("judge", spec, "use 'human', an http(s):// URL, 'module:callable', "
                      "'path/file.py:callable', or a local model path / model id")


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
