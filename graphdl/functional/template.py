"""What a model is built from: its inputs and output checked, the nodes and calls that
lead to the output, its template graph; and a model's calls replayed from a file."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import GraphError, Shape, all_finite, finite_mask, format_shape, format_type, tensor_problem
from ..ir import Graph, Node, Slot, Value
from ..layers import Build, Layer
from ..ops import slice_

# -- building a model: its inputs, its output, what the output needs ----------------------------
from .calls import Call, Calls, GraphParam, Place, TemplateCall, forward_of


def checked_inputs(inputs: Any) -> list[Value]:
    """The inputs: one graph's, distinct, batch-first; several, rows of one dtype and batch dim."""
    given = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not given:
        raise GraphError("Model takes at least one input: gd.Model(x, out), or gd.Model([a, b], out)")
    for v in given:
        if not isinstance(v, Value):
            raise GraphError(f"Model's inputs are graph inputs (graph.input(...)), got a {type(v).__name__}")
        if v.kind != "input":
            raise GraphError(f"Model's inputs are graph inputs (graph.input(...)), but {v!r} is a {v.kind} of graph "
                             f"{v.graph.name}; declare the input with graph.input and build from it")
        if v.graph is not given[0].graph:
            raise GraphError(f"Model's inputs belong to one graph, but {given[0].name} is graph "
                             f"{given[0].graph.name!r}'s and {v.name} graph {v.graph.name!r}'s; build the model from "
                             "one graph")
        if not v.shape or not isinstance(v.shape[0], str):
            raise GraphError(f"input {v!r}: a model's inputs take a batch of examples, first dim the batch "
                             "(declare it with None: graph.input(name, (None, features)))")
    names = [v.name for v in given]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise GraphError(f"Model's inputs name {twice} twice; give each input once")
    if len(given) > 1:
        _check_side_by_side(given)
    return given


def _check_side_by_side(given: list[Value]) -> None:
    """Several inputs are fed side by side in one tensor: rows of one dtype and batch dim."""
    first = given[0]
    for v in given:
        if len(v.shape) != 2 or not isinstance(v.shape[1], int) or v.dtype != first.dtype \
                or v.shape[0] != first.shape[0]:
            shown = ", ".join(repr(u) for u in given)
            raise GraphError(f"a model's several inputs must be rows [N, features] of one dtype (fit feeds them side "
                             f"by side, as one tensor), but they are {shown}; make them so, or give the model one "
                             "input")


def checked_output(outputs: Any, given: list[Value]) -> Value:
    """The one value the model predicts: of the inputs' graph, batch-first like them."""
    if isinstance(outputs, (list, tuple)):
        if len(outputs) != 1:
            raise GraphError(f"Model predicts one value (fit trains one loss on it), got {len(outputs)} outputs; "
                             "give one, e.g. gd.Model(inputs, out)")
        outputs = outputs[0]
    if not isinstance(outputs, Value):
        raise GraphError(f"Model's output is a value of the graph (what an op or a layer gave), got a "
                         f"{type(outputs).__name__}")
    graph = given[0].graph
    if outputs.graph is not graph:
        raise GraphError(f"Model's output {outputs!r} belongs to graph {outputs.graph.name!r}, but its inputs to "
                         f"graph {graph.name!r}; build the output from the model's inputs, in their graph")
    if not outputs.shape or outputs.shape[0] != given[0].shape[0]:
        raise GraphError(f"Model's output {outputs!r} must keep the batch dim {given[0].shape[0]} first, one "
                         "prediction per example, as fit's targets have")
    return outputs


def leading_to(output: Value, calls: Calls) -> tuple[list[tuple[Node, Call | None]], set[Value]]:
    """What the output needs, in graph order: (node, None) for a node of an op, (the node
    giving a call's output, the call) for a layer call, whose own nodes are the layer's to
    build again; and the inputs and params they read (a call: the value it was called on)."""
    seen: set[Value] = set()
    made: dict[Value, Call] = {}
    stack = [output]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        c = calls.made.get(v)
        if c is not None:
            x = c.input()
            if x is None or x.graph is not v.graph:
                raise GraphError(f"{v!r}, which layer {c.k} ({calls.layers[c.k]!r}) gave, was called on a value "
                                 f"graph {v.graph.name} no longer has (the graph was edited since); call the layers "
                                 "again in a new graph")
            made[v] = c
            stack.append(x)
        elif v.node is not None:
            stack.extend(v.node.inputs)
    steps = [(n, made.get(n.out)) for n in output.graph.nodes if n.out in seen]
    return steps, {v for v in seen if v.node is None}


