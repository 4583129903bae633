"""Dead-code elimination: drop nodes whose values reach no output."""

from __future__ import annotations

from ..ir import Graph


def dce(graph: Graph) -> tuple[Graph, bool]:
    """Remove every node whose output is neither used nor returned, except collectives
    (every rank must issue the same ones, whatever this graph does with their results).

    Walking in reverse removes a whole dead chain in one sweep: by the time a node is
    visited, its dead users are already gone.
    """
    returned = {id(v) for v in graph.outputs}
    changed = False
    for node in reversed(list(graph.nodes)):
        if not node.out.users and id(node.out) not in returned and not node.op.collective:
            graph.remove_node(node)
            changed = True
    return graph, changed
