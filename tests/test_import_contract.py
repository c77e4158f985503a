"""The import contract: every module sits in one layer and imports only the layers below it (or
its own), and no modules import each other in a circle. Read from the source with `ast`, every
`import` and `from` statement counted, function-level ones included (a lazy import still ties
the layers). Only the repository's packages (fewstep, metrics, methods) are checked.

Layer table (a module may import its own layer and the layers in "may import"):

    layer       modules                                            may import
    core        fewstep/*.py not named below, fewstep/backbones,   -
                fewstep/toy (the toy world and its teachers are
                shared by every layer above)
    engine      fewstep/engine                                     core
    methods     methods/                                           core, engine
    metrics     metrics/                                           core
    evaluation  fewstep/scoring.py, fewstep/pairing.py,            core, metrics
                fewstep/cells.py, fewstep/audit.py,
                fewstep/shards.py (sample-set shards),
                fewstep/reporting (score files and reports)
    commands    fewstep/commands (argparse wrappers)               core, engine, methods, metrics,
                                                                   evaluation (no other command)
    entry       fewstep/cli.py, fewstep/__main__.py                 every layer

So: the core imports no engine, method, metric or command; the engine no method, metric or
command; metrics no method; nothing but the CLI dispatcher imports fewstep.commands. Plugins are
reached by name through fewstep.registry (importlib at run time), which is not an import edge.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fewstep", "metrics", "methods")

MAY_IMPORT = {
    "core": {"core"},
    "engine": {"core", "engine"},
    "methods": {"core", "engine", "methods"},
    "metrics": {"core", "metrics"},
    "evaluation": {"core", "metrics", "evaluation"},
    "commands": {"core", "engine", "methods", "metrics", "evaluation"},
    "entry": {"core", "engine", "methods", "metrics", "evaluation", "commands", "entry"},
}
EVALUATION = ("fewstep.scoring", "fewstep.pairing", "fewstep.cells", "fewstep.audit",
              "fewstep.shards", "fewstep.reporting")
ENTRY = ("fewstep.cli", "fewstep.__main__")

# Known violations, to be emptied: (importing file, imported module) -> why it is still there.
ALLOWED: dict[tuple[str, str], str] = {}  # known violations, each with its reason (none)


def layer_of(module: str) -> str:
    """The layer of a dotted module name of this repository."""
    top = module.split(".")[0]
    if top in ("metrics", "methods"):
        return top
    if module == "fewstep.commands" or module.startswith("fewstep.commands."):
        return "commands"
    if module == "fewstep.engine" or module.startswith("fewstep.engine."):
        return "engine"
    if any(module == m or module.startswith(m + ".") for m in EVALUATION):
        return "evaluation"
    if module in ENTRY:
        return "entry"
    return "core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the repository's packages."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def resolve(name: str, modules: dict) -> str | None:
    """The repository module an import of `name` loads (the longest known prefix), or None for
    a third-party or standard-library module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(module: str, path: Path, modules: dict) -> list[tuple[int, str]]:
    """(line, imported repository module) for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` loads a.b when b is a module, else a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                found.append((node.lineno, target))
    return sorted(set(found))


def import_graph() -> tuple[dict[str, list[tuple[int, str]]], dict[str, Path]]:
    modules = source_files()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}, modules


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def layer_violations(graph, modules) -> list[str]:
    problems = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module)
        for line, target in edges:
            theirs = layer_of(target)
            if theirs in MAY_IMPORT[mine] or (rel(modules[module]), target) in ALLOWED:
                continue
            problems.append(f"{rel(modules[module])}:{line} imports {target} (layer {theirs}); "
                            f"layer {mine} may import only {', '.join(sorted(MAY_IMPORT[mine]))}")
    return problems


def find_cycles(graph) -> list[list[str]]:
    """Import circles as module paths [a, b, ..., a]: one per back edge of a depth-first search
    (empty when the graph has no circle)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for _, target in graph.get(module, []):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def describe_cycle(cycle: list[str], graph, modules) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line = next(n for n, target in graph[a] if target == b)
        steps.append(f"  {rel(modules[a])}:{line} imports {b}")
    return "import circle " + " -> ".join(cycle) + ":\n" + "\n".join(steps)


def test_every_module_imports_only_the_layers_below_it():
    graph, modules = import_graph()
    problems = layer_violations(graph, modules)
    assert not problems, "import contract broken:\n" + "\n".join(problems)


def test_no_import_circle():
    graph, modules = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(describe_cycle(c, graph, modules) for c in cycles)


def test_the_allow_list_holds_only_imports_that_still_exist():
    """An allowed violation that was fixed must leave the list (so the list can only shrink)."""
    graph, modules = import_graph()
    present = {(rel(modules[m]), t) for m, edges in graph.items() for _, t in edges}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"fixed, remove from ALLOWED: {stale}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The contract's own reader: a lazy import inside a function and a relative import count."""
    (tmp_path / "fewstep" / "engine").mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "methods").mkdir()
    for init in ("fewstep", "fewstep/engine", "metrics", "methods"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "fewstep" / "a.py").write_text("def f():\n    from metrics import m\n")
    (tmp_path / "metrics" / "m.py").write_text("from . import n\n")
    (tmp_path / "metrics" / "n.py").write_text("import metrics.m\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    graph, modules = import_graph()
    assert layer_violations(graph, modules) == [
        "fewstep/a.py:2 imports metrics.m (layer metrics); layer core may import only core"]
    assert find_cycles(graph) == [["metrics.m", "metrics.n", "metrics.m"]]


@pytest.mark.parametrize("module, layer", [
    ("fewstep.config", "core"), ("fewstep.backbones.weights", "core"), ("fewstep.toy.world", "core"),
    ("fewstep.engine.context", "engine"), ("fewstep.scoring", "evaluation"),
    ("fewstep.reporting.page", "evaluation"), ("fewstep.commands.score", "commands"),
    ("fewstep.cli", "entry"), ("metrics.base", "metrics"), ("methods.dmd", "methods")])
def test_layer_table(module, layer):
    assert layer_of(module) == layer


def test_parsing_the_dag_imports_no_metric_numpy_or_pil():
    """The Snakefile imports the config and the prompt sets to build the DAG: `snakemake -n` must
    not pay for numpy, PIL or a metric (a fresh interpreter, so nothing is imported already)."""
    import subprocess

    code = ("import sys, fewstep.config, fewstep.prompt_sets; print(' '.join(sorted({m.split('.')[0] "
            "for m in sys.modules} & {'metrics', 'methods', 'numpy', 'PIL', 'torch'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing fewstep.config and fewstep.prompt_sets loads {out}"