def check_given(given: list[Value], read: set[Value], output: Value) -> None:
    missing = [v.name for v in output.graph.inputs.values() if v in read and v not in given]
    if missing:
        names = ", ".join(v.name for v in given)
        raise GraphError(f"Model's output reads input{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not "
                         f"among its inputs ({names}); give every input it reads, e.g. "
                         f"gd.Model([{', '.join([*(v.name for v in given), *missing])}], out)")


def used_layers(calls: Calls, steps: list[tuple[Node, Call | None]]) -> list[Layer]:
    """The layers of the calls the output needs, in order of first call: the model's layers."""
    used = {c.k for _, c in steps if c is not None}
    return [layer for k, layer in enumerate(calls.layers) if k in used]


def layer_params(graph: Graph, calls: Calls, layers: list[Layer]) -> set[Value]:
    """The graph params the layers' places read, whether or not a node reads them."""
    return {graph.params[name] for layer in layers for name in calls.reads[calls.numbers[id(layer)]].values()
            if name in graph.params}


def places_of(graph: Graph, calls: Calls, layers: list[Layer],
            read: set[Value]) -> tuple[list[Place], list[tuple[Value | None, Slot, str]]]:
    """The model's places, and the params its template declares: (the graph's param, or
    None for a layer's that its graph never declared, its slot, the name it takes there),
    those the model reads in declaration order. A param is read in one or more places:
    first the one that declared it (a layer's own, or a graph param's), then the layers'
    tied to it, in order; it takes its first place's name, and each place `reads` it."""
    declarer: dict[str, Place] = {}  # a param's place in the layer that declared it ("k.weight" for layer k's)
    readers: dict[str, list[Place]] = {}  # the places of other layers that read it (tied when called)
    for j, layer in enumerate(layers):
        k = calls.numbers[id(layer)]
        for short, p in layer.declared():
            name = calls.reads[k].get(short)
            if name is None:
                raise GraphError(f"layer {j} ({layer!r}) holds {short}, which it did not hold when it was called; "
                                 "call the layer again in a new graph")
            place = Place(f"{j}.{short}", layer, short, p.trainable, "")
            if name == f"{k}.{short}":
                declarer[name] = place
            else:
                readers.setdefault(name, []).append(place)
    places: list[Place] = []
    params: list[tuple[Value | None, Slot, str]] = []
    # A layer's own param its forward did not read in inference is not in the graph: after the rest.
    names = [v.name for v in graph.params.values() if v in read] + [n for n in declarer if n not in graph.params]
    for name in names:
        v = graph.params.get(name)
        first = declarer.get(name)
        if first is None and (name in _declared_params(calls) and readers.get(name)):
            first, *rest = readers[name]  # declared by a layer not in the model: its first reader's
            readers[name] = rest
        if first is None:  # a graph param of the user's (graph.param), or read by no layer of the model
            first = Place(name, GraphParam(v.slot), "tensor", True, "")
        group = [first, *readers.get(name, [])]
        places += [Place(p.name, p.holder, p.short, p.trainable, first.name) for p in group]
        params.append((v, first.holder.slot(first.short), first.name))
    _check_names([p.name for p in places], places)
    return places, params


def _declared_params(calls: Calls) -> set[str]:
    """The graph params the layers declared, each for one of its own places ("k.weight")."""
    return {f"{k}.{short}" for k, reads in enumerate(calls.reads) for short, name in reads.items()
            if name == f"{k}.{short}"}


def _check_names(names: list[str], places: list[Place]) -> None:
    for p in places:
        if names.count(p.name) > 1 or p.name in ("x", "y"):
            what = "the model's input" if p.name == "x" else "the model's targets" if p.name == "y" else \
                "a layer's param in the model's numbering of its layers"
            raise GraphError(f"graph param {p.name!r} has the name of {what}; give the param another name")


