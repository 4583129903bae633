"""Layers called on graph values: the per-graph record of which layer is which and of each
call (see graphdl.functional)."""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..checks import GraphError
from ..ir import Graph, Slot, Value
from ..layers import Build, Layer, Param, same_memory
from ..ops import reshape

# -- layers called on graph values ---------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Call:
    """One call of layer k on the value `input` (held weakly: the record of a graph must
    not keep the graph alive)."""

    k: int
    input: weakref.ref[Value]


@dataclass
class Calls:
    """The layers called on one graph, numbered by first call, the graph param each place
    of each layer reads (its own "k.weight", or the param it is tied to), and the calls,
    by the value each gave."""

    layers: list[Layer] = field(default_factory=list)
    numbers: dict[int, int] = field(default_factory=dict)  # id(layer) -> k; `layers` keeps each alive
    reads: list[dict[str, str]] = field(default_factory=list)  # per k: short name -> graph param name
    made: weakref.WeakKeyDictionary[Value, Call] = field(default_factory=weakref.WeakKeyDictionary)

    def number(self, graph: Graph, layer: Layer) -> int:
        """The layer's number in `graph`, given at its first call, with the params its places
        read (for a place it holds only since, such as Standardize's after `adapt`, from now)."""
        k = self.numbers.get(id(layer))
        if k is None:
            k = len(self.layers)
            self.layers.append(layer)
            self.numbers[id(layer)] = k
            self.reads.append({})
        self.reads[k].update(_first_reads(graph, k, layer, [s for s, _ in layer.declared() if s not in self.reads[k]]))
        return k

    def scope(self, k: int) -> str:
        return f"{k}:{type(self.layers[k]).__name__}"


CALLS: weakref.WeakKeyDictionary[Graph, Calls] = weakref.WeakKeyDictionary()
_FORWARD = contextvars.ContextVar("graphdl_functional_forward", default=False)  # inside a layer's forward


def _first_reads(graph: Graph, k: int, layer: Layer, shorts: list[str]) -> dict[str, str]:
    """The graph param each of the layer's places `shorts` reads: one the graph already has
    that holds the same tensor (a tie), else its own, "k.short", declared when first read."""
    if not shorts:
        return {}
    held: dict[Any, str] = {}
    for name, value in graph.params.items():
        held.setdefault(same_memory(value.slot.tensor), name)
    reads = {}
    for short in shorts:
        name = f"{k}.{short}"
        tied = held.get(same_memory(layer.slot(short).tensor))
        if tied is None and (name in graph.params or name in graph.inputs):
            what = "a param" if name in graph.params else "an input"
            raise GraphError(f"graph {graph.name} already has {what} named {name!r}, the name its layer {k} "
                             f"({layer!r}) gives its {short} (layers' params are named after their order of first "
                             "call); give that value another name")
        reads[short] = name if tied is None else tied
    return reads


def call(layer: Layer, x: Value) -> Value:
    """`layer(x)`: the layer's forward pass applied to `x`, built in x's graph in inference
    mode (see the module's doc), its nodes in the scope "k:Type" of the layer's number k
    there; the value it gives is the output of a node the call built."""
    if not isinstance(x, Value):
        raise GraphError(f"{layer!r} was called on a {type(x).__name__}; a layer is called on a value of a graph "
                         "(from graph.input, an op or another layer), e.g. h = layer(x); to run layers on tensors, "
                         "put them in a model (gd.Sequential(...) or gd.Model(inputs, outputs)) and predict")
    if _FORWARD.get():
        raise GraphError(f"{layer!r} was called on a graph value inside a layer's forward; a layer made of others "
                         "builds them with their forward(build, x) (or call each layer on the graph's values)")
    graph = x.graph
    calls = CALLS.setdefault(graph, Calls())
    k = calls.number(graph, layer)
    prefix = f"{k}."
    owners = {prefix + short: name for short, name in calls.reads[k].items()}
    slots = {prefix + short: layer.slot(short) for short in calls.reads[k]}
    with graph.scope(calls.scope(k)):
        y = forward_of(layer, Build(graph, prefix, owners, slots), x)
    calls.made[y] = Call(k, weakref.ref(x))
    return y


Layer.__call__ = call  # type: ignore[attr-defined]  # installed here, beside the record it keeps


def forward_of(layer: Layer, build: Build, x: Value) -> Value:
    """The layer's forward applied to x, as a value of its own: the output of the last node
    it built, else that value times 1 (a value it did not build, such as Dropout's input in
    inference), so that each call of a layer gives a value no other call or op gave."""
    graph = build.graph
    start = len(graph.nodes)
    token = _FORWARD.set(True)
    try:
        y = layer.forward(build, x)
    finally:
        _FORWARD.reset(token)
    if not isinstance(y, Value) or y.graph is not graph:
        raise GraphError(f"{layer!r}.forward gave {y!r}, not a value of graph {graph.name}")
    nodes = graph.nodes
    if len(nodes) > start and nodes[-1].out is y:
        return y
    return y * 1.0 if y.dtype.is_floating_point else reshape(y, y.shape)


class GraphParam(Layer):
    """A param made with `graph.param`, held as a layer holds its own (`tensor`, in the
    param's slot), so that the model lists, moves, saves and loads it as it does theirs."""

    tensor = Param()

    def __init__(self, slot: Slot) -> None:
        self._slots = {"tensor": slot}

    def __repr__(self) -> str:
        return "graph param"


@dataclass(frozen=True)
class Place:
    """Where a model's tensor is held (a layer's attribute, or a graph param's slot), and
    the template param the model's graph reads there."""

    name: str  # "2.weight", or a graph param's own name
    holder: Layer
    short: str  # the attribute: "weight", or "tensor" for a graph param
    trainable: bool
    reads: str  # the template param: its own name, or the earlier place's it was tied to when built


@dataclass(frozen=True, eq=False)
class TemplateCall:
    """A call of the model's layer j in its template: on `input`, giving `output`, its
    nodes the template's `start` to `stop` - 1 (rebuilt, in the mode asked for, by each
    `graph()`)."""

    j: int
    input: Value
    output: Value
    start: int
    stop: int
