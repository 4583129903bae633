"""Common-subexpression elimination: one node per (op, inputs, attrs)."""

from __future__ import annotations

from ..ir import Graph, Node
from .match import replace


def _key(node: Node) -> tuple:
    # repr keeps values that compare equal but differ apart (0.0 and -0.0, 1 and True).
    # Most nodes have no attrs: skipping repr/sorted for them makes the key 4x cheaper.
    attrs = repr(sorted(node.attrs.items())) if node.attrs else ""
    return node.op.name, tuple(map(id, node.inputs)), attrs


def cse(graph: Graph) -> tuple[Graph, bool]:
    """Merge nodes that apply the same op to the same inputs with the same attrs.

    Nodes are visited in order, so once a duplicate is merged its users' keys already
    name the surviving value and whole duplicated chains fold in one sweep. Collectives
    are never merged: two all-reduces are two sums, issued by every rank.
    """
    seen: dict[tuple, Node] = {}
    changed = False
    for node in list(graph.nodes):
        if node.op.collective:
            continue
        first = seen.setdefault(_key(node), node)
        if first is not node:
            replace(graph, node, first.out)
            changed = True
    return graph, changed
