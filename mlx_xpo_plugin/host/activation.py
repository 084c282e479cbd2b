"""Path 2: host plugin train modes in a *stock* mlx-lm-lora, with its console script unchanged.

``mlx_xpo_plugin.pth`` (installed into site-packages by our wheel, editable or not) imports
:mod:`mlx_xpo_plugin.host._bootstrap`, which puts a finder in front of ``sys.meta_path``. When
``mlx_lm_lora.train`` is imported, :func:`find_spec` lets the normal finders locate it and wraps
its loader: the module executes unchanged, then :func:`activate` replaces

* ``build_parser`` -- upstream's parser, untouched, plus one argument group per plugin
  distribution (``parser.add_argument_group``) to which its modes' ``add_arguments`` add their own
  options; a mode reads upstream's options (``--beta``, ``--alpha``, ...) as upstream parsed them;
* ``main`` -- a plugin mode (from the command line, the dict passed to ``main``, or the YAML's
  ``train_mode``) gets the whole run: ``mode.main(args, given)`` with ``args`` after upstream's
  own YAML/default merge and its status returned (the console script exits with it); any other
  mode goes to upstream's ``main`` untouched. A mode named like a built-in one (xpo, online_dpo)
  replaces it and says so on stderr on every run, with the switch that gives the built-in back.

This mirrors what the series in ``patches/`` does inside upstream; if the installed mlx-lm-lora
has that host (``mlx_lm_lora.plugins``), nothing happens. Only argparse's public API is used: a
mode name upstream's ``--train-mode`` does not list is parsed in place of a listed one, and the
options typed are told from defaults by parsing into a namespace that already holds a marker
for each (command_line.py).
``python -m mlx_lm_lora.train`` works too: runpy asks the wrapped loader for the module's code,
and gets a three-line stub that imports the (activated) module and exits with ``main()``.
``python -m mlx_lm_lora train`` likewise: the stub for ``mlx_lm_lora.__main__`` runs upstream's
own code, then exits with the status the (wrapped) ``main`` returned (upstream discards it).

Safety: a plugin that fails to import, to register or to add its options, or that registers a
name already taken, is named on one stderr line and skipped (registry.py); the others work. A
hook point missing from upstream (an unsupported release) refuses the run: one line naming the
release, exit 2. Any other exception raised by this code is reported once, on one stderr line,
and upstream then runs exactly as if this package were not installed. Exceptions raised by a
mode's own ``main`` are the mode's and propagate. ``MLX_XPO_PLUGIN=0`` or upstream's own
``MLX_LM_LORA_PLUGINS=0`` turns activation off.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.machinery import PathFinder

from mlx_xpo_plugin.host.command_line import PLACEHOLDER, explicit_options, parse_command_line, typed
from mlx_xpo_plugin.host.startup import PACKAGE_MAIN, TARGET, plugins_enabled, report

#: what ``python -m mlx_lm_lora.train`` runs as ``__main__`` once activation is in place
RUN_AS_MAIN = "import sys\nfrom mlx_lm_lora.train import main\nsys.exit(main())\n"
#: what ``python -m mlx_lm_lora`` runs: upstream's __main__ code, then exit with main()'s status
RUN_PACKAGE_MAIN = (
    "import sys\nfrom mlx_xpo_plugin.host.activation import run_package_main\nsys.exit(run_package_main(globals()))\n"
)
#: the upstream releases this plugin supports (pyproject.toml's requirement; tests/test_packaging.py)
SUPPORTED = "mlx-lm-lora>=5.8.6,<6"
_UPSTREAM_NEEDS = ("build_parser", "main", "CONFIG_DEFAULTS", "print_banner", "print_info")


class _State:
    failed = False  # set on the first activation error: from then on upstream runs unchanged
    plugins = None  # {plugin: [modes]} of the plugins whose options upstream's parser accepts
    status = None  # what the last call of the wrapped main returned
    package_main_loader = None  # upstream's loader of mlx_lm_lora.__main__


class Unsupported(Exception):
    """The installed mlx-lm-lora lacks a hook point activation needs."""


def fail(exc) -> None:
    _State.failed = True
    report(exc)


def upstream_hosts_plugins(path=None) -> bool:
    """True when the importable mlx-lm-lora has its own plugin host (the patch is applied)."""
    if path is None:
        parent = sys.modules.get("mlx_lm_lora")
        path = getattr(parent, "__path__", None)
    return path is not None and PathFinder.find_spec("mlx_lm_lora.plugins", path) is not None


def find_spec(finder, fullname, path=None, target=None):
    """Called by the start-up finder for ``mlx_lm_lora.train``: its real spec, loader wrapped."""
    if fullname not in (TARGET, PACKAGE_MAIN) or not plugins_enabled() or upstream_hosts_plugins(path):
        return None
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(fullname, path, target)
        if spec is not None:
            break
    else:
        return None
    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
        spec.loader = TrainLoader(spec.loader)
    return spec


class TrainLoader:
    """Loads ``mlx_lm_lora.train`` with its own loader, then activates it."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, get_resource_reader, ...
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if module.__name__ != TARGET:
            return
        try:
            activate(module)
        except Unsupported as e:  # refuse clearly: one line, exit 2, no traceback
            sys.stderr.write(f"mlx-xpo-plugin: {e}\n")
            raise SystemExit(2) from None
        except Exception as e:
            fail(e)

    def get_code(self, fullname):
        # runpy (python -m) executes the code it gets here as __main__, where upstream's
        # `if __name__ == "__main__": main()` discards main's status; give it a stub.
        if sys._getframe(1).f_globals.get("__name__") == "runpy":
            if fullname == TARGET:
                return compile(RUN_AS_MAIN, f"<mlx-xpo-plugin: python -m {TARGET}>", "exec")
            if fullname == PACKAGE_MAIN:
                _State.package_main_loader = self.loader
                return compile(RUN_PACKAGE_MAIN, "<mlx-xpo-plugin: python -m mlx_lm_lora>", "exec")
        return self.loader.get_code(fullname)