def template_of(name: str, given: list[Value], output: Value, steps: list[tuple[Node, Call | None]], calls: Calls,
              layers: list[Layer], places: list[Place],
              params: list[tuple[Value | None, Slot, str]]) -> tuple[Graph, list[TemplateCall]]:
    """The model's own graph of the forward pass, in inference mode: input "x" (several
    inputs side by side, sliced apart), the template params, the output's nodes, and its
    calls, built by their layers in the model's layer scopes; and those calls."""
    t = Graph(name)
    values: dict[Value, Value] = {}
    if len(given) == 1:
        values[given[0]] = t.input("x", given[0].shape, given[0].dtype)
    else:
        x = t.input("x", (given[0].shape[0], sum(v.shape[1] for v in given)), given[0].dtype)
        for v, (start, stop) in zip(given, columns_of([(v.name, v.shape[1:], v.dtype) for v in given]), strict=True):
            with t.scope(f"input:{v.name}"):
                values[v] = slice_(x, 1, start, stop)
    for v, slot, param in params:
        declared = t.param(param, slot)
        if v is not None:
            values[v] = declared
    owners = {p.name: p.reads for p in places}  # each place reads the template param it read when built
    slots = {p.name: p.holder.slot(p.short) for p in places}
    number = {calls.numbers[id(layer)]: j for j, layer in enumerate(layers)}
    scopes = {calls.scope(k): f"{j}:{type(layers[j]).__name__}" for k, j in number.items()}
    template_calls = []
    for node, c in steps:
        if c is None:
            copy_nodes(t, [node], values, scopes)
            continue
        j, x, start = number[c.k], values[c.input()], len(t.nodes)
        with t.scope(f"{j}:{type(layers[j]).__name__}"):
            y = values[node.out] = forward_of(layers[j], Build(t, f"{j}.", owners, slots), x)
        template_calls.append(TemplateCall(j, x, y, start, len(t.nodes)))
    t.output(values[output])
    return t, template_calls


def copy_nodes(g: Graph, nodes: Iterable[Node], values: dict[Value, Value], scopes: dict[str, str] | None = None,
                ) -> None:
    """Add a copy of each node to `g`, reading `values` (old value -> new), in its scope
    (renamed by `scopes`), at the source line it was made at; each op's rule checks it again."""
    for node in nodes:
        scope = node.scope if scopes is None else scopes.get(node.scope, node.scope)
        with g.scope(scope, node.backward):
            values[node.out] = g.add_node(node.op, [values[v] for v in node.inputs], dict(node.attrs), node.where)


def columns_of(inputs: Iterable[tuple[str, Shape, torch.dtype]]) -> list[tuple[int, int]]:
    """Each input's columns in the one tensor fit feeds: (start, stop)."""
    spans, start = [], 0
    for _, shape, _ in inputs:
        width = shape[0] if shape else 1
        spans.append((start, start + width))
        start += width
    return spans


def fed_values(template: Graph) -> list[Value]:
    """The template's values of its inputs: x, or the slices of it."""
    x = template.inputs["x"]
    sliced = [n.out for n in template.nodes if n.scope.startswith("input:") and n.inputs == [x]]
    return sliced or [x]


def width_of(shape: Shape, what: str) -> int:
    if len(shape) != 1:
        raise GraphError(f"this model {what} examples of shape {format_shape(shape)}, not rows of features; see its "
                         f"{'input' if what == 'takes' else 'output'}_shape")
    return shape[0]


def check_part(what: str, t: Any, spec: tuple[str, Shape, torch.dtype], first: Any) -> None:
    """One input's tensor of several: a dense 2-d tensor of that input's width and dtype,
    with as many examples as the first, on its device, finite."""
    name, shape, dtype = spec
    label = f"{what} (input {name})"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    problem = tensor_problem(t)
    if problem:
        raise ValueError(f"{label} {problem}")
    if t.dim() != 2 or t.shape[1] != shape[0]:
        raise ValueError(f"{label} must be 2-d [examples, {shape[0]}], got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{label} is {t.dtype}, but input {name} is {dtype}; convert it, e.g. X.to({dtype})")
    if isinstance(first, torch.Tensor) and (len(t) != len(first) or t.device != first.device):
        raise ValueError(f"{label} has {len(t)} examples on {t.device}, but the first input's tensor has "
                         f"{len(first)} on {first.device}; give every input the same examples, on one device")
    if not t.is_meta and not all_finite(t):
        row, col = (~finite_mask(t)).nonzero()[0].tolist()
        raise ValueError(f"{label} has NaN or inf values, first at [{row}, {col}] = {t[row, col].item()}; "
                         "drop or repair those examples (e.g. with torch.isfinite)")


def updated_twice(buffer: str, first: int, then: int, layers: list[Layer]) -> GraphError:
    """The error for a buffer two calls would give a next value in one training step."""
    if first == then:
        return GraphError(f"layer {then} ({layers[then]!r}) is called more than once, and in training each call "
                          f"gives its buffer {buffer} a next value of its own (a step writes one); give each call a "
                          "layer of its own")
    return GraphError(f"layers {first} ({layers[first]!r}) and {then} ({layers[then]!r}) both update {buffer} in "
                      "training (they hold one buffer); give each its own (e.g. .clone())")


# -- a model from a file -----------------------------------------------------------------------


