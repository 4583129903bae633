"""Reverse-mode differentiation as a graph transformation.

`grad` copies the graph, then walks its nodes in reverse calling each op's VJP rule,
which builds the backward pass as ordinary IR nodes in the same graph. The result
prints, renders, optimises and compiles like any graph, and can be differentiated again.
"""

from __future__ import annotations

from collections.abc import Sequence

from .building import pauses_gc
from .checks import GraphError, read_int, show_number
from .ir import Graph, Node, Value
from .ops import add, zeros_like
from .passes.dce import dce


@pauses_gc
def grad(graph: Graph, wrt: Sequence[str], of: int | Value = 0) -> Graph:
    """The gradient graph of one scalar output with respect to inputs or params.

    Args:
        graph: the graph to differentiate; it is not modified.
        wrt: names of the inputs or params to differentiate with respect to.
        of: which output to differentiate: its index in `graph.outputs` (default the
            first, the loss) or the output value itself.

    Returns:
        A new graph with the same inputs and params (sharing their tensors), whose
        outputs are the original outputs followed by one gradient per name in `wrt`,
        each with the shape of what it differentiates (zeros where the output does not
        depend on it) and labelled "d/d{name}" (`graph.output_labels`).
    """
    wrt, index = _check_grad_args(graph, wrt, of)
    new, vmap = graph.copy()
    loss = vmap[id(graph.outputs[index])]
    wanted = [vmap[id(graph.value(name))] for name in wrt]
    with new.scope("", backward=True):
        cotangents = _backward(new, loss, _depending_on(new, wanted))
        for v in wanted:
            g = cotangents.get(id(v))
            new.output(g if g is not None else zeros_like(v), label=f"d/d{v.name}")
    new, _ = dce(new)  # drop cotangents the rules built for inputs that needed none
    return new


def _depending_on(graph: Graph, wanted: list[Value]) -> set[int]:
    """The ids of `wanted` and of every value computed from them: only these need a cotangent."""
    depends = {id(v) for v in wanted}
    for node in graph.nodes:
        if any(id(v) in depends for v in node.inputs):
            depends.add(id(node.out))
    return depends


def _backward(graph: Graph, loss: Value, depends: set[int]) -> dict[int, Value]:
    """Walk the forward nodes in reverse from the loss (cotangent 1), each passing its
    output's cotangent through its op's VJP rule to its inputs; returns the cotangents
    that reached the inputs and params, by id."""
    forward = list(graph.nodes)  # the walk appends the backward nodes
    cotangents: dict[int, Value] = {}
    if id(loss) in depends:
        cotangents[id(loss)] = graph.const(1.0, loss.dtype)
    for node in reversed(forward):
        g = cotangents.pop(id(node.out), None)
        if g is not None:
            _pull_back(graph, node, g, cotangents, depends)
    return cotangents


def _pull_back(graph: Graph, node: Node, g: Value, cotangents: dict[int, Value], depends: set[int]) -> None:
    """Add the cotangents `node`'s VJP rule gives its inputs (those that need one) to theirs."""
    if node.op.vjp is None:
        raise GraphError(f"grad: op {node.op.name} has no VJP rule, so {node!r} cannot be differentiated")
    with graph.scope(node.scope):
        for v, gv in zip(node.inputs, node.op.vjp(g, node.out, *node.inputs, **node.attrs)):
            if gv is None or id(v) not in depends:
                continue
            previous = cotangents.get(id(v))
            cotangents[id(v)] = gv if previous is None else add(previous, gv)


def _check_grad_args(graph: Graph, wrt: Sequence[str] | str, of: int | Value) -> tuple[list[str], int]:
    """wrt as a list of names of inputs or params, and the index of the scalar output `of`."""
    if not isinstance(graph, Graph):
        raise GraphError(f"grad takes a gd.Graph, got {type(graph).__name__}")
    wrt = _wrt_names(graph, wrt)
    if not graph.outputs:
        raise GraphError(f"grad: graph {graph.name} has no outputs; add the loss with graph.output(loss)")
    index = _output_index(graph, of)
    if graph.outputs[index].shape != ():
        out = graph.outputs[index]
        raise GraphError(
            f"grad: output {index} ({out!r}) is not a scalar; reduce it first, e.g. gd.sum(...) or gd.mean(...)"
        )
    if len(set(wrt)) != len(wrt):
        raise GraphError(f"grad: wrt names a value twice: {list(wrt)}")
    return list(wrt), index


def _wrt_names(graph: Graph, wrt: Sequence[str] | str) -> Sequence[str]:
    """`wrt` as a sequence of names (one name alone too), each of an input or param."""
    if isinstance(wrt, str):
        wrt = [wrt]
    if not isinstance(wrt, Sequence):
        raise GraphError(f"grad: wrt must be a list of input or param names such as ['w', 'b'], got {wrt!r}")
    for name in wrt:
        _check_wrt(graph, name)
    return wrt


def _output_index(graph: Graph, of: int | Value) -> int:
    """The index in `graph.outputs` of `of`: an output value, or an index of one."""
    if isinstance(of, Value):
        if not any(of is o for o in graph.outputs):
            raise GraphError(f"grad: {of!r} is not an output of graph {graph.name}; pass it to graph.output first")
        return next(i for i, o in enumerate(graph.outputs) if o is of)
    count = len(graph.outputs)
    try:
        return read_int(of, "of", -count, count - 1)
    except GraphError:
        raise GraphError(f"grad: of={show_number(of)} is not an output index of graph {graph.name} "
                         f"(it has {count} outputs)") from None


def _check_wrt(graph: Graph, name: object) -> None:
    """`name` must name an input or param: say what it is otherwise, and what to pass."""
    if isinstance(name, str) and (name in graph.inputs or name in graph.params):
        value = graph.value(name)
        if not value.dtype.is_floating_point:
            raise GraphError(f"grad: wrt {name!r} is {value!r}, integer indices, which take no gradient\n"
                             f"  hint: differentiate with respect to floating inputs and params only")
        return
    if isinstance(name, Value) and name.node is None and name.graph is graph:
        raise GraphError(f"grad: wrt takes names, got the {name.kind} {name!r} itself\n"
                         f"  hint: pass its name, wrt=[{name.name!r}]")
    what = repr(name) if isinstance(name, str) else f"{name!r} ({type(name).__name__})"
    raise GraphError(f"grad: wrt {what} is not an input or param of graph {graph.name}\n"
                     f"  hint: {_wrt_hint(graph, name)}")


def _wrt_hint(graph: Graph, name: object) -> str:
    """What to pass instead of `name`: the names the graph has (and, for a computed value, why not it)."""
    known = ", ".join([*graph.inputs, *graph.params]) or "none"
    if isinstance(name, Value) and name.node is not None or isinstance(name, str) and name.startswith("%"):
        return ("grad differentiates with respect to inputs and params, not values computed by nodes "
                "(to get the gradient at an intermediate value, make it an input); "
                f"graph {graph.name} has: {known}")
    return f"pass the names of inputs or params; graph {graph.name} has: {known}"
