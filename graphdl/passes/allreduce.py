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
from ..ops.collectives import allreduce_start, allreduce_wait, unpack
from ..ops.registry import OpDef

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
    order = _early(graph.nodes, [graph.outputs[i].node for i in indices])
    made_at = {id(n.out): k for k, n in enumerate(order)}
    ready = sorted(indices, key=lambda i: made_at.get(id(graph.outputs[i]), -1))  # stable: ties keep output order
    starts, pending = _start_buckets(graph, order, made_at, ready, bucket_mib)
    tail = _finish_buckets(graph, pending)
    graph.reorder([*starts.get(-1, []), *(n for k, node in enumerate(order) for n in (node, *starts.get(k, []))),
                   *tail])
    return graph, True


def _start_buckets(graph: Graph, order: list[Node], made_at: dict[int, int], ready: list[int],
                   bucket_mib: float) -> tuple[dict[int, list[Node]], list[tuple[Value, list[int]]]]:
    """An allreduce_start per bucket of the outputs `ready` lists, each placed right after
    its bucket's last value is made. Returns {position in `order`: the starts that follow
    that node (-1: before every node)} and each start with its bucket's output indices."""
    starts: dict[int, list[Node]] = {}
    pending = []
    for members in _buckets([graph.outputs[i] for i in ready], ready, bucket_mib * 2**20):
        last = max(made_at.get(id(graph.outputs[i]), -1) for i in members)
        start = _add(graph, allreduce_start, [graph.outputs[i] for i in members], {},
                     order[last] if last >= 0 else None)
        starts.setdefault(last, []).append(start.node)
        pending.append((start, members))
    return starts, pending


def _finish_buckets(graph: Graph, pending: list[tuple[Value, list[int]]]) -> list[Node]:
    """For each bucket started, its allreduce_wait and an unpack per output, which becomes
    that output; returns those nodes, which go at the end."""
    tail = []
    for start, members in pending:
        done = _add(graph, allreduce_wait, [start], {}, start.node)
        tail.append(done.node)
        offset = 0
        for i in members:
            shape = graph.outputs[i].shape
            summed = _add(graph, unpack, [done], {"offset": offset, "shape": shape}, start.node)
            tail.append(summed.node)
            graph.set_output(i, summed)
            offset += math.prod(shape)
    return tail


def _early(nodes: list[Node], gradients: list[Node | None]) -> list[Node]:
    """`nodes`, with each of `gradients` (and the inputs made for it alone, such as the
    transpose a weight gradient multiplies by) moved up to just after what it reads.

    grad emits a layer's input gradient before its weight gradient, yet only the input
    gradient is needed by the layers below: made first, the weight gradient's bucket
    starts before that product, and its communication overlaps it instead of waiting at
    the end. (On the shared 2-core machine an A/B of this was lost in the noise of other
    work; it costs nothing.)"""
    schedule = _EarlySchedule(_eager(gradients))
    for node in nodes:  # eager nodes that read no node at all go first
        if schedule.is_eager(node) and all(v.node is None for v in node.inputs):
            schedule.place(node)
    for node in nodes:
        if node not in schedule.eager and node not in schedule.queued:
            schedule.place(node)
    return schedule.order


def _eager(gradients: list[Node | None]) -> set[Node]:
    """`gradients` and the nodes made for them alone (whose value only they read), but no collective."""
    eager: set[Node] = set()
    stack = [n for n in gradients if n is not None]
    while stack:
        node = stack.pop()
        if node not in eager and not node.op.collective:
            eager.add(node)
            stack.extend(v.node for v in node.inputs if v.node is not None and len(v.users) == 1)
    return eager


class _EarlySchedule:
    """_early's order as it is built: a node placed takes along each eager node whose last input it was."""

    def __init__(self, eager: set[Node]) -> None:
        self.eager = eager
        self.order: list[Node] = []
        self.placed: set[Node] = set()  # in `order` already
        self.queued: set[Node] = set()

    def is_eager(self, node: Node) -> bool:
        """An eager node not placed or about to be."""
        return node in self.eager and node not in self.queued

    def place(self, first: Node) -> None:
        todo = [first]
        self.queued.add(first)
        while todo:
            node = todo.pop()
            self.order.append(node)
            self.placed.add(node)
            for user in node.out.users:  # an eager node goes as soon as its last input is placed
                if self.is_eager(user) and all(v.node is None or v.node in self.placed for v in user.inputs):
                    self.queued.add(user)
                    todo.append(user)


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


def _add(graph: Graph, op: OpDef, inputs: list[Value], attrs: dict, near: Node | None) -> Value:
    """A collective node in the "allreduce" scope of the backward pass, created where the
    node it follows was (so an error names the user's line)."""
    with graph.scope("allreduce", backward=True):
        return graph.add_node(op, inputs, attrs, where=near.where if near is not None else None)
