"""Algebraic simplification: identities that remove a node or swap it for a cheaper one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..ir import Graph, Node, Value
from ..ops import add, broadcast_like, div, mul, neg, reduce_sum, sub, sum_to, transpose
from ..ops.registry import OpDef
from .match import is_const, producer, rebuild, replace

# A rule looks at one node and returns None (no change), an existing value equal to the
# node's output, or (op, inputs, attrs) for a node to build in its place.
Rewrite = Value | tuple[OpDef, list[Value], dict[str, Any]] | None


def _add(node: Node) -> Rewrite:
    a, b = node.inputs
    if is_const(b, 0.0):
        return a
    if is_const(a, 0.0):
        return b
    if (n := producer(b, neg)) is not None:  # a + (-c) -> a - c
        return sub, [a, n.inputs[0]], {}
    if (n := producer(a, neg)) is not None:
        return sub, [b, n.inputs[0]], {}
    return None


def _sub(node: Node) -> Rewrite:
    a, b = node.inputs
    if is_const(b, 0.0):
        return a
    if is_const(a, 0.0) and b.shape == node.out.shape:
        return neg, [b], {}
    if (n := producer(b, neg)) is not None:  # a - (-c) -> a + c
        return add, [a, n.inputs[0]], {}
    return None


def _mul(node: Node) -> Rewrite:
    a, b = node.inputs
    for x, c in ((a, b), (b, a)):
        if is_const(c, 1.0):
            return x
        if is_const(c, -1.0) and x.shape == node.out.shape:
            return neg, [x], {}
    return None


def _div(node: Node) -> Rewrite:
    return node.inputs[0] if is_const(node.inputs[1], 1.0) else None


def _involution(node: Node) -> Rewrite:
    """neg(neg x) and transpose(transpose x) are x."""
    inner = producer(node.inputs[0], node.op)
    return inner.inputs[0] if inner is not None else None


def _broadcast_like(node: Node) -> Rewrite:
    g, ref = node.inputs
    return g if node.attrs["axis"] is None and g.shape == ref.shape else None


def _sum_to(node: Node) -> Rewrite:
    (x,) = node.inputs
    shape = node.attrs["shape"]
    if shape == x.shape:
        return x
    lead = x.ndim - len(shape)
    if lead and x.shape[lead:] == shape:  # only leading dims go: a bias gradient, sum(0)
        return reduce_sum, [x], {"axis": tuple(range(lead)), "keepdims": False}
    return None


RULES: dict[OpDef, Callable[[Node], Rewrite]] = {
    add: _add, sub: _sub, mul: _mul, div: _div, neg: _involution, transpose: _involution,
    broadcast_like: _broadcast_like, sum_to: _sum_to,
}


def simplify(graph: Graph) -> tuple[Graph, bool]:
    """Apply the per-op identities in RULES (x*1, x+0, 0-x, neg(neg x), transpose of a
    transpose, a broadcast to the shape it has, sum_to the same shape or over leading
    dims ...). An identity only applies when the value kept has the node's exact shape
    and dtype, so broadcasting is never lost; a graph output is never replaced by an
    input or param, so callers never get a live param tensor back."""
    changed = False
    returned = {id(v) for v in graph.outputs}
    for node in list(graph.nodes):
        rule = RULES.get(node.op)
        result = rule(node) if rule is not None else None
        if result is None:
            continue
        if isinstance(result, Value):
            if (result.shape, result.dtype) != (node.out.shape, node.out.dtype):
                continue
            if result.node is None and id(node.out) in returned:
                continue
            replace(graph, node, result)
        else:
            rebuild(graph, node, *result)
        changed = True
    return graph, changed