def run_package_main(main_globals: dict):
    """Run upstream's ``mlx_lm_lora/__main__.py`` in ``main_globals``; the status its ``main`` returned."""
    exec(_State.package_main_loader.get_code(PACKAGE_MAIN), main_globals)
    return _State.status


def upstream_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-lm-lora")
    except PackageNotFoundError:
        return "(version unknown)"


def check_hook_points(module) -> None:
    """Raise :class:`Unsupported`, naming the release, if ``mlx_lm_lora.train`` lacks what we use."""
    missing = [n for n in _UPSTREAM_NEEDS if not hasattr(module, n)]
    if not missing and typed(module.build_parser(), ["--train-mode", PLACEHOLDER]) != {"train_mode"}:
        missing = ["a --train-mode option in build_parser()"]
    if missing:
        raise Unsupported(
            f"mlx-lm-lora {upstream_version()} is not supported: mlx_lm_lora.train has no "
            f"{', '.join(missing)} (supported: {SUPPORTED}; MLX_XPO_PLUGIN=0 runs it without this plugin)"
        )


def registry():
    """This project's registry of every plugin (ours included), loaded on first use."""
    from mlx_xpo_plugin.host.registry import default_registry

    return default_registry()


def add_plugin_options(parser: argparse.ArgumentParser, plugin: str, modes: list) -> None:
    """One argument group for ``plugin`` (its distribution and version), described by its modes,
    as upstream's host makes it; each distinct ``add_arguments`` of ``modes`` adds its options to it
    once. No group for a plugin without options."""
    adders = []
    for mode in modes:
        add = getattr(mode, "add_arguments", None)
        if add is not None and add not in adders:
            adders.append(add)
    if adders:
        group = parser.add_argument_group(plugin, f"Options of train modes {', '.join(m.name for m in modes)}.")
        for add in adders:
            add(group)


def usable_plugins(base_parser) -> dict:
    """``{plugin label: [modes]}`` of the plugins whose options ``base_parser()`` (upstream's)
    accepts next to those accepted before them; each refused plugin is named on one stderr line
    and skipped (argparse raises ArgumentError for an option that exists already)."""
    if _State.plugins is None:
        reg, by_plugin, ok = registry(), {}, {}
        for mode in reg.modes.values():
            by_plugin.setdefault(reg.owner(mode.name), []).append(mode)
        for plugin, modes in by_plugin.items():
            try:
                scratch = base_parser()
                for other, accepted in [*ok.items(), (plugin, modes)]:
                    add_plugin_options(scratch, other, accepted)
            except (Exception, SystemExit) as e:
                what = " ".join(f"{type(e).__name__}: {e}".split())
                names = ", ".join(m.name for m in modes)
                sys.stderr.write(f"mlx-xpo-plugin: skipped plugin {plugin} (train modes {names}): {what}\n")
                continue
            ok[plugin] = modes
        _State.plugins = ok
    return _State.plugins


def usable_modes(base_parser) -> dict:
    """``{name: mode}`` of the modes of :func:`usable_plugins`."""
    return {m.name: m for modes in usable_plugins(base_parser).values() for m in modes}


def _yaml(module, path):
    """The YAML config read as upstream reads it (its ``yaml_loader``)."""
    import yaml

    with open(path, "r") as f:
        return yaml.load(f, Loader=getattr(module, "yaml_loader", yaml.SafeLoader))


