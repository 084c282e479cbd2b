"""The plugin manager, entry-point loading and the TrainMode / judge registries.

Built-in modes and judges register through the same hooks as third-party plugins
(``mlx_xpo_plugin.host.builtins`` is itself an entry point of the ``mlx_lm_lora`` group).
The ``mlx_lm_lora`` entry points are scanned once per process: where mlx-lm-lora hosts plugins
itself (a patched release), its scan is reused (:func:`upstream_scan`; it has named each plugin
that failed, and it owns the train modes, so only judges are collected here); on a stock release
this registry's own scan serves the start-up hook path (activation.py) and the judges alike.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import sys
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
    problems: list = field(default_factory=list)  # one line per plugin (or name) that was skipped
    _owner: dict = field(default_factory=dict)

    def owner(self, mode_name: str) -> str:
        """``"<distribution> <version>"`` of the plugin whose train mode ``mode_name`` is used."""
        return self._owner[("train mode", mode_name)]

    def _add(self, table: dict, kind: str, name: str, obj, owner: str):
        key = (kind, name)
        if key in self._owner:
            raise DuplicateRegistration(f"{kind} {name!r} is registered by two plugins: {self._owner[key]} and {owner}")
        self._owner[key] = owner
        table[name] = obj


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what per-entry-point loading learnt: labels and skipped plugins."""

    def __init__(self):
        super().__init__(PROJECT)
        self.labels: dict = {}  # id(plugin) -> "distribution version"
        self.problems: list = []
        self.upstream_hosts_modes = False  # True: the plugins came from upstream's own scan


def _plugin_label(pm: pluggy.PluginManager, plugin) -> str:
    label = getattr(pm, "labels", {}).get(id(plugin))
    return label or pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def _entry_point_label(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else f"entry point {ep.name} = {ep.value}"


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def upstream_scan():
    """The plugin modules a patched mlx-lm-lora loaded in its one scan of the entry-point group,
    or None where upstream hosts no plugins (a stock release). ``mlx_lm_lora.plugins.load()``
    scans once per process and has already named each plugin that failed; its result lists the
    plugins kept (``.plugins``, each with its ``.module``)."""
    try:
        from mlx_lm_lora import plugins  # only a patched release has it
    except ImportError:
        return None
    load = getattr(plugins, "load", None)
    if load is None:
        return None
    return [getattr(p, "module", p) for p in getattr(load(), "plugins", ())]


def load_plugins(pm: PluginManager) -> None:
    """Register the ``mlx_lm_lora`` plugins: the modules of upstream's own scan where it has one,
    else the entry points loaded one by one: one that fails to import or to register (e.g. a hook
    with a wrong signature) is recorded in ``pm.problems`` and skipped; the others load (pluggy's
    ``load_setuptools_entrypoints`` stops at the first failure)."""
    eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
    scanned = upstream_scan()
    if scanned is not None:
        pm.upstream_hosts_modes = True
        by_module = {ep.module: ep for ep in eps}
        for module in scanned:
            ep = by_module.get(getattr(module, "__name__", None))
            _register(pm, (lambda m=module: m), ep.name if ep else module.__name__, ep)
        return
    for ep in eps:
        if pm.get_plugin(ep.name) is None and not pm.is_blocked(ep.name):
            _register(pm, ep.load, ep.name, ep)


def _register(pm: PluginManager, load, name: str, ep) -> None:
    label = _entry_point_label(ep) if ep is not None else name
    try:
        plugin = load()
        if not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    except Exception as e:
        where = f" (entry point {ep.name} = {ep.value})" if ep is not None else ""
        pm.problems.append(f"skipped plugin {label}{where}: {_one_line(e)}")
        return
    pm.labels[id(plugin)] = label


def make_plugin_manager(load_entry_points: bool = True, extra_plugins=()) -> PluginManager:
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        load_plugins(pm)
    builtin = importlib.import_module(BUILTIN_PLUGIN)  # by name, as an entry point is loaded
    if not pm.is_registered(builtin):  # not installed as a distribution (e.g. a source checkout)
        pm.register(builtin, name=BUILTIN_PLUGIN)
    for p in extra_plugins:
        pm.register(p)
    return pm


def _ours_first(pm, impls):
    """This project's plugin first (its modes win a clash), then the others by label."""
    builtin = importlib.import_module(BUILTIN_PLUGIN)
    return sorted(impls, key=lambda i: (i.plugin is not builtin, _plugin_label(pm, i.plugin)))


def _collect_hook(pm, reg: Registry, hook: str, kind: str, table: dict) -> None:
    """Call ``hook`` of each plugin on its own: a plugin whose hook raises adds nothing; a name
    already taken is skipped (the first owner keeps it); both are recorded in ``reg.problems``."""
    for impl in _ours_first(pm, getattr(pm.hook, hook).get_hookimpls()):
        owner = _plugin_label(pm, impl.plugin)
        offered = []
        try:
            impl.function(register=offered.append)
        except Exception as e:
            reg.problems.append(f"skipped plugin {owner}: its {hook} hook raised {_one_line(e)}")
            continue
        for obj in offered:
            try:
                reg._add(table, kind, obj.name, obj, owner)
            except DuplicateRegistration as e:
                reg.problems.append(f"skipped {e}; {owner}'s is not used")


def collect(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin for its modes and judges (only judges where upstream hosts the modes).
    Never raises for a plugin's fault: what is skipped (hook raised, name already registered by
    another plugin) is listed in ``problems``."""
    reg = Registry(problems=list(getattr(pm, "problems", ())))
    if not getattr(pm, "upstream_hosts_modes", False):
        _collect_hook(pm, reg, "register_train_modes", "train mode", reg.modes)
    _collect_hook(pm, reg, "register_judges", "judge", reg.judges)
    return reg


def report_problems(reg: Registry, stream=None) -> None:
    """One stderr line per skipped plugin or name."""
    stream = stream or sys.stderr
    for line in reg.problems:
        stream.write(f"mlx-xpo-plugin: {line}\n")


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    reg = collect(make_plugin_manager())
    report_problems(reg)
    return reg


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
