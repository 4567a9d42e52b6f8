"""Issue #12: the layering rules of docs/architecture.md hold.

* the import-linter contracts in pyproject.toml (layers; serving never imports ``train``; the core
  imports neither p4p nor caproto; private modules stay inside their package) are kept;
* no two modules of the package import each other, directly or round a longer loop (function-local
  and ``TYPE_CHECKING`` imports count too);
* no module imports another module's private (``_name``) names.

The checkers are tested on small synthetic inputs too, so that a green run means something.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "ptychostream"


# -- the checkers -----------------------------------------------------------------------------
def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected component of more than one module, sorted."""
    digraph = nx.DiGraph()
    for module in graph.modules:
        digraph.add_node(module)
        digraph.add_edges_from((module, imported) for imported in graph.find_modules_directly_imported_by(module))
    return sorted(sorted(scc) for scc in nx.strongly_connected_components(digraph) if len(scc) > 1)


def is_private(name: str) -> bool:
    """``_name`` and ``__name`` are private; dunders (``__version__``) are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str, module: str, is_package: bool, modules: set[str]) -> list[tuple[int, str]]:
    """``(line, "pkg.mod._name")`` for each private name of a ``ptychostream`` module that ``source`` imports.

    ``module`` is the dotted name of the module ``source`` belongs to (relative imports are resolved
    from it); a private name that is itself a module in ``modules`` is left to import-linter's
    ``private_modules`` contract (a package may import its own private modules).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        origin = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if origin != PACKAGE and not origin.startswith(PACKAGE + "."):
            continue
        for alias in node.names:
            if is_private(alias.name) and f"{origin}.{alias.name}" not in modules:
                found.append((node.lineno, f"{origin}.{alias.name}"))
    return found


def package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


# -- the package ------------------------------------------------------------------------------
def test_import_linter_contracts_are_kept():
    """``lint-imports`` (config in pyproject.toml) reports every contract kept."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["id"] for c in contracts} >= {"layers", "serving-not-train", "core-no-protocol", "private-modules"}
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test extra (import-linter)"
    env = dict(os.environ, COLUMNS="240", NO_COLOR="1")  # rich wraps at 80 columns without a terminal
    proc = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    broken = [line.removesuffix(" BROKEN") for line in proc.stdout.splitlines() if line.endswith(" BROKEN")]
    details = proc.stdout[proc.stdout.find("Broken contracts"):] if broken else proc.stdout + proc.stderr
    assert not broken, f"broken import-linter contracts: {broken}\n{details}"
    assert proc.returncode == 0, details
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout, details


def test_every_subpackage_is_in_one_layer():
    """A new subpackage must be placed in the layers (import-linter ignores modules outside them)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c for c in contracts if c["type"] == "layers"]
    assert layers["containers"] == [PACKAGE]
    placed = [name.strip() for layer in layers["layers"] for name in layer.split("|")]
    assert len(placed) == len(set(placed)), placed
    subpackages = {p.parent.name for p in (SRC / PACKAGE).glob("*/__init__.py")}
    assert set(placed) == subpackages


def test_no_import_cycles():
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    assert graph.modules == set(package_modules()), "every .py file is a module of the graph (no folder lacks __init__.py)"
    cycles = import_cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append("cycle: " + ", ".join(cycle))
        lines += [f"  {importer} -> {imported} (l.{d['line_number']})" for importer in cycle for imported in cycle
                  for d in graph.get_import_details(importer=importer, imported=imported)]
    assert not cycles, "import cycles (strongly connected modules):\n" + "\n".join(lines)


def test_no_private_names_imported_across_modules():
    modules = package_modules()
    bad = []
    for module, path in modules.items():
        for line, name in private_imports(path.read_text(), module, path.name == "__init__.py", set(modules)):
            bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    assert not bad, "private names imported from another module (make them public):\n" + "\n".join(bad)


# -- the checkers themselves ------------------------------------------------------------------
def test_cycle_finder_finds_a_loop_and_only_the_loop():
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.d", "p.a"),
                               ("p.e", "p.f"), ("p.f", "p.e"), ("p.g", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"], ["p.e", "p.f"]]
    graph.remove_import(importer="p.c", imported="p.a")
    graph.remove_import(importer="p.f", imported="p.e")
    assert import_cycles(graph) == []


def test_private_import_scanner():
    source = "\n".join([
        "import os",
        "from ptychostream.core.device import DeviceState, _helper",
        "from . import _private_module, __version__, forward",
        "from ..files.paths import _split as split, __dunder__",
        "from ptychostream import _x",
        "from os import _exit",
        "def f():",
        "    from .scans import __mangled",
    ])
    modules = {"ptychostream.sim._private_module"}
    assert private_imports(source, "ptychostream.sim.replay", False, modules) == [
        (2, "ptychostream.core.device._helper"),
        (4, "ptychostream.files.paths._split"),
        (5, "ptychostream._x"),
        (8, "ptychostream.sim.scans.__mangled"),
    ]
    # in a package's __init__, "." is the package itself
    assert private_imports("from .forward import _fft", "ptychostream.sim", True, set()) == [
        (1, "ptychostream.sim.forward._fft")]
    assert private_imports("from .forward import fft", "ptychostream.sim", True, set()) == []
