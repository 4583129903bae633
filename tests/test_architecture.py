"""The shape of graphdl's module graph: which module imports which, read from the source.

Every graphdl/**/*.py is parsed with `ast` (nothing is imported). An import counts
wherever it is written, inside functions too, except under `if TYPE_CHECKING:`, which
never runs. A package's `__init__.py` is the package's own module (`graphdl.ops` when
ops is a package), and its submodules are modules of their own (`graphdl.ops.registry`).
`from X import name` is an edge to X.name when that is a module, else to X; importing a
submodule is not counted as importing its parent packages (every module would then
depend on graphdl/__init__.py, which imports them all).
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

import graphdl

ROOT = pathlib.Path(graphdl.__file__).parent
MAX_CYCLE = 4  # today's one cycle is ir/ops/text/viz (or part of it): IR, its ops, printing and drawing


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The modules one file imports at run time, resolved against the known `modules`."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.found: set[str] = set()

    def _known(self, name: str) -> str | None:
        """`name`, or the longest prefix of it that is a graphdl module; None outside graphdl."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def _add(self, name: str) -> None:
        known = self._known(name)
        if known is not None:
            self.found.add(known)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level > 1:
                base = base[:-(node.level - 1)]
            assert base, f"{node.module!r} at level {node.level} goes above graphdl in {self.package}"
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            self._add(sub if sub in self.modules else source)


def import_graph(root: pathlib.Path = ROOT) -> nx.DiGraph:
    """graphdl's modules, and an edge a -> b for each graphdl module b that a imports."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        visitor = _Imports(module, path.name == "__init__.py", set(files))
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        graph.add_edges_from((module, target) for target in visitor.found if target != module)
    return graph


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself, on a made-up package with ops as a package."""
    pkg = tmp_path / "graphdl"
    (pkg / "ops").mkdir(parents=True)
    files = {
        "__init__.py": "from .ops import registry\nfrom . import train\n",
        "checks.py": "import math\n",
        "ir.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .train import fit\n"
                 "else:\n    from .checks import real\n",
        "train.py": "def f():\n    from .ops.registry import OPS\n    import graphdl.ir\n    return OPS\n",
        "ops/__init__.py": "from .registry import OPS\nfrom . import kernels\nfrom .. import checks\n",
        "ops/registry.py": "from ..ir import Value\nfrom . import kernels\n",
        "ops/kernels.py": "import typing\nif typing.TYPE_CHECKING:\n    from graphdl import train\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert sorted(graph.edges) == [
        ("graphdl", "graphdl.ops.registry"), ("graphdl", "graphdl.train"),
        ("graphdl.ir", "graphdl.checks"),
        ("graphdl.ops", "graphdl.checks"), ("graphdl.ops", "graphdl.ops.kernels"),
        ("graphdl.ops", "graphdl.ops.registry"),
        ("graphdl.ops.registry", "graphdl.ir"), ("graphdl.ops.registry", "graphdl.ops.kernels"),
        ("graphdl.train", "graphdl.ir"), ("graphdl.train", "graphdl.ops.registry"),
    ]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def test_no_import_cycle_is_larger_than_ir_ops_text_viz(graph):
    assert "graphdl.train" in graph and graph.number_of_edges() > 20  # it did read graphdl
    big = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > MAX_CYCLE]
    assert big == [], (f"import cycles of more than {MAX_CYCLE} modules: {big}; the cycles today: "
                       f"{[sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]}")


def test_distributed_is_a_leaf_under_the_layers_that_train(graph):
    """graphdl.distributed (the process group, collectives and heartbeats) sits below
    everything that trains: it may use graphdl.checks, and nothing else of graphdl."""
    imported = set(graph.successors("graphdl.distributed"))
    assert imported <= {"graphdl.checks"}, f"graphdl.distributed imports {sorted(imported)}"
    upper = {"graphdl.model", "graphdl.train", "graphdl.step", "graphdl.batches", "graphdl.layers", "graphdl.ops",
             "graphdl.ir"}
    reached = nx.descendants(graph, "graphdl.distributed")
    assert not reached & upper and not any(m.startswith("graphdl.ops.") for m in reached), sorted(reached)
