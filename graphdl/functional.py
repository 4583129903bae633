"""Functional models: layers called on graph values, and `Model`, which trains what they build.

Called on a value of a graph, a layer builds its forward pass in that graph
(`h = gd.Linear(4, 16)(x)`), beside graphdl's functional ops (`h + gd.tanh(...)`), as in
Keras' functional API: a network need not be a chain. It may have several inputs, skip
connections, a layer called twice. `gd.Model(inputs, output)` trains such a graph with
the fit, predict, evaluate, summary, callbacks, checkpoints and model files a
`gd.Sequential` has: they are Sequential's own methods, which ask a model only for what
this one provides (`graph`, `places`, `parameters`, `binding`, `compiled`, ...).

The layers of a graph. The layers called on one graph are numbered by their first call,
k = 0, 1, ...: layer k builds in the scope "k:Type" and its params are "k.weight", ...,
as in a Sequential. Called again, a layer reads the same params (one param, whose
gradients add up); a layer holding a tensor that the graph already has as a param (a
tie, `l2.weight = l1.weight`, or a tensor given to `graph.param`) reads that param.
Which layer is which, and each call (the layer, the value it was called on, the value
it gave), is recorded here, per graph (`_CALLS`), not in the IR.

Modes. A call builds the layer's forward in inference mode, the graph `predict` runs
(Dropout passes its input through, BatchNorm reads its running statistics). Each call
gives a value of its own, the output of a node it built: one whose forward gives back
a value it did not build (Dropout's inference forward gives its input) gives it as
`value * 1`, so that what reads the call's output is told from what reads its input.
A model rebuilds each call in the mode asked for (`graph(training=True)` is the graph
fit trains: Dropout draws its mask, BatchNorm normalises by the batch and gives its
running statistics' next values, labelled "next/NAME", as a Sequential's do).

A model keeps its own copy of what its output needs (its template): the inputs, the
nodes and layer calls that lead to the output and the params they read, its layers
renumbered in order of first call (a layer the output does not use is not the model's).
`graph()` builds a fresh graph from it each time: the nodes copied, each call built
again by its layer in the mode asked for, the loss appended. Several inputs are fed as
one tensor, their features side by side, because fit's epochs walk one X: the
template's first nodes slice them apart, each in the scope "input:NAME". So they must be
rows [N, features] of one dtype, and fit, predict and evaluate take a tuple, one tensor
per input, joined once per call (a copy of the data).

Ties made after building. The template fixes which param each place reads. When two of
its params come to hold one tensor later (`l2.weight = l1.weight` after the model was
built), `graph()` makes them one param, as a Sequential does; a place that read another's
param and is given a tensor of its own cannot be rebuilt from the template, and is
refused.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import io
from .checks import GraphError, Shape, flag, format_shape, format_type, tensor_problem
from .ir import Graph, Node, Slot, Value
from .layers import Build, Layer, Param, same_memory
from .losses import Loss
from .model import Sequential, layer_from_config
from .ops import reshape, slice_
from .step import NEXT
from .train import History

# -- layers called on graph values ---------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Call:
    """One call of layer k on the value `input` (held weakly: the record of a graph must
    not keep the graph alive)."""

    k: int
    input: weakref.ref[Value]


@dataclass
class _Calls:
    """The layers called on one graph, numbered by first call, the graph param each place
    of each layer reads (its own "k.weight", or the param it is tied to), and the calls,
    by the value each gave."""

    layers: list[Layer] = field(default_factory=list)
    numbers: dict[int, int] = field(default_factory=dict)  # id(layer) -> k; `layers` keeps each alive
    reads: list[dict[str, str]] = field(default_factory=list)  # per k: short name -> graph param name
    made: weakref.WeakKeyDictionary[Value, _Call] = field(default_factory=weakref.WeakKeyDictionary)

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


_CALLS: weakref.WeakKeyDictionary[Graph, _Calls] = weakref.WeakKeyDictionary()
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
    calls = _CALLS.setdefault(graph, _Calls())
    k = calls.number(graph, layer)
    prefix = f"{k}."
    owners = {prefix + short: name for short, name in calls.reads[k].items()}
    slots = {prefix + short: layer.slot(short) for short in calls.reads[k]}
    with graph.scope(calls.scope(k)):
        y = _forward(layer, Build(graph, prefix, owners, slots), x)
    calls.made[y] = _Call(k, weakref.ref(x))
    return y


Layer.__call__ = call  # type: ignore[attr-defined]  # installed here, beside the record it keeps


def _forward(layer: Layer, build: Build, x: Value) -> Value:
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


class _GraphParam(Layer):
    """A param made with `graph.param`, held as a layer holds its own (`tensor`, in the
    param's slot), so that the model lists, moves, saves and loads it as it does theirs."""

    tensor = Param()

    def __init__(self, slot: Slot) -> None:
        self._slots = {"tensor": slot}

    def __repr__(self) -> str:
        return "graph param"


@dataclass(frozen=True)
class _Place:
    """Where a model's tensor is held (a layer's attribute, or a graph param's slot), and
    the template param the model's graph reads there."""

    name: str  # "2.weight", or a graph param's own name
    holder: Layer
    short: str  # the attribute: "weight", or "tensor" for a graph param
    trainable: bool
    reads: str  # the template param: its own name, or the earlier place's it was tied to when built


@dataclass(frozen=True, eq=False)
class _TemplateCall:
    """A call of the model's layer j in its template: on `input`, giving `output`, its
    nodes the template's `start` to `stop` - 1 (rebuilt, in the mode asked for, by each
    `graph()`)."""

    j: int
    input: Value
    output: Value
    start: int
    stop: int


# -- the model ---------------------------------------------------------------------------------


class Model:
    """A model of a graph built with layers called on its values and the functional ops.

    Args:
        inputs: the graph's inputs the model takes (`graph.input(...)`): one value, or a
            list of them, each [N, ...] (several: rows [N, features] of one dtype).
        outputs: the value it predicts, [N, ...], of the same graph (or a list of that one value).
        name: the model's graph's name; default the graph's.

    The model's layers are those its output uses, numbered by first call: layer k owns
    "k.weight", "k.bias", ... as in a Sequential. `fit`, `predict` and `evaluate` are
    Sequential's, taking one tensor per input (a tuple with several inputs); so are
    `summary`, `save` (read back by `gd.load`), `to`, `parameters`, `state` and `ties`.
    fit trains the graph in training mode, each layer call built again in it (Dropout
    drops, BatchNorm normalises by the batch and moves its running statistics, which the
    step writes); predict and evaluate run it in inference mode, as the calls built it.

    Raises:
        GraphError: an input that is not one of the graph's inputs, an output of another
            graph or not batch-first, an input the output needs but not given, or params
            whose names clash with the model's.
    """

    file_kind = io.FUNCTIONAL  # what model files call it (graphdl.io)

    def __init__(self, inputs: Value | list[Value] | tuple[Value, ...], outputs: Value | list[Value],
                 name: str | None = None) -> None:
        given = _checked_inputs(inputs)
        output = _checked_output(outputs, given)
        calls = _CALLS.get(output.graph, _Calls())
        steps, read = _leading_to(output, calls)
        _check_given(given, read, output)
        self.layers: list[Layer] = _used_layers(calls, steps)
        read |= _layer_params(output.graph, calls, self.layers)  # Dropout's key too, which inference reads not
        self._places, params = _places(output.graph, calls, self.layers, read)
        self._template, self._calls = _template(name or output.graph.name, given, output, steps, calls, self.layers,
                                                self._places, params)
        self._inputs = tuple((v.name, v.shape[1:], v.dtype) for v in given)  # what fit's X holds, per input
        self.loss: Loss | None = None  # set by fit (or load): evaluate's and fit's default
        self.history: History | None = None  # the last fit's History, kept if it stops early
        self.stop_training = False  # a callback sets it to end fit after the epoch (as in Keras)
        self._cache: dict[Any, Any] = {}  # compiled functions by purpose (Sequential.compiled)
        self._signature: tuple = ()
        self.graph()  # every check now, before any work: names, ties, trainable and fixed tensors held as one

    # -- what a model is to the training loop, the files and Sequential's methods -----------

    def places(self) -> list[tuple[str, Layer, str, bool, torch.Tensor]]:
        """(name, holder, attribute, trainable, tensor) for every place the model holds a
        tensor, in order: a layer's ("2.weight"), or a graph param's (holder a stand-in
        whose attribute `tensor` is the param's slot)."""
        return [(p.name, p.holder, p.short, p.trainable, p.holder.slot(p.short).tensor) for p in self._places]

    owners = Sequential.owners
    parameters = Sequential.parameters
    state = Sequential.state
    binding = Sequential.binding
    _structure = Sequential._structure
    compiled = Sequential.compiled
    _check_shapes = Sequential._check_shapes
    to = Sequential.to
    config = Sequential.config
    save = Sequential.save
    summary = Sequential.summary
    _output_shapes = Sequential._output_shapes
    _repr_mimebundle_ = Sequential._repr_mimebundle_

    def ties(self) -> dict[str, str]:
        """{place: the param it shares} for each tensor held in more than one place of a
        layer, e.g. {"2.weight": "0.weight"}. (A graph param that came to share another's
        tensor after building is no place of its own any more: it is not listed, nor kept
        in model files.)"""
        kept = {p.name for p in self._places if not isinstance(p.holder, _GraphParam)}
        return {name: owner for name, owner in Sequential.ties(self).items() if name in kept}

    def graph(self, loss: Loss | None = None, name: str | None = None, prediction: bool = False,
              training: bool = False) -> Graph:
        """The IR of the forward pass (input "x", output: the prediction), or of the loss
        with `loss` (then `prediction=True` returns the prediction too, as a second
        output), built from the template: its nodes copied, its layer calls built again,
        params that now hold one tensor made one.

        `training=True` builds the graph in training mode, the one `fit` differentiates, as
        `Sequential.graph` does: Dropout drops and BatchNorm uses the batch's statistics, and
        after the outputs above come the next values of the buffers the layers update
        (BatchNorm's running statistics, Dropout's key), each labelled "next/{name}".
        Without it, the graph is in inference mode, as `predict` and `evaluate` run it."""
        updates: dict[str, Value] = {}
        g, h, _ = self._build(name, flag("training", training), updates)
        if loss is None:
            g.output(h)
        else:
            if not isinstance(loss, Loss):
                raise GraphError(f"loss must be a graphdl loss such as gd.MSE(), got {loss!r}")
            y = g.input("y", loss.target_shape(h.shape), h.dtype)
            with g.scope("loss"):
                g.output(loss(h, y))
            if prediction:
                g.output(h)
        for buffer, value in updates.items():
            g.output(value, label=NEXT + buffer)
        return g

    def calls(self) -> list[list[int | str]]:
        """The layer calls of the forward IR (`graph()`), in order, as model files keep them:
        [j, input, start, stop] for layer j called on `input` (the name of an input or a
        param, or k for the node %k that gives it), its nodes %start to %(stop - 1), the
        last one giving its output."""
        g, _, spans = self._build(None, False, {})
        return [[j, x.name if x.node is None else g.position(x.node), start, stop] for j, x, start, stop in spans]

    def _build(self, name: str | None, training: bool,
               updates: dict[str, Value]) -> tuple[Graph, Value, list[tuple[int, Value, int, int]]]:
        """A graph of the template, in the mode asked for: (the graph, its prediction, each
        call's (j, input, start, stop) there); the buffers' next values go into `updates`."""
        places = self.places()
        owners = self.owners(places)
        self._check_places(places, owners)
        slots = {name: holder.slot(short) for name, holder, short, _, _ in places}
        template = self._template
        g = Graph(name or template.name)
        values = {v: g.input(v.name, v.shape, v.dtype) for v in template.inputs.values()}
        for param, v in template.params.items():  # an owner comes before the params it owns
            owner = owners[param]
            values[v] = g.param(param, v.slot) if owner == param else g.params[owner]
        at = {c.start: c for c in self._calls}
        nodes, spans, updaters = template.nodes, [], {}
        i = 0
        while i < len(nodes):
            c = at.get(i)
            if c is None:
                _copy_nodes(g, [nodes[i]], values)
                i += 1
                continue
            layer, start, mine = self.layers[c.j], len(g.nodes), {}
            with g.scope(f"{c.j}:{type(layer).__name__}"):
                values[c.output] = _forward(layer, Build(g, f"{c.j}.", owners, slots, training, mine), values[c.input])
            spans.append((c.j, values[c.input], start, len(g.nodes)))
            for buffer, value in mine.items():
                if buffer in updates:
                    raise _updated_twice(buffer, updaters[buffer], c.j, self.layers)
                updates[buffer], updaters[buffer] = value, c.j
            i = c.stop
        return g, values[template.outputs[0]], spans

    def _check_places(self, places: list[tuple[str, Layer, str, bool, torch.Tensor]], owners: dict[str, str]) -> None:
        """The template still describes the tensors: a place tied when built still shares its
        param's tensor, and each param has the shape and dtype it was built with."""
        for place, (name, holder, short, _, t) in zip(self._places, places, strict=True):
            if place.reads != name and owners[name] != owners[place.reads]:
                raise GraphError(f"{name} ({holder!r}.{short}) no longer holds the tensor of {place.reads}, which "
                                 f"the model's graph reads in its place (they were one tensor when the model was "
                                 f"built); give it {place.reads}'s tensor again, or build the model again from the "
                                 "layers as they are now")
            declared = self._template.params.get(name)
            if declared is not None and (tuple(t.shape), t.dtype) != (declared.shape, declared.dtype):
                raise GraphError(f"{name} ({holder!r}.{short}) is now {format_type(t.dtype, tuple(t.shape))}, but "
                                 f"the model was built for {format_type(declared.dtype, declared.shape)}; assign a "
                                 "tensor of that shape and dtype, or build the model again")

    @property
    def input_shape(self) -> Shape:
        """The shape of one example fit's X holds, the batch dim left out (with several inputs,
        their features side by side)."""
        return self._template.inputs["x"].shape[1:]

    @property
    def output_shape(self) -> Shape:
        """The shape of one example the model gives, the batch dim left out."""
        return self._template.outputs[0].shape[1:]

    @property
    def in_features(self) -> int:
        """The width of the rows fit's X holds (with several inputs, their widths added up)."""
        return _width(self.input_shape, "takes")

    @property
    def out_features(self) -> int:
        """The width of the rows the model gives."""
        return _width(self.output_shape, "gives")

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs, in the order fit, predict and evaluate take them."""
        return tuple(name for name, _, _ in self._inputs)

    def dtype(self) -> torch.dtype:
        """The dtype of the prediction: the targets' dtype."""
        return self._template.outputs[0].dtype

    def check_input(self, X: Any, what: str = "X") -> None:
        """Refuse values a layer reading an input directly cannot take (an index outside
        an Embedding's table), naming the layer; shapes and dtypes are the graph's to check."""
        if not isinstance(X, torch.Tensor) or X.dim() < 1:
            return
        columns = _columns(self._inputs)
        for j, layer in enumerate(self.layers):
            for i in self._read_inputs(j):
                part = X if len(columns) == 1 else X[:, columns[i][0]:columns[i][1]]
                layer.check_input(part, what if len(columns) == 1 else f"{what}[{i}]", f"layer {j}")

    def layer_inputs(self) -> list[tuple[int, Layer, Shape]]:
        """Each layer call, in order: the layer's number, the layer and the shape of one
        example it is called on (the batch dim left out); fit asks each layer whether it
        can train on the smallest step."""
        return [(c.j, self.layers[c.j], c.input.shape[1:]) for c in self._calls]

    def _read_inputs(self, j: int) -> list[int]:
        """The inputs (by index) that layer j is called on directly."""
        fed = {v: i for i, v in enumerate(_fed_values(self._template))}
        return sorted({fed[c.input] for c in self._calls if c.j == j and c.input in fed})

    # -- fit, predict, evaluate: Sequential's, with one tensor per input -------------------

    def fit(self, X: Any, Y: torch.Tensor, *args: Any, **kwargs: Any) -> History:
        """`gd.Sequential.fit`, which documents every argument: X (and validation_data's X)
        is one tensor per input, a tuple in the order of the model's inputs, or a tensor
        for a model of one input."""
        bound = _FIT.bind(self, X, Y, *args, **kwargs)
        bound.arguments["X"] = self._fed(X, "X")
        validation = bound.arguments.get("validation_data")
        if isinstance(validation, (tuple, list)) and len(validation) in (2, 3):  # (X, Y) or (X, Y, weights)
            bound.arguments["validation_data"] = (self._fed(validation[0], "validation_data[0]"), *validation[1:])
        return Sequential.fit(*bound.args, **bound.kwargs)

    def predict(self, X: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`gd.Sequential.predict`, X one tensor per input (see `fit`)."""
        bound = _PREDICT.bind(self, X, *args, **kwargs)
        bound.arguments["X"] = self._fed(X, "X")
        return Sequential.predict(*bound.args, **bound.kwargs)

    def evaluate(self, X: Any, Y: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`gd.Sequential.evaluate`, X one tensor per input (see `fit`)."""
        bound = _EVALUATE.bind(self, X, Y, *args, **kwargs)
        bound.arguments["X"] = self._fed(X, "X")
        return Sequential.evaluate(*bound.args, **bound.kwargs)

    def _fed(self, X: Any, what: str) -> Any:
        """X as fit's one feed: the lone tensor of a model of one input (as given: fit checks
        it), or the tensors of several inputs, each checked, side by side."""
        if len(self._inputs) == 1:
            return X[0] if isinstance(X, (tuple, list)) and len(X) == 1 else X
        names = ", ".join(self.input_names)
        if not isinstance(X, (tuple, list)) or len(X) != len(self._inputs):
            got = f"{type(X).__name__} of length {len(X)}" if isinstance(X, (tuple, list)) else type(X).__name__
            raise ValueError(f"{what} must be a tuple of {len(self._inputs)} tensors, one per input ({names}), "
                             f"got a {got}")
        for i, (t, spec) in enumerate(zip(X, self._inputs, strict=True)):
            _check_part(f"{what}[{i}]", t, spec, X[0])
        return torch.cat(list(X), dim=1)

    @property
    def _summary_title(self) -> str:  # summary's first line
        inputs = ", ".join(f"{name} {format_shape((self._template.inputs['x'].shape[0], *shape))}"
                           for name, shape, _ in self._inputs)
        return f"Model {self._template.name}, inputs {inputs}"

    def __repr__(self) -> str:
        inputs = ", ".join(f"{n}: {format_type(d, ('N', *s))}" for n, s, d in self._inputs)
        out = self._template.outputs[0]
        inner = "".join(f"\n  ({j}) {layer!r}" for j, layer in enumerate(self.layers))
        return f"Model {self._template.name}({inputs}) -> {format_type(out.dtype, out.shape)}{inner}"

    @classmethod
    def from_config(cls, config: list[dict[str, Any]], graph: Graph, ties: Any, calls: Any) -> Model:
        """The model a file describes: its layers (`config`), the forward graph its IR holds
        (`graph`: the input "x", sliced into several inputs in the scopes "input:NAME",
        the params "k.weight" and any others), its ties ({place: the param it shares})
        and its layer calls (`calls`, as `Model.calls` gives them). The graph is replayed
        as a user's graph: its nodes copied, each call's nodes built again by calling the
        layer, and the model built from it as any other; the file's IR must be what that
        model builds, and its calls the model's (graphdl.io compares them)."""
        layers = [layer_from_config(k, spec) for k, spec in enumerate(config)]
        if not isinstance(ties, dict) or not all(isinstance(v, str) for v in ties.values()):
            raise ValueError("the ties must be a JSON object of place names")
        spans = _checked_calls(calls, graph, layers)
        replay = Graph(graph.name)
        values = _replayed_inputs(replay, graph)
        record = _Calls(layers=layers, numbers={id(layer): k for k, layer in enumerate(layers)},
                        reads=[{} for _ in layers])
        for name, value in graph.params.items():
            values[value] = replay.param(name, _replayed_slot(name, value, layers, record))
        _replay_ties(ties, replay, layers, record)
        _CALLS[replay] = record
        nodes, i = graph.nodes, 0
        while i < len(nodes):
            if i in spans:
                j, x, stop = spans[i]
                if x not in values:
                    raise GraphError(f"the file's call of layer {j} at %{i} is on {x!r}, a value inside another "
                                     "call")
                values[nodes[stop - 1].out] = layers[j](values[x])
                i = stop
                continue
            if nodes[i].out not in values:  # the inputs' slices are inputs
                _copy_nodes(replay, [nodes[i]], values)
            i += 1
        if len(graph.outputs) != 1:
            raise GraphError(f"a functional model's IR returns its prediction, one value; this one returns "
                             f"{len(graph.outputs)}")
        return cls(list(replay.inputs.values()), values[graph.outputs[0]])


_FIT, _PREDICT, _EVALUATE = (inspect.signature(f) for f in (Sequential.fit, Sequential.predict, Sequential.evaluate))


def load(path: str | os.PathLike[str]) -> Sequential | Model:
    """Load a model saved with `model.save(path)` (or a checkpoint fit wrote): a
    Sequential or a functional Model, as the file says.

    Args:
        path: the model file.

    Returns:
        A `gd.Sequential` or `gd.Model` with the saved layers, ties and bit-identical weights.

    Raises:
        GraphError: the file is missing, truncated, corrupt, not a graphdl model (a
            pickle, a zip, a bare graph, another program's safetensors file), or its
            weights do not match the shapes its IR declares.
    """
    return io.load_model(path, Sequential, Model)[0]


# -- building a model: its inputs, its output, what the output needs ----------------------------


def _checked_inputs(inputs: Any) -> list[Value]:
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


def _checked_output(outputs: Any, given: list[Value]) -> Value:
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


def _leading_to(output: Value, calls: _Calls) -> tuple[list[tuple[Node, _Call | None]], set[Value]]:
    """What the output needs, in graph order: (node, None) for a node of an op, (the node
    giving a call's output, the call) for a layer call, whose own nodes are the layer's to
    build again; and the inputs and params they read (a call: the value it was called on)."""
    seen: set[Value] = set()
    made: dict[Value, _Call] = {}
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


def _check_given(given: list[Value], read: set[Value], output: Value) -> None:
    missing = [v.name for v in output.graph.inputs.values() if v in read and v not in given]
    if missing:
        names = ", ".join(v.name for v in given)
        raise GraphError(f"Model's output reads input{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not "
                         f"among its inputs ({names}); give every input it reads, e.g. "
                         f"gd.Model([{', '.join([*(v.name for v in given), *missing])}], out)")


def _used_layers(calls: _Calls, steps: list[tuple[Node, _Call | None]]) -> list[Layer]:
    """The layers of the calls the output needs, in order of first call: the model's layers."""
    used = {c.k for _, c in steps if c is not None}
    return [layer for k, layer in enumerate(calls.layers) if k in used]


def _layer_params(graph: Graph, calls: _Calls, layers: list[Layer]) -> set[Value]:
    """The graph params the layers' places read, whether or not a node reads them."""
    return {graph.params[name] for layer in layers for name in calls.reads[calls.numbers[id(layer)]].values()
            if name in graph.params}


def _places(graph: Graph, calls: _Calls, layers: list[Layer],
            read: set[Value]) -> tuple[list[_Place], list[tuple[Value | None, Slot, str]]]:
    """The model's places, and the params its template declares: (the graph's param, or
    None for a layer's that its graph never declared, its slot, the name it takes there),
    those the model reads in declaration order. A param is read in one or more places:
    first the one that declared it (a layer's own, or a graph param's), then the layers'
    tied to it, in order; it takes its first place's name, and each place `reads` it."""
    declarer: dict[str, _Place] = {}  # a param's place in the layer that declared it ("k.weight" for layer k's)
    readers: dict[str, list[_Place]] = {}  # the places of other layers that read it (tied when called)
    for j, layer in enumerate(layers):
        k = calls.numbers[id(layer)]
        for short, p in layer.declared():
            name = calls.reads[k].get(short)
            if name is None:
                raise GraphError(f"layer {j} ({layer!r}) holds {short}, which it did not hold when it was called; "
                                 "call the layer again in a new graph")
            place = _Place(f"{j}.{short}", layer, short, p.trainable, "")
            if name == f"{k}.{short}":
                declarer[name] = place
            else:
                readers.setdefault(name, []).append(place)
    places: list[_Place] = []
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
            first = _Place(name, _GraphParam(v.slot), "tensor", True, "")
        group = [first, *readers.get(name, [])]
        places += [_Place(p.name, p.holder, p.short, p.trainable, first.name) for p in group]
        params.append((v, first.holder.slot(first.short), first.name))
    _check_names([p.name for p in places], places)
    return places, params


def _declared_params(calls: _Calls) -> set[str]:
    """The graph params the layers declared, each for one of its own places ("k.weight")."""
    return {f"{k}.{short}" for k, reads in enumerate(calls.reads) for short, name in reads.items()
            if name == f"{k}.{short}"}


def _check_names(names: list[str], places: list[_Place]) -> None:
    for p in places:
        if names.count(p.name) > 1 or p.name in ("x", "y"):
            what = "the model's input" if p.name == "x" else "the model's targets" if p.name == "y" else \
                "a layer's param in the model's numbering of its layers"
            raise GraphError(f"graph param {p.name!r} has the name of {what}; give the param another name")


def _template(name: str, given: list[Value], output: Value, steps: list[tuple[Node, _Call | None]], calls: _Calls,
              layers: list[Layer], places: list[_Place],
              params: list[tuple[Value | None, Slot, str]]) -> tuple[Graph, list[_TemplateCall]]:
    """The model's own graph of the forward pass, in inference mode: input "x" (several
    inputs side by side, sliced apart), the template params, the output's nodes, and its
    calls, built by their layers in the model's layer scopes; and those calls."""
    t = Graph(name)
    values: dict[Value, Value] = {}
    if len(given) == 1:
        values[given[0]] = t.input("x", given[0].shape, given[0].dtype)
    else:
        x = t.input("x", (given[0].shape[0], sum(v.shape[1] for v in given)), given[0].dtype)
        for v, (start, stop) in zip(given, _columns([(v.name, v.shape[1:], v.dtype) for v in given]), strict=True):
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
            _copy_nodes(t, [node], values, scopes)
            continue
        j, x, start = number[c.k], values[c.input()], len(t.nodes)
        with t.scope(f"{j}:{type(layers[j]).__name__}"):
            y = values[node.out] = _forward(layers[j], Build(t, f"{j}.", owners, slots), x)
        template_calls.append(_TemplateCall(j, x, y, start, len(t.nodes)))
    t.output(values[output])
    return t, template_calls


def _copy_nodes(g: Graph, nodes: Iterable[Node], values: dict[Value, Value], scopes: dict[str, str] | None = None,
                ) -> None:
    """Add a copy of each node to `g`, reading `values` (old value -> new), in its scope
    (renamed by `scopes`), at the source line it was made at; each op's rule checks it again."""
    for node in nodes:
        scope = node.scope if scopes is None else scopes.get(node.scope, node.scope)
        with g.scope(scope, node.backward):
            values[node.out] = g.add_node(node.op, [values[v] for v in node.inputs], dict(node.attrs), node.where)


def _columns(inputs: Iterable[tuple[str, Shape, torch.dtype]]) -> list[tuple[int, int]]:
    """Each input's columns in the one tensor fit feeds: (start, stop)."""
    spans, start = [], 0
    for _, shape, _ in inputs:
        width = shape[0] if shape else 1
        spans.append((start, start + width))
        start += width
    return spans


def _fed_values(template: Graph) -> list[Value]:
    """The template's values of its inputs: x, or the slices of it."""
    x = template.inputs["x"]
    sliced = [n.out for n in template.nodes if n.scope.startswith("input:") and n.inputs == [x]]
    return sliced or [x]


def _width(shape: Shape, what: str) -> int:
    if len(shape) != 1:
        raise GraphError(f"this model {what} examples of shape {format_shape(shape)}, not rows of features; see its "
                         f"{'input' if what == 'takes' else 'output'}_shape")
    return shape[0]


def _check_part(what: str, t: Any, spec: tuple[str, Shape, torch.dtype], first: Any) -> None:
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
    if not t.is_meta and (t.is_floating_point() or t.is_complex()):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            row, col = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{label} has NaN or inf values, first at [{row}, {col}] = {t[row, col].item()}; "
                             "drop or repair those examples (e.g. with torch.isfinite)")


def _updated_twice(buffer: str, first: int, then: int, layers: list[Layer]) -> GraphError:
    """The error for a buffer two calls would give a next value in one training step."""
    if first == then:
        return GraphError(f"layer {then} ({layers[then]!r}) is called more than once, and in training each call "
                          f"gives its buffer {buffer} a next value of its own (a step writes one); give each call a "
                          "layer of its own")
    return GraphError(f"layers {first} ({layers[first]!r}) and {then} ({layers[then]!r}) both update {buffer} in "
                      "training (they hold one buffer); give each its own (e.g. .clone())")


# -- a model from a file -----------------------------------------------------------------------


def _replayed_inputs(replay: Graph, graph: Graph) -> dict[Value, Value]:
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


def _replayed_slot(name: str, value: Value, layers: list[Layer], calls: _Calls) -> Slot:
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


def _replay_ties(ties: dict[str, str], replay: Graph, layers: list[Layer], calls: _Calls) -> None:
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


def _checked_calls(calls: Any, graph: Graph, layers: list[Layer]) -> dict[int, tuple[int, Value, int]]:
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
