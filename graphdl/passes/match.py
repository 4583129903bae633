"""Helpers the rewriting passes share: reading patterns off the IR and swapping a node
for a replacement while keeping the graph valid (SSA, topological order, use-lists)."""

from __future__ import annotations

from typing import Any

from ..ir import Graph, Node, Value
from ..ops.registry import OpDef, const


def producer(v: Value, *ops: OpDef) -> Node | None:
    """The node defining `v` if its op is one of `ops`, else None."""
    node = v.node
    return node if node is not None and any(node.op is op for op in ops) else None


def const_value(v: Value) -> float | None:
    """The number a scalar `const` node holds, or None if `v` is not one."""
    node = producer(v, const)
    return node.attrs["value"] if node is not None else None


def is_const(v: Value, number: float) -> bool:
    value = const_value(v)
    return value is not None and value == number


def replace(graph: Graph, node: Node, value: Value) -> None:
    """Make `value` stand for `node`'s output everywhere, then drop `node`."""
    graph.replace_all_uses(node.out, value)
    graph.remove_node(node)


def rebuild(graph: Graph, node: Node, op: OpDef, inputs: list[Value], attrs: dict[str, Any] | None = None) -> None:
    """Make `node` an `op` node over `inputs` (values defined before `node`), keeping its
    output value, place, scope, grad mark and source location (`Graph.rewrite`)."""
    graph.rewrite(node, op, inputs, attrs or {})

