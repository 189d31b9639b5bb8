"""The package's import structure: no cycles among src/cll modules, and the layering the design
relies on (leaf maths that every layer may import; layers that import no certifier, model or loop)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(in_functions: bool = True) -> dict[str, set[str]]:
    """Module -> the cll modules it imports: at module level, and with ``in_functions`` also inside
    functions (those run on use, after every module has loaded, so they never fail, but a circle
    through one is still two modules that cannot be understood, tested or moved apart). Importing
    a.b.c runs a, a.b and a.b.c: each counts, but for the importer's own parent packages, which are
    being imported already when it runs, unless it takes a name from one (``from . import X``
    where X is no submodule): then it needs that package's own code to have run."""
    modules = {_module_name(p): p for p in (SRC / "cll").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if in_functions else tree.body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
                if base in modules and base != name and any(f"{base}.{a.name}" not in modules for a in node.names):
                    found.add(base)  # a name defined in the package's own code
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                        found.add(prefix)
        graph[name] = found
    return graph


def test_no_import_cycle_among_the_modules():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layering_the_design_relies_on():
    graph = _imports()
    leaves = {"cll.lipschitz.operators", "cll.lipschitz.rounding"}
    for leaf in leaves:  # operator-norm and rounding maths: no layer, model or certifier
        assert graph[leaf] <= leaves | {"cll.lipschitz"}, (leaf, graph[leaf])
    above_layers = {"cll.certify", "cll.models", "cll.train", "cll.losses", "cll.cli", "cll.audit", "cll.api"}
    for module, imported in graph.items():
        if module.startswith("cll.layers"):
            assert not {m for m in imported if m.split(".")[:2] and ".".join(m.split(".")[:2]) in above_layers}, (
                module,
                imported,
            )
    for module in ("cll.grid", "cll.config", "cll.results", "cll.values"):  # `snakemake -n` imports no torch
        source = (SRC / (module.replace(".", "/") + ".py")).read_text()
        top = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any("torch" in ast.unparse(n) for n in top), module


def test_no_module_longer_than_a_sitting():
    """One concern per file, readable in one sitting: no module of src/cll over 400 lines."""
    long = {
        p.relative_to(SRC).as_posix(): n
        for p in (SRC / "cll").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
