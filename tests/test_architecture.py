"""The package's shape: no import cycle (module-level and function-level imports alike), a leaf
module of contracts that a plugin can import from the package alone, and no module over 400 lines."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_xpo_plugin"
NAME = "mlx_xpo_plugin"


def modules() -> dict:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict:
    """module -> the package modules it imports anywhere in its source (TYPE_CHECKING included)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = name.split(".") if is_pkg else name.split(".")[:-1]
                    parent = parent[: len(parent) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_contracts_is_a_leaf_and_a_plugin_needs_only_the_package():
    assert import_graph()[f"{NAME}.contracts"] == set()
    code = (
        "import sys; from mlx_xpo_plugin import TrainMode, Verdict, Judge, JudgeFactory, JudgeContext, "
        "hookimpl, ConfigError; print(sorted(m for m in sys.modules if m.startswith('mlx_xpo_plugin')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(eval(r.stdout))
    assert f"{NAME}.contracts" in loaded and not any(".loop" in m or ".commands" in m for m in loaded)


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}


def functions_called_by(module, name: str) -> dict:
    """{callee name: function} for the package's functions that ``module.name`` calls by name."""
    import inspect

    tree = ast.parse(inspect.getsource(getattr(module, name)))
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            f = getattr(module, node.func.id, None)
            if inspect.isfunction(f) and f.__module__.startswith(NAME):
                out[node.func.id] = f
    return out


def test_the_composition_root_is_named_steps_of_at_most_40_lines():
    import inspect

    from mlx_xpo_plugin.commands import runner

    steps = functions_called_by(runner, "_run")
    assert {"load_models", "build_the_judge", "build_trainer", "train", "test", "fuse"} <= set(steps)
    for name, f in {"_run": runner._run, "run": runner.run, "preflight": runner.preflight, **steps}.items():
        n = len(inspect.getsourcelines(f)[0])
        assert n <= 40, f"{name} is {n} lines"


def test_the_trainer_is_built_once_and_gets_its_parts_through_its_constructor():
    import re

    outside = [p for p in PACKAGE.rglob("*.py") if p.parent.name != "loop"]
    built = sum(p.read_text().count("OnlineTrainer(") for p in outside)
    assert built == 1  # commands/build.py: build_trainer
    for p in outside:
        set_from_outside = re.findall(r"\btrainer\.[\w.]+ = ", p.read_text())
        assert not set_from_outside, (p, set_from_outside)


def test_one_table_of_exit_statuses_and_the_docs_show_it():
    from mlx_xpo_plugin.exits import Exit

    for p in PACKAGE.rglob("*.py"):  # no status written as a number outside exits.py
        if p.name != "exits.py":
            text = p.read_text()
            assert "exit_status = 2" not in text and "exit(130)" not in text and "return 130" not in text, p
    doc = (PACKAGE.parent / "docs" / "faults.md").read_text()
    for status in Exit:
        assert f"\n| {int(status)} | " in doc, status


def test_listing_the_train_modes_loads_no_trainer():
    """A host imports the registering module to list modes (upstream's --help, its MCP server):
    that must not pull in the trainers, MLX's models or mlx-lm (4.5 s on a 2-core machine)."""
    code = (
        "import sys, mlx_xpo_plugin.host.builtins as b\n"
        "modes = []\n"
        "b.register_train_modes(modes.append)\n"
        "assert [m.name for m in modes] == ['xpo', 'online_dpo']\n"
        "heavy = ('mlx_lm', 'mlx_xpo_plugin.commands.runner', 'mlx_xpo_plugin.xpo_trainer')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx_lm' or m in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