def _yaml_train_mode(module, path):
    if not path:
        return None
    try:
        cfg = _yaml(module, path)
    except Exception:  # unreadable: upstream will say so as it always does
        return None
    return cfg.get("train_mode") if isinstance(cfg, dict) else None


def plan(module, args, base_parser):
    """``(mode, namespace, given)`` when ``args`` selects a plugin mode, else None. ``given``
    holds what the user gave: options typed on the command line (or the keys of a dict passed to
    ``main``; for a namespace, the values that differ from the parser's defaults), plus the YAML's
    keys (see :func:`merge_like_upstream`)."""
    modes = usable_modes(base_parser)
    if args is None:
        parsed = parse_command_line(module.build_parser, sys.argv[1:], modes)
        if parsed is None:
            return None
        ns, argv = parsed
    elif isinstance(args, dict):
        ns = argparse.Namespace(**{**vars(module.build_parser().parse_args([])), **args})
    else:
        ns = argparse.Namespace(**vars(args))
    name = (
        getattr(ns, "train_mode", None)
        or _yaml_train_mode(module, getattr(ns, "config", None))
        or module.CONFIG_DEFAULTS.get("train_mode")
    )
    mode = modes.get(name)
    if mode is None:
        return None
    if args is None:
        given = explicit_options(module.build_parser(), argv)
    elif isinstance(args, dict):
        given = set(args)
    else:  # a namespace: what differs from the parser's defaults
        defaults = vars(module.build_parser().parse_args([]))
        given = {k for k, v in vars(args).items() if k not in defaults or v != defaults[k]}
    return mode, ns, given


def replacement_line(name: str, plugin: str) -> str:
    """The stderr line of a run of a plugin mode that replaces upstream's built-in one."""
    return (
        f"mlx-xpo-plugin: train mode {name!r} is provided by {plugin} and replaces the built-in one; "
        "MLX_XPO_PLUGIN=0 runs the built-in\n"
    )


def merge_like_upstream(module, ns, explicit: set) -> None:
    """Upstream main's merge, made exact: a YAML value replaces whatever the user did not type
    (upstream's merge fills only what is None, so a YAML key whose option has a default was lost),
    and counts as given (added to ``explicit``); then CONFIG_DEFAULTS fill what is still None."""
    if getattr(ns, "config", None):
        for k, v in (_yaml(module, ns.config) or {}).items():
            if k not in explicit:
                setattr(ns, k, v)
                explicit.add(k)
    for k, v in module.CONFIG_DEFAULTS.items():
        if getattr(ns, k, None) is None:
            setattr(ns, k, v)


def activate(module) -> None:
    """Wrap ``build_parser`` and ``main`` of a freshly executed ``mlx_lm_lora.train``."""
    if hasattr(module, "plugins"):  # upstream hosts plugins itself
        return
    if getattr(getattr(module, "main", None), "__mlx_xpo_plugin__", False):
        return  # already wrapped (a reload re-defines main and comes through here again)
    check_hook_points(module)
    upstream_build_parser, upstream_main = module.build_parser, module.main

    def build_parser():
        parser = upstream_build_parser()
        if _State.failed:
            return parser
        try:
            for plugin, modes in usable_plugins(upstream_build_parser).items():
                add_plugin_options(parser, plugin, modes)
        except Exception as e:
            fail(e)
            return upstream_build_parser()  # a clean one: add_arguments may have half-run
        return parser

    def main(args=None):
        _State.status = status = dispatch(args)
        return status

    def dispatch(args):
        found = None
        if not _State.failed:
            try:
                found = plan(module, args, upstream_build_parser)
            except Exception as e:
                fail(e)
        if found is None:
            return upstream_main(args)
        mode, ns, given = found
        plugin = registry().owner(mode.name)
        replaces = typed(upstream_build_parser(), ["--train-mode", mode.name]) == {"train_mode"}
        if replaces:  # on every run, where the user looks for errors
            sys.stderr.write(replacement_line(mode.name, plugin))
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # as upstream's main
        module.print_banner()
        merge_like_upstream(module, ns, given)  # a bad YAML fails here as it does in upstream
        if not replaces:
            module.print_info(f"{mode.name}: {plugin}")
        return mode.main(ns, given)

    for new, old in ((build_parser, upstream_build_parser), (main, upstream_main)):
        new.__name__, new.__qualname__, new.__doc__ = old.__name__, old.__qualname__, old.__doc__
        new.__module__, new.__wrapped__, new.__mlx_xpo_plugin__ = old.__module__, old, True
    module.build_parser, module.main = build_parser, main
    module.__mlx_xpo_plugin_activated__ = True
