"""Memory planning from liveness: which node may write its result into an input's buffer.

compile already frees every value right after its last use (`del`). On top of that, a
node whose input dies at that very node can overwrite it instead of allocating:
`v2 = v1.tanh_()` rather than `v2 = torch.tanh(v1)`. That is safe only when nothing can
still read the old contents, so the input must

- be a temporary: made by a node, not a graph input, param, output or hoisted constant;
- own its storage: made by a `fresh` op (never a view such as transpose's, or an
  expanded broadcast), and used by no op that is not fresh (which might have made a view);
- die here (this node is its last use), and have the node's shape and dtype.

Measured on the 2-1024-1024-1024-1 tanh net at batch 1024 (one CPU thread): a training
step runs about 4 % faster (116 vs 121 ms; fewer fresh 4 MiB buffers to fill). Its
peak memory is unchanged (31.4 vs 31.5 MiB): the peak comes in the backward pass, when
a layer's input, activation gradient, input gradient and weight gradient are all live
at once, and none of them can take another's buffer. At batch 5 `tanh_` is a little
cheaper to call than `torch.tanh`.
"""

from __future__ import annotations

from ..ir import Graph


def last_uses(graph: Graph) -> dict[int, int]:
    """id(value) -> index of the last node that reads it (values nobody reads are absent)."""
    last: dict[int, int] = {}
    for k, node in enumerate(graph.nodes):
        for v in node.inputs:
            last[id(v)] = k
    return last


def plan_inplace(graph: Graph, hoisted: set[int], last_use: dict[int, int] | None = None) -> dict[int, int]:
    """{node index: index of the input it overwrites} for the nodes that can reuse a
    dying input's buffer (see the module doc). `hoisted` holds the ids of the values
    compile computes once, up front; `last_use` is `last_uses(graph)` if given."""
    returned = {id(v) for v in graph.outputs}
    last_use = last_uses(graph) if last_use is None else last_use
    plan: dict[int, int] = {}
    for k, node in enumerate(graph.nodes):
        for i in node.op.inplace:  # each op's in-place variants sit with it in ops.py
            v = node.inputs[i]
            if (v.node is not None and v.node.op.fresh and last_use[id(v)] == k
                    and id(v) not in returned and id(v) not in hoisted
                    and (v.shape, v.dtype) == (node.out.shape, node.out.dtype)
                    and all(u.op.fresh for u in v.users)):
                plan[k] = i
                break
    return plan
