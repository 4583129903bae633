"""What every layer is made of: `Param` (a layer attribute holding a tensor in a `Slot`),
`Layer`, and `Build`, which a layer's forward builds the IR with."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..checks import (
    GraphError,
    Shape,
    check_param_tensor,
    declared_with,
    format_shape,
    whole,
)
from ..ir import Graph, Slot, Value


class Param:
    """A layer attribute holding a param: reading it gives the live tensor; assigning a
    tensor (`layer.weight = t`) puts it in the param's `Slot`, so every graph and compiled
    function built from the layer computes with `t` from its next call on.

    `trainable=False` makes a buffer: a graph param that `fit` does not differentiate and
    the optimizer never touches, such as Standardize's mean and std (a layer may still
    give its next value in a training graph, as BatchNorm does: see `Build.update`).
    `shape(layer)` gives the shape the layer declares for it (None where it is not known
    yet): a tensor of another shape is refused where it is assigned, not found later as a
    model that computes something else. `values(tensor)` says what is wrong with a
    tensor's values (None if nothing), for a buffer whose values are not free
    (Standardize's std must be finite and > 0): checked where it is assigned, a model
    file's included."""

    def __init__(self, trainable: bool = True,
                 shape: Callable[[Any], tuple[int | None, ...]] | None = None, model_dtype: bool = True,
                 values: Callable[[torch.Tensor], str | None] | None = None) -> None:
        self.trainable = trainable
        self.shape = shape
        self.model_dtype = model_dtype  # False: its dtype is its own (Dropout's f64 key), not the model's
        self.values = values

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Layer | None, owner: type | None = None) -> Any:
        return self if layer is None else layer.slot(self.name).tensor

    def __set__(self, layer: Layer, tensor: torch.Tensor) -> None:
        check_param_tensor(f"{type(layer).__name__}.{self.name}", tensor)
        expected = self.shape(layer) if self.shape is not None else None
        if expected is not None and None not in expected and tuple(tensor.shape) != expected:
            hint = ""
            if tensor.dim() == 2 and tuple(tensor.shape) == expected[::-1]:
                hint = "; did you mean to transpose it (tensor.T)? PyTorch's Linear stores its weight as [out, in]"
            raise GraphError(f"{layer!r}.{self.name} must have shape {list(expected)}, got {list(tensor.shape)}"
                             f"{hint}")
        problem = self.values(tensor) if self.values is not None and not tensor.is_meta else None
        if problem:
            raise GraphError(f"{layer!r}.{self.name} {problem}")
        slots = layer.__dict__.setdefault("_slots", {})
        if self.name in slots:
            slots[self.name].tensor = tensor
        else:
            slots[self.name] = Slot(tensor)


