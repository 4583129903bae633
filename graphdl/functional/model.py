"""`Model`: a model written with the functional ops, trained by Sequential's own methods,
and `load`, for both kinds of model file (see graphdl.functional)."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from .. import io
from ..checks import GraphError, Shape, flag, format_shape, format_type
from ..ir import Graph, Value
from ..layers import Build, Layer
from ..losses import Loss
from ..model import Sequential, finish_graph, layer_from_config
from ..train import History

# -- the model ---------------------------------------------------------------------------------
from .calls import CALLS, Calls, GraphParam, forward_of
from .template import (
    check_given,
    check_part,
    checked_calls,
    checked_inputs,
    checked_output,
    columns_of,
    copy_nodes,
    fed_values,
    layer_params,
    leading_to,
    places_of,
    replay_ties,
    replayed_inputs,
    replayed_slot,
    template_of,
    updated_twice,
    used_layers,
    width_of,
)


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
        given = checked_inputs(inputs)
        output = checked_output(outputs, given)
        calls = CALLS.get(output.graph, Calls())
        steps, read = leading_to(output, calls)
        check_given(given, read, output)
        self.layers: list[Layer] = used_layers(calls, steps)
        read |= layer_params(output.graph, calls, self.layers)  # Dropout's key too, which inference reads not
        self._places, params = places_of(output.graph, calls, self.layers, read)
        self._template, self._calls = template_of(name or output.graph.name, given, output, steps, calls, self.layers,
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
        kept = {p.name for p in self._places if not isinstance(p.holder, GraphParam)}
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
        return finish_graph(g, h, loss, prediction, updates, h.dtype)

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
                copy_nodes(g, [nodes[i]], values)
                i += 1
                continue
            layer, start, mine = self.layers[c.j], len(g.nodes), {}
            with g.scope(f"{c.j}:{type(layer).__name__}"):
                build = Build(g, f"{c.j}.", owners, slots, training, mine)
                values[c.output] = forward_of(layer, build, values[c.input])
            spans.append((c.j, values[c.input], start, len(g.nodes)))
            for buffer, value in mine.items():
                if buffer in updates:
                    raise updated_twice(buffer, updaters[buffer], c.j, self.layers)
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
        return width_of(self.input_shape, "takes")

    @property
    def out_features(self) -> int:
        """The width of the rows the model gives."""
        return width_of(self.output_shape, "gives")

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
        columns = columns_of(self._inputs)
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
        fed = {v: i for i, v in enumerate(fed_values(self._template))}
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
            check_part(f"{what}[{i}]", t, spec, X[0])
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
        spans = checked_calls(calls, graph, layers)
        replay = Graph(graph.name)
        values = replayed_inputs(replay, graph)
        record = Calls(layers=layers, numbers={id(layer): k for k, layer in enumerate(layers)},
                        reads=[{} for _ in layers])
        for name, value in graph.params.items():
            values[value] = replay.param(name, replayed_slot(name, value, layers, record))
        replay_ties(ties, replay, layers, record)
        CALLS[replay] = record
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
                copy_nodes(replay, [nodes[i]], values)
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