def replayed_inputs(replay: Graph, graph: Graph) -> dict[Value, Value]:
    """The file's input x as the replayed graph's inputs: x itself, or the inputs it packs,
    one per slice of it in a scope "input:NAME", which must take its columns in order."""
    x = graph.inputs.get("x")
    if x is None or len(graph.inputs) != 1:
        raise GraphError(f"a functional model's IR takes one input, x; this one takes {', '.join(graph.inputs)}")
    readers = list(x.users.readers())
    if not any(n.scope.startswith("input:") for n in readers):
        return {x: replay.input("x", x.shape, x.dtype)}
    values, start = {}, 0
    for n in readers:
        stop = n.attrs.get("stop") if n.op is slice_ else None
        if not n.scope.startswith("input:") or n.op is not slice_ or n.attrs.get("axis") != 1 \
                or n.attrs.get("start") != start or n.attrs.get("step") != 1 or not isinstance(stop, int):
            raise GraphError(f"a functional model's IR reads its several inputs as slices of x, each in a scope "
                             f"'input:NAME', in order; {n!r} is not the one that takes x's columns from {start}")
        values[n.out] = replay.input(n.scope.removeprefix("input:"), (x.shape[0], stop - start), x.dtype)
        start = stop
    if start != x.shape[1]:
        raise GraphError(f"a functional model's inputs take {start} of the {x.shape[1]} columns of x")
    return values


def replayed_slot(name: str, value: Value, layers: list[Layer], calls: Calls) -> Slot:
    """Where the replayed graph's param `name` lives: layer j's place, for "j.short" of a
    layer that declares it (the IR's type and the layer's must agree), else the file's own."""
    j, _, short = name.partition(".")
    if not j.isdigit() or int(j) >= len(layers) or short not in dict(layers[int(j)].declared()):
        return value.slot
    layer = layers[int(j)]
    t = layer.slot(short).tensor
    if (tuple(t.shape), t.dtype) != (value.shape, value.dtype):
        raise GraphError(f"the IR declares {name} {format_type(value.dtype, value.shape)}, but layer {j} "
                         f"({layer!r}) holds its {short} as {format_type(t.dtype, tuple(t.shape))}")
    calls.reads[int(j)][short] = name
    return layer.slot(short)


def replay_ties(ties: dict[str, str], replay: Graph, layers: list[Layer], calls: Calls) -> None:
    """Each layer place not in the IR (whose params `replay` has, as the layers hold them)
    is tied to a param that is: it holds that tensor and reads that param; every place of
    every layer is one or the other."""
    for j, layer in enumerate(layers):
        for short, _ in layer.declared():
            name = f"{j}.{short}"
            if short in calls.reads[j]:
                continue
            owner = ties.get(name)
            if owner not in replay.params:
                raise GraphError(f"layer {j} ({layer!r}) holds {short}, which is neither a param of the IR nor tied "
                                 "to one")
            setattr(layer, short, replay.params[owner].data)
            calls.reads[j][short] = owner


def checked_calls(calls: Any, graph: Graph, layers: list[Layer]) -> dict[int, tuple[int, Value, int]]:
    """A file's layer calls ([j, input, start, stop] each, in order: see `Model.calls`) as
    {start: (j, the value it is called on, stop)}: each on a value defined before it, its
    nodes after the last call's, every layer called."""
    if not isinstance(calls, list):
        raise ValueError("the layer calls must be a JSON list")
    spans, end = {}, 0
    for c in calls:
        if not isinstance(c, list) or len(c) != 4 or not all(isinstance(v, (int, str)) and not isinstance(v, bool)
                                                              for v in c):
            raise ValueError(f"a layer call must be [layer, input, start, stop], got {c!r}")
        j, x, start, stop = c
        if not isinstance(j, int) or not 0 <= j < len(layers):
            raise GraphError(f"the file's calls name layer {j!r}, but it has {len(layers)} layers")
        if not isinstance(start, int) or not isinstance(stop, int) or not end <= start < stop <= len(graph.nodes):
            raise GraphError(f"the file's call {c!r} does not span nodes of the IR after the call before it")
        if isinstance(x, int) and 0 <= x < start:
            value = graph.nodes[x].out
        elif isinstance(x, str) and (x in graph.inputs or x in graph.params):
            value = graph.inputs[x] if x in graph.inputs else graph.params[x]
        else:
            raise GraphError(f"the file's call {c!r} is on {x!r}, which is no value of the IR defined before it")
        spans[start], end = (j, value, stop), stop
    uncalled = sorted(set(range(len(layers))) - {j for j, _, _ in spans.values()})
    if uncalled:
        j = uncalled[0]
        raise GraphError(f"layer {j} ({layers[j]!r}) is called nowhere in the file's calls")
    return spans
