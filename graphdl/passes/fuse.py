"""Fusion: rewrite primitive patterns into the fused ops of graphdl.ops, one torch call
where the primitives took several.

    add(matmul(a, w), b)                        -> addmm(b, a, w)
    tanh(addmm(b, a, w))                        -> addmm_tanh(b, a, w)
    matmul(transpose(a), b), matmul(a, transpose(b)) -> matmul_tn(a, b), matmul_nt(a, b)
    mul(g, greater(y, 0))                       -> relu_backward(g, y)
    mul(g, sub(1, mul(y, y)))                   -> tanh_backward(g, y)
    mul(g, mul(y, sub(1, y)))                   -> sigmoid_backward(g, y)
    mul(broadcast_like[mean](g, d), mul(d, 2)),  d = sub(a, b)  -> mse_backward(g, a, b)

mul and add match with their inputs in either order. Values a pattern consumed and
nothing else uses are left for DCE. A fused node keeps the place, scope and source
location of the node it replaces, except addmm_tanh, which takes its product's: the
layer (a Linear) whose params it reads and where nearly all of its time goes.
"""

from __future__ import annotations

from collections.abc import Callable

from ..ir import Graph, Node, Value
from ..ops import (
    add,
    addmm,
    addmm_tanh,
    broadcast_like,
    greater,
    matmul,
    matmul_nt,
    matmul_tn,
    mse_backward,
    mul,
    relu_backward,
    sigmoid_backward,
    sub,
    tanh,
    tanh_backward,
    transpose,
)
from ..ops.registry import OpDef
from .match import is_const, producer, rebuild

# The fused op and its inputs, and the node whose scope and location it takes (if not its own).
Fused = tuple[OpDef, list[Value]] | tuple[OpDef, list[Value], Node] | None


def _orders(node: Node) -> tuple[tuple[Value, Value], tuple[Value, Value]]:
    a, b = node.inputs
    return (a, b), (b, a)


def _matrices(node: Node) -> bool:
    """A matmul of two matrices: the fused products take no batch dims."""
    return all(v.ndim == 2 for v in node.inputs)


def _addmm(node: Node) -> Fused:
    for product, bias in _orders(node):
        mm = producer(product, matmul)
        if mm is not None and not _matrices(mm):
            continue
        if mm is not None and _sole(product) and node.out.shape == product.shape:
            return addmm, [bias, *mm.inputs]
    return None


def _sole(v: Value) -> bool:
    """Nothing but one node uses v (no other node, not an output): fusing it into that
    node does not compute it twice."""
    return len(v.users) == 1 and not v.graph.is_output(v)


def _addmm_tanh(node: Node) -> Fused:
    mm = producer(node.inputs[0], addmm)
    if mm is not None and _sole(node.inputs[0]):
        return addmm_tanh, list(mm.inputs), mm
    return None


def _transposed_matmul(node: Node) -> Fused:
    a, b = node.inputs
    if not _matrices(node):
        return None
    if (t := producer(a, transpose)) is not None:
        return matmul_tn, [t.inputs[0], b]
    if (t := producer(b, transpose)) is not None:
        return matmul_nt, [a, t.inputs[0]]
    return None


def _relu_backward(g: Value, factor: Value) -> Value | None:
    mask = producer(factor, greater)
    return mask.inputs[0] if mask is not None and is_const(mask.inputs[1], 0.0) else None


def _tanh_backward(g: Value, factor: Value) -> Value | None:
    one_minus = producer(factor, sub)
    if one_minus is None or not is_const(one_minus.inputs[0], 1.0):
        return None
    square = producer(one_minus.inputs[1], mul)
    if square is None or square.inputs[0] is not square.inputs[1]:
        return None
    return square.inputs[0]


def _sigmoid_backward(g: Value, factor: Value) -> Value | None:
    prod = producer(factor, mul)
    if prod is None:
        return None
    for y, other in _orders(prod):
        one_minus = producer(other, sub)
        if one_minus is not None and is_const(one_minus.inputs[0], 1.0) and one_minus.inputs[1] is y:
            return y
    return None


ACTIVATIONS: dict[OpDef, Callable[[Value, Value], Value | None]] = {
    relu_backward: _relu_backward, tanh_backward: _tanh_backward, sigmoid_backward: _sigmoid_backward,
}


def _times_two(v: Value) -> Value | None:
    """x for v = mul(x, 2) or mul(2, x)."""
    node = producer(v, mul)
    for x, c in _orders(node) if node is not None else ():
        if is_const(c, 2.0):
            return x
    return None


def _mse_backward(node: Node) -> Fused:
    for scaled, twice in _orders(node):
        spread = producer(scaled, broadcast_like)
        if spread is None or not spread.attrs["mean"]:
            continue
        g, d = spread.inputs
        diff = producer(d, sub)
        if (diff is not None and _times_two(twice) is d and g.shape == ()
                and spread.attrs["axis"] == tuple(range(d.ndim))
                and diff.inputs[0].shape == diff.inputs[1].shape == d.shape):
            return mse_backward, [g, *diff.inputs]
    return None


def _mul(node: Node) -> Fused:
    if (fused := _mse_backward(node)) is not None:
        return fused
    for g, factor in _orders(node):
        if g.shape != node.out.shape:
            continue
        for op, match in ACTIVATIONS.items():
            y = match(g, factor)
            if y is not None and y.shape == g.shape:
                return op, [g, y]
    return None


PATTERNS: dict[OpDef, Callable[[Node], Fused]] = {add: _addmm, tanh: _addmm_tanh, matmul: _transposed_matmul,
                                                  mul: _mul}


def fuse(graph: Graph) -> tuple[Graph, bool]:
    """Rewrite every node that roots one of the PATTERNS into its fused op."""
    changed = False
    for node in list(graph.nodes):
        pattern = PATTERNS.get(node.op)
        fused = pattern(node) if pattern is not None else None
        if fused is not None:
            op, inputs, *origin = fused
            rebuild(graph, node, op, inputs)
            if origin:
                node.scope, node.where = origin[0].scope, origin[0].where
            changed = True
    return graph, changed

