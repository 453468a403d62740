"""The house's design, read from its imports: no circle, and no arrow pointing up.

The layers (docs/design/map.md): ``detector/engine`` runs inside vLLM and needs nothing of
the sidecar, the serving tools, the model tools or the CLI; ``detector/channel`` carries
rows from the engine to the sidecar and knows neither end; the runtime (everything in
``detector/`` except ``detector/cli``) never reaches up into training (``probes/``), the
benchmarks or the CLI; training never reaches into the CLI or the benchmarks. Only the CLI
sits on top of everything.

The graph is built from the source with :mod:`ast` (nothing is imported or executed), and
counts every import: module level, inside functions, and under ``TYPE_CHECKING`` (a
type-only arrow is still an arrow a reader follows). ``from pkg import name`` counts as an
arrow to ``pkg.name`` when that is a module, else to ``pkg``; a package's ``__init__`` that
gathers its own modules is not a circle with them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("detector", "probes", "benchmarks")


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the house's packages under ``root``, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                yield f"{target}.{alias.name}"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Arrows between the house's own modules (third-party imports are left out)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            # `from pkg import name`: a module if there is one, else the package itself.
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (who, may not import, why): every arrow from a module inside `who` into `forbidden`.
RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # The runtime: detector/ less the CLI on top of it.
    ("detector", ("detector.cli",), ("probes", "benchmarks", "detector.cli")),
    ("detector.engine", (), ("detector.sidecar", "detector.serving", "detector.models",
                             "detector.cli")),
    ("detector.channel", (), ("detector.engine", "detector.sidecar", "detector.serving",
                              "detector.models", "detector.cli")),
    ("probes", (), ("detector.cli", "benchmarks")),
)


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow that breaks one of :data:`RULES`, as ``"a -> b"``."""
    bad: list[str] = []
    for who, except_, forbidden in RULES:
        for module, targets in sorted(graph.items()):
            if not _inside(module, who) or any(_inside(module, e) for e in except_):
                continue
            bad.extend(f"{module} -> {t}" for t in sorted(targets)
                       if any(_inside(t, f) for f in forbidden))
    return bad


_DYNAMIC = ("find_spec", "import_module", "__import__")


def dynamic_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Modules named by string to ``importlib`` (``find_spec``, ``import_module``,
    ``__import__``): an arrow the import statements do not show."""
    found: dict[str, set[str]] = {}
    for module, path in module_files(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name in _DYNAMIC and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.setdefault(module, set()).add(arg.value)
    return found


def test_the_graph_sees_the_imports_it_should() -> None:
    """A graph that saw nothing would pass every rule: check it reads known arrows."""
    graph = import_graph()
    assert "detector.settings" in graph["detector.engine"]  # a function-level import
    assert "detector.channel.wire" in graph["detector.channel.publisher"]
    assert "detector.sidecar.analysis" in graph["detector.sidecar.app"]
    assert any(_inside(t, "probes") for t in graph["detector.cli.commands"])  # the CLI on top


def test_the_rules_catch_an_upward_arrow_and_a_circle() -> None:
    graph = {"detector.engine.capture": {"detector.sidecar.store"},
             "detector.sidecar.store": {"probes.train"},
             "probes.train": {"detector.cli.commands", "probes.store"},
             "probes.store": {"probes.train"}, "detector.cli.commands": {"detector.artifact"}}
    assert upward_arrows(graph) == ["detector.sidecar.store -> probes.train",
                                    "detector.engine.capture -> detector.sidecar.store",
                                    "probes.train -> detector.cli.commands"]
    assert cycles(graph) == [["probes.store", "probes.train"]]


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_no_arrow_points_up() -> None:
    assert upward_arrows(import_graph()) == []


def test_no_arrow_points_up_by_name() -> None:
    """The runtime does not find training, benchmarks or the CLI by name either (the
    shipped probe used to be found with ``find_spec("probes")``)."""
    assert upward_arrows(dynamic_imports()) == []
