"""Gradient all-reduce for data-parallel training, as IR.

Gradients are packed into buckets of about `bucket_mib` MiB in the order the backward
pass makes them (the last layer's first), as PyTorch DDP's reducer does. Each bucket's
`allreduce_start` sits right after its last gradient is made, so its communication runs
while the backward pass computes the earlier layers; the `allreduce_wait`s sit at the
end, and `unpack` views each summed gradient out of its bucket for the graph to return:

    %20: f32[26] = allreduce_start %17, %18  # grad allreduce
    ...
    %31: f32[26] = allreduce_wait %20  # grad allreduce
    %32: f32[25,1] = unpack[shape=(25, 1)] %31  # grad allreduce
    %33: f32[1] = unpack[offset=25, shape=(1,)] %31  # grad allreduce
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..ir import Graph, Node, Value
from ..ops import OPS

# One bucket for nets up to ~1M params (the disk net's 1.4k take one collective a step),
# three for the 2-1024-1024-1024-1 net, whose first bucket overlaps the backward pass.
DEFAULT_BUCKET_MIB = 4.0


def allreduce(graph: Graph, outputs: Sequence[int] | None = None,
              bucket_mib: float = DEFAULT_BUCKET_MIB) -> tuple[Graph, bool]:
    """Sum `outputs` over every rank: pack them into buckets, start each bucket's
    all-reduce as soon as its last value is made, and return the summed values.

    Args:
        graph: a gradient graph (edited in place and returned).
        outputs: indices of the outputs to reduce; by default all but the first (the
            loss of a graph made by `grad`).
        bucket_mib: a bucket is closed once it holds this many MiB.

    Returns:
        (graph, whether anything was inserted).
    """
    indices = list(range(1, len(graph.outputs)) if outputs is None else outputs)
    if not indices:
        return graph, False
    _make_early(graph, [graph.outputs[i] for i in indices])
    made_at = {id(n.out): k for k, n in enumerate(graph.nodes)}
    ready = sorted(indices, key=lambda i: made_at.get(id(graph.outputs[i]), -1))  # stable: ties keep output order
    buckets = _buckets([graph.outputs[i] for i in ready], ready, bucket_mib * 2**20)
    order = list(graph.nodes)
    pending = []
    for members in buckets:
        values = [graph.outputs[i] for i in members]
        last = max(made_at.get(id(v), -1) for v in values)
        start = _add(graph, "allreduce_start", values, {}, order[last] if last >= 0 else None)
        if last + 1 < len(order):  # right after the last of its values, not at the end
            graph.move_before(start.node, order[last + 1])
        pending.append((start, members))
    for start, members in pending:
        done = _add(graph, "allreduce_wait", [start], {}, start.node)
        offset = 0
        for i in members:
            shape = graph.outputs[i].shape
            graph.outputs[i] = _add(graph, "unpack", [done], {"offset": offset, "shape": shape}, start.node)
            offset += math.prod(shape)
    return graph, True


def _make_early(graph: Graph, values: list[Value]) -> None:
    """Move the nodes that make `values` up to just after their inputs are ready.

    grad emits a layer's input gradient before its weight gradient, yet only the input
    gradient is needed by the layers below: made first, the weight gradient's bucket
    starts before that product, and its communication overlaps it instead of waiting at
    the end. (On the shared 2-core machine an A/B of this was lost in the noise of other
    work; it costs nothing.)"""
    for v in values:
        if v.node is not None:
            _hoist(graph, v.node)


def _hoist(graph: Graph, node: Node) -> None:
    """Move `node` just after the last node it reads, first moving up that way the inputs
    made for it alone (such as the transpose a weight gradient multiplies by)."""
    for u in node.inputs:
        if u.node is not None and len(u.users) == 1 and not u.node.op.effect:
            _hoist(graph, u.node)
    at = graph.nodes.index(node)
    ready = max((graph.nodes.index(u.node) for u in node.inputs if u.node is not None), default=-1)
    if ready + 1 < at and not node.op.effect:
        graph.move_before(node, graph.nodes[ready + 1])


def _buckets(values: list[Value], indices: list[int], cap: float) -> list[list[int]]:
    """`indices` (in ready order) cut into consecutive buckets of one dtype, each closed
    once it holds `cap` bytes."""
    buckets: list[list[int]] = []
    size, dtype = cap, None
    for v, i in zip(values, indices):
        if size >= cap or v.dtype != dtype:
            buckets.append([])
            size, dtype = 0, v.dtype
        buckets[-1].append(i)
        size += math.prod(v.shape) * v.dtype.itemsize
    return buckets


def _add(graph: Graph, op: str, inputs: list[Value], attrs: dict, near: Node | None) -> Value:
    """A collective node in the "allreduce" scope of the backward pass, created where the
    node it follows was (so an error names the user's line)."""
    with graph.scope("allreduce", backward=True):
        return graph.add_node(OPS[op], inputs, attrs, where=near.where if near is not None else None)
