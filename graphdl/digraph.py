"""The IR as a networkx graph (`Graph.to_networkx()`), for the graph algorithms graphdl
does not carry itself.

graphdl walks its own graphs (the node list is topological; `passes/memory.py`'s
liveness, autodiff's and DCE's reachability are one pass each), so networkx is needed
only here, and imported only when this is called: `import graphdl` never loads it
(tests/test_contract.py checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .checks import dtype_name

if TYPE_CHECKING:
    import networkx

    from .ir import Graph


def to_networkx(graph: Graph) -> networkx.DiGraph:
    """`Graph.to_networkx`: one networkx node per input, param and IR node, named as the
    text IR names them (`x`, `0.weight`, `%3`), and an edge from each value's producer to
    each node that reads it."""
    try:
        import networkx
    except ImportError:
        raise ImportError("Graph.to_networkx needs networkx: python -m pip install networkx") from None
    G = networkx.DiGraph(name=graph.name)
    names: dict[int, str] = {}
    for kind, values in (("input", graph.inputs), ("param", graph.params)):
        for name, v in values.items():
            names[id(v)] = name
            G.add_node(name, **_describe(kind, v.shape, v.dtype, layer=""), kind=kind)
    for k, node in enumerate(graph.nodes):
        names[id(node.out)] = name = f"%{k}"
        G.add_node(name, **_describe(node.op.name, node.out.shape, node.out.dtype, layer=node.scope), kind="node",
                   index=k, backward=node.backward, where=node.where)
        for i, v in enumerate(node.inputs):
            source = names[id(v)]
            if G.has_edge(source, name):  # mul(y, y) reads one value twice: one edge, both positions
                G.edges[source, name]["inputs"].append(i)
            else:
                G.add_edge(source, name, inputs=[i])
    G.graph["outputs"] = [names[id(v)] for v in graph.outputs]
    return G


def _describe(op: str, shape: tuple, dtype: Any, layer: str) -> dict[str, Any]:
    return {"op": op, "shape": tuple(shape), "dtype": dtype_name(dtype), "layer": layer}