class Layer:
    """A building block: owns its tensors and emits the IR of its forward pass.

    A model tracks the shape of one example (the batch dim left out) through its layers:
    each layer says what it gives for what it is given (`output_shape`) and, first in a
    model, what it takes (`input_shape`). A layer of features (`in_features`, such as
    Linear) works on the last dim, whatever the rank before it.
    """

    in_features: int | None = None  # None: keeps the width it is given
    out_features: int | None = None
    # The output has the input's shape, whatever it is (an activation). First in a model,
    # such a layer lets the model look at the next one for the input's shape.
    keeps_shape: bool = True
    input_dtype: torch.dtype | None = None  # what it takes when not the model's dtype (Embedding: int64)
    passes_dtype: bool = False  # it only moves elements (Flatten, Reshape): any dtype goes through
    # In inference, each row of the output is computed from that row of the input alone
    # (so predict, evaluate and fit's metrics may run a data set in chunks of rows,
    # `train.chunk_rows`). Every built-in layer's is: BatchNorm reads its running
    # statistics, Dropout passes its input through. It counts where it is said alongside
    # `forward` (`keeps_rows_apart`): a layer of one's own, or one that overrides a
    # built-in's forward (in a subclass or on the instance), runs a data set whole unless it
    # says True there; a subclass that changes what an inherited forward computes says it.
    rows_apart: bool = False

    def input_shape(self) -> Shape | None:
        """The shape of one example this layer takes first in a model (the batch dim left
        out), or None if it takes any; a Sequential's `input_shape=` overrides it."""
        return None if self.in_features is None else (self.in_features,)

    def output_shape(self, shape: Shape) -> Shape:
        """The shape of one example out of this layer for one example of `shape` in (the batch
        dim left out of both). Raises GraphError saying why it cannot take `shape`.

        A layer of features maps the last dim; one that keeps the shape keeps it; any other
        is built once on a scratch graph, so its ops' shape rules answer (and explain)."""
        if self.in_features is not None and (not shape or shape[-1] != self.in_features):
            raise GraphError(f"takes {self.in_features} features (the last dim), got examples of shape "
                             f"{format_shape(shape)}")
        if self.in_features is not None and self.out_features is not None:
            return (*shape[:-1], self.out_features)
        if self.keeps_shape:
            return tuple(shape)
        return self._built_shape(shape)

    def check_input(self, X: torch.Tensor, what: str, where: str) -> None:
        """Refuse values of the model's input X (named `what`) that this layer, the first
        to read it, cannot take: a GraphError naming the layer (`where`, e.g. "layer 0").
        Most layers need no check (the compiled graph checks shapes and dtypes)."""

    def _built_shape(self, shape: Shape) -> Shape:
        slots = {name: self.slot(name) for name, _ in self.declared()}
        dtype = self.input_dtype or next((slot.tensor.dtype for slot in slots.values()), torch.float32)
        g = Graph("shape")
        out = self.forward(Build(g, "", {name: name for name in slots}, slots), g.input("x", (None, *shape), dtype))
        if not out.shape or out.shape[0] != "N":
            raise GraphError(f"{self!r} gives {out!r}, which does not keep the batch dim first")
        return out.shape[1:]

    def params(self) -> dict[str, torch.Tensor]:
        """The layer's trainable params by short name ("weight", "bias"), live tensors."""
        return {name: getattr(self, name) for name, p in self.declared() if p.trainable}

    def buffers(self) -> dict[str, torch.Tensor]:
        """The layer's non-trainable tensors by short name (Standardize's "mean" and "std"):
        graph params that the optimizer never touches and `fit` does not differentiate."""
        return {name: getattr(self, name) for name, p in self.declared() if not p.trainable}

    def declared(self) -> list[tuple[str, Param]]:
        """The Param attributes that hold a tensor, in declaration order (a subclass's after
        those it inherits)."""
        slots = self.__dict__.get("_slots", {})
        return [(name, p) for name, p in _params_of(type(self)) if name in slots]

    def slot(self, name: str) -> Slot:
        """Where param `name` lives; graphs built from the layer share it."""
        return self.__dict__["_slots"][name]

    def forward(self, build: Build, x: Value) -> Value:
        """The IR of the layer applied to `x`; its params come from `build.param(name)`."""
        raise NotImplementedError

    def batch_error(self, rows: int, shape: Shape) -> str | None:
        """Why the layer cannot train on a step of `rows` examples of `shape` (None: it can);
        `fit` asks before training, for the smallest step it will take."""
        return None

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__}

    def to(self, device: torch.device | str) -> None:
        for name, t in {**self.params(), **self.buffers()}.items():
            setattr(self, name, t.to(device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def keeps_rows_apart(layer: Layer | type) -> bool:
    """`rows_apart` as said alongside the layer's `forward` (see Layer, `declared_with`)."""
    return declared_with(layer, "rows_apart", "forward")


@functools.cache
def _params_of(cls: type) -> tuple[tuple[str, Param], ...]:
    """A layer class's Param attributes, inherited ones first (cached: walking the classes'
    dicts took 5 µs a layer, paid by every `parameters()` and every predict)."""
    declared: dict[str, Param] = {}
    for base in reversed(cls.__mro__):
        declared.update((name, p) for name, p in vars(base).items() if isinstance(p, Param))
    return tuple(declared.items())


def same_memory(t: torch.Tensor) -> Hashable:
    """What makes two tensors one param: the same elements of the same memory (one tensor
    assigned in two places, or a view of the whole of it). A meta or empty tensor has no
    memory to share, so it is only itself."""
    if t.is_meta or not t.numel():
        return id(t)
    return t.data_ptr(), t.stride(), t.shape, t.dtype, t.device


class Build:
    """What a layer's `forward` builds with: the graph, the layer's params and the mode.

    `param("weight")` is the graph param holding the layer's weight, declared on first
    use under its model-wide name ("2.weight"). A tensor that an earlier place already
    holds (a tied weight, `l2.weight = l1.weight`) is that place's param: one value in
    the IR, so its gradients add up and it is trained, decayed and saved once.

    `training` is the mode the graph is built for: True for the graph `fit` trains
    (Dropout drops, BatchNorm normalises with the batch's statistics), False for the
    one `predict` and `evaluate` run. In a training graph a layer gives the next value
    of a buffer it holds with `update` (BatchNorm's running mean); the graph outputs it,
    and the training step writes it into the buffer after each batch."""

    def __init__(self, graph: Graph, prefix: str, owners: dict[str, str], slots: dict[str, Slot],
                 training: bool = False, updates: dict[str, Value] | None = None) -> None:
        self.graph, self.prefix, self.training = graph, prefix, training
        self._owners, self._slots = owners, slots
        self.updates = {} if updates is None else updates  # buffer name -> its next value, model-wide

    def param(self, name: str) -> Value:
        owner = self._owners[self.prefix + name]
        known = self.graph.params.get(owner)
        return known if known is not None else self.graph.param(owner, self._slots[owner])

    def update(self, name: str, value: Value) -> None:
        """`value` is the next value of this layer's buffer `name` (training graphs only)."""
        owner = self._owners[self.prefix + name]
        param = self.param(name)
        if not self.training:
            raise GraphError(f"{self.prefix}{name}: a buffer is updated only in a training graph")
        if owner in self.updates:
            raise GraphError(f"{self.prefix}{name} holds the tensor of {owner}, which another layer updates too; "
                             "give each layer its own buffer (e.g. .clone())")
        if (value.shape, value.dtype) != (param.shape, param.dtype):
            raise GraphError(f"{self.prefix}{name}: its next value {value!r} must have the buffer's type {param!r}")
        self.updates[owner] = value


def check_width(name: str, value: int) -> int:
    return whole(name, value, 1, 2**63 - 1)  # torch cannot even describe a wider tensor (its sizes are int64)

def check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
