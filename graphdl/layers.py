"""Layers: each owns its tensors (`Param`s) and builds the IR of its forward pass.

A model (graphdl.model's Sequential) names each layer's tensors by position and builds
its graph through `Build`, which makes a tensor held in several places one param."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from .checks import (
    FLOAT_DTYPES,
    GraphError,
    Shape,
    ShapeError,
    check_dtype,
    check_param_tensor,
    flag,
    format_shape,
    read_shape,
    real,
    shown,
    tensor_problem,
    whole,
)
from .ir import Graph, Slot, Value
from .ops import (
    add,
    avg_pool2d,
    batch_norm,
    conv1d,
    conv2d,
    div,
    dropout_mask,
    flatten,
    gelu,
    index_select,
    layer_norm,
    leaky_relu,
    matmul,
    max_pool2d,
    mul,
    reduce_mean,
    relu,
    reshape,
    sigmoid,
    silu,
    softmax,
    sub,
    tanh,
    var,
)
from .ops.conv import conv_shape, pool_shape


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


def _check_width(name: str, value: int) -> int:
    return whole(name, value, 1, 2**63 - 1)  # torch cannot even describe a wider tensor (its sizes are int64)


class Linear(Layer):
    """x @ weight + bias, with weight [in_features, out_features] and bias [out_features].

    Both start uniform in (-1/sqrt(in_features), 1/sqrt(in_features)), PyTorch's default,
    drawn from `generator` or torch's global RNG.
    """

    weight = Param(shape=lambda layer: (layer.in_features, layer.out_features))
    bias = Param(shape=lambda layer: (layer.out_features,))

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = _check_width("in_features", in_features)
        self.out_features = _check_width("out_features", out_features)
        check_dtype("Linear", dtype)  # only what the IR supports: a float8 or int weight fails here, not in torch
        read_shape((self.in_features, self.out_features), "Linear's weight", dtype)  # else torch fails to describe it
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        bound = 1.0 / math.sqrt(in_features)
        try:  # in place, so that a big layer needs its own size in memory, not three times it
            self.weight = torch.rand(in_features, out_features, generator=generator, dtype=dtype).mul_(2).sub_(1) \
                .mul_(bound)
            self.bias = torch.rand(out_features, generator=generator, dtype=dtype).mul_(2).sub_(1).mul_(bound)
        except RuntimeError as e:  # torch.OutOfMemoryError is one too
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            size = in_features * out_features * dtype.itemsize / 2**30
            raise ValueError(f"Linear({in_features}, {out_features}) needs {size:.3g} GiB for its {dtype} weight, "
                             "more than this machine can allocate; use smaller widths") from None

    def forward(self, build: Build, x: Value) -> Value:
        return add(matmul(x, build.param("weight")), build.param("bias"))

    def config(self) -> dict[str, Any]:
        return {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    """max(x, 0)."""

    def forward(self, build: Build, x: Value) -> Value:
        return relu(x)


class Tanh(Layer):
    """Hyperbolic tangent."""

    def forward(self, build: Build, x: Value) -> Value:
        return tanh(x)


class Sigmoid(Layer):
    """1 / (1 + exp(-x))."""

    def forward(self, build: Build, x: Value) -> Value:
        return sigmoid(x)


class Softmax(Layer):
    """exp(x) / sum(exp(x)) over the features: rows of class probabilities. Train a
    classifier on its logits with gd.CrossEntropy(), then add Softmax to output probabilities.

    `dim` is the dim normalised, as torch's: the last by default; counted with the batch
    dim as 0, which it cannot be."""

    def __init__(self, dim: int = -1) -> None:
        self.dim = _dim("dim", dim)
        if self.dim == 0:
            raise ValueError("dim=0 would normalise across the batch; use dim=1 or more, or -1 (the last)")

    def output_shape(self, shape: Shape) -> Shape:
        if not -len(shape) - 1 < self.dim <= len(shape):
            raise GraphError(f"dim={self.dim} is not a dim of the examples' shape {format_shape(shape)} (the "
                             f"batch dim is 0, the examples' from 1 to {len(shape)})")
        return tuple(shape)

    def forward(self, build: Build, x: Value) -> Value:
        return softmax(x) if self.dim == -1 else softmax(x, axis=self.dim)

    def config(self) -> dict[str, Any]:
        return {"type": "Softmax"} if self.dim == -1 else {"type": "Softmax", "dim": self.dim}

    def __repr__(self) -> str:
        return "Softmax()" if self.dim == -1 else f"Softmax(dim={self.dim})"


class GELU(Layer):
    """x * Phi(x), Phi the standard normal's CDF; approximate="tanh" is torch's tanh form."""

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, build: Build, x: Value) -> Value:
        return gelu(x, approximate=self.approximate)

    def config(self) -> dict[str, Any]:
        return {"type": "GELU", "approximate": self.approximate}

    def __repr__(self) -> str:
        return "GELU()" if self.approximate == "none" else f"GELU(approximate={self.approximate!r})"


class LeakyReLU(Layer):
    """x where x > 0, else negative_slope * x."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        self.negative_slope = real("negative_slope", negative_slope)

    def forward(self, build: Build, x: Value) -> Value:
        return leaky_relu(x, negative_slope=self.negative_slope)

    def config(self) -> dict[str, Any]:
        return {"type": "LeakyReLU", "negative_slope": self.negative_slope}

    def __repr__(self) -> str:
        return f"LeakyReLU({self.negative_slope!r})"


class SiLU(Layer):
    """x * sigmoid(x) (also called swish)."""

    def forward(self, build: Build, x: Value) -> Value:
        return silu(x)


def _dim(name: str, value: Any) -> int:
    """A dim index of a layer's settings, which may count from the end (-1)."""
    return whole(name, value, -64, 64)  # torch's tensors have at most 64 dims


class Flatten(Layer):
    """Each example's dims from start_dim to end_dim merged into one (dim 0 is the batch's,
    so the default, 1 to -1, makes each example a row of features), as torch's nn.Flatten."""

    keeps_shape = False
    passes_dtype = True

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        self.start_dim, self.end_dim = _dim("start_dim", start_dim), _dim("end_dim", end_dim)
        if self.start_dim == 0:
            raise ValueError("start_dim=0 would merge the batch dim into the examples; use start_dim=1 or more")

    def forward(self, build: Build, x: Value) -> Value:
        return flatten(x, self.start_dim, self.end_dim)

    def config(self) -> dict[str, Any]:
        return {"type": "Flatten", "start_dim": self.start_dim, "end_dim": self.end_dim}

    def __repr__(self) -> str:
        if (self.start_dim, self.end_dim) == (1, -1):
            return "Flatten()"
        return f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim})"


class Reshape(Layer):
    """Each example in `shape` (the batch dim left out: `Reshape((1, 8, 8))` makes rows of
    64 into 1x8x8 images); one dim may be -1, inferred. First in a model without -1, it
    takes rows of the shape's size (64 there)."""

    keeps_shape = False
    passes_dtype = True

    def __init__(self, shape: Sequence[int]) -> None:
        if not isinstance(shape, (tuple, list)) or not shape:
            raise ValueError(f"shape must be a tuple of whole numbers (the batch dim left out), such as (1, 8, 8), "
                             f"got {shown(shape)}")
        dims = tuple(-1 if d == -1 and not isinstance(d, bool) else _check_width("shape", d) for d in shape)
        if dims.count(-1) > 1:
            raise ValueError(f"shape {shown(shape)} has more than one -1; at most one dim can be inferred")
        read_shape([d for d in dims if d != -1], "Reshape's shape", torch.float64)
        self.shape = dims

    def input_shape(self) -> Shape | None:
        return None if -1 in self.shape else (math.prod(self.shape),)

    def forward(self, build: Build, x: Value) -> Value:
        return reshape(x, (None, *self.shape))

    def config(self) -> dict[str, Any]:
        return {"type": "Reshape", "shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"Reshape({self.shape!r})"


class Embedding(Layer):
    """Rows of a table: each index (int64, from 0 to num_embeddings - 1) becomes its row of
    weight [num_embeddings, embedding_dim], PyTorch's layout, which starts N(0, 1) as
    PyTorch's does. Indices [N] give [N, embedding_dim], [N, L] give [N, L, embedding_dim]
    (give the model `input_shape=(L,)`). An index out of range is refused, naming the layer."""

    weight = Param(shape=lambda layer: (layer.num_embeddings, layer.embedding_dim))
    keeps_shape = False
    input_dtype = torch.int64

    def __init__(self, num_embeddings: int, embedding_dim: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_embeddings = _check_width("num_embeddings", num_embeddings)
        self.embedding_dim = _check_width("embedding_dim", embedding_dim)
        check_dtype("Embedding", dtype)
        read_shape((self.num_embeddings, self.embedding_dim), "Embedding's weight", dtype)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        try:
            self.weight = torch.randn(self.num_embeddings, self.embedding_dim, generator=generator, dtype=dtype)
        except RuntimeError as e:
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            size = self.num_embeddings * self.embedding_dim * dtype.itemsize / 2**30
            raise ValueError(f"{self!r} needs {size:.3g} GiB for its {dtype} weight, more than this machine can "
                             "allocate; use a smaller table") from None

    def input_shape(self) -> Shape | None:
        return ()

    def forward(self, build: Build, x: Value) -> Value:
        return index_select(build.param("weight"), x, axis=0)

    def check_input(self, X: torch.Tensor, what: str, where: str) -> None:
        """Every index in X (called `what`) is in range for this layer (`where`, e.g. "layer 0"):
        one pass over X, where the kernel would fail without naming the layer (on a GPU, not
        recoverably)."""
        if X.dtype.is_floating_point or X.is_complex() or not X.numel() or X.is_meta:
            return  # the graph's own check names a wrong dtype
        low, high = torch.aminmax(X)
        if low < 0 or high >= self.num_embeddings:
            first = ((X < 0) | (X >= self.num_embeddings)).nonzero()[0].tolist()
            raise GraphError(f"{what}[{', '.join(map(str, first))}] is {X[tuple(first)].item()}, not an index of "
                             f"{where} ({self!r}): indices run from 0 to {self.num_embeddings - 1}")

    def config(self) -> dict[str, Any]:
        return {"type": "Embedding", "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"


def _not_finite(t: torch.Tensor) -> str | None:
    bad = ~t.isfinite()
    return f"holds {int(bad.sum())} NaN or inf value(s) (feature {int(bad.nonzero()[0, 0])} first)" \
        if bool(bad.any()) else None


def _not_a_scale(t: torch.Tensor) -> str | None:
    """What makes `t` no std to divide by: a value that is not finite or not > 0."""
    bad = ~(t.isfinite() & (t > 0))
    if not bool(bad.any()):
        return None
    first = int(bad.nonzero()[0, 0])
    return (f"must be finite and > 0 (a std to divide by), but feature {first} is {float(t[first])!r}; a constant "
            "feature gets std 1 from adapt")


class Standardize(Layer):
    """(x - mean) / std per feature, with the mean and std of the data given to `adapt`.

    Put it first in a model so that the model file holds every step from raw input to
    prediction. mean and std are graph params ("{k}.mean", "{k}.std": shown in the IR,
    saved in model files) but not trainable: `fit` leaves them alone, and
    `Sequential.parameters()` does not list them (`Sequential.state()` does).

    Args:
        features: the number of input features; None until `adapt` sees data. Given,
            the layer starts as the identity (mean 0, std 1).
        dtype: the dtype of mean and std, the model's dtype.
    """

    mean = Param(trainable=False, shape=lambda layer: (layer.in_features,), values=lambda t: _not_finite(t))
    std = Param(trainable=False, shape=lambda layer: (layer.in_features,), values=lambda t: _not_a_scale(t))

    def __init__(self, features: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        check_dtype("Standardize", dtype)
        self._dtype = dtype  # until it holds statistics; then theirs
        if features is not None:
            self.in_features = self.out_features = _check_width("features", features)
            self.mean, self.std = torch.zeros(features, dtype=dtype), torch.ones(features, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of mean and std (as assigned, e.g. converted to float64), or the
        constructor's before `adapt`: what `adapt` computes into and `config` records."""
        slots = self.__dict__.get("_slots", {})
        return slots["mean"].tensor.dtype if "mean" in slots else self._dtype

    def adapt(self, X: torch.Tensor) -> Standardize:
        """Set mean and std to those of X [examples, features], per feature (the population
        std, as Keras and scikit-learn use). A constant feature (std 0) gets std 1, so it is
        centred, never divided by zero. Adapting again replaces the live tensors, so a model
        that holds this layer uses the new values from its next call on, trained or not.

        Returns:
            The layer, so that `gd.Standardize().adapt(X)` can go straight into a Sequential.
        """
        self._check_data(X)
        data = X.detach().to("cpu", torch.float64)  # statistics in float64, whatever the data's dtype
        _check_finite(X, data)
        mean, std = _mean_and_std(data)
        # A std at the level of the float64 rounding noise of summing n values of this mean
        # is a constant feature, as scikit-learn judges it (relative to the mean: a feature
        # of 3e-5 +- 1e-6 is scaled, not left alone).
        constant = std <= len(data) * torch.finfo(torch.float64).eps * mean.abs()
        std = torch.where(constant, torch.ones_like(std), std)
        _check_statistics(mean, std, self.dtype)
        device = self.mean.device if self.in_features is not None else X.device
        self.in_features = self.out_features = X.shape[1]
        self.mean, self.std = mean.to(device, self.dtype), std.to(device, self.dtype)
        return self

    def _check_data(self, X: Any) -> None:
        """X is a 2-d tensor of real values in memory, of this layer's width (if it has one yet)."""
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or len(X) == 0:
            got = f"shape {list(X.shape)}" if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"adapt: X must be a 2-d torch.Tensor [examples, features] with at least one "
                             f"example, got {got}")
        problem = _data_problem(X)
        if problem:
            raise ValueError(f"adapt: X {problem}")
        if self.in_features is not None and X.shape[1] != self.in_features:
            raise ValueError(f"adapt: X has {X.shape[1]} features but this Standardize takes {self.in_features}")

    def forward(self, build: Build, x: Value) -> Value:
        if self.in_features is None:
            raise GraphError("Standardize has no statistics yet; call .adapt(X) on the training inputs first, "
                             "or give features= to start from the identity")
        return div(sub(x, build.param("mean")), build.param("std"))

    def config(self) -> dict[str, Any]:
        # From the tensors, not the constructor's arguments: a model converted by assigning
        # float64 statistics must be described as float64, or its file would not load.
        return {"type": "Standardize", "features": self.in_features, "dtype": str(self.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Standardize({self.in_features})" if self.in_features is not None else "Standardize()"


def _data_problem(X: torch.Tensor) -> str | None:
    """What makes X no data to take statistics of (None if nothing)."""
    problem = tensor_problem(X)
    if problem:
        return problem
    if X.is_meta:
        return "is on the meta device, which holds no values"
    if X.is_complex():
        return "is complex; the statistics are of real numbers"
    return None


def _check_finite(X: torch.Tensor, data: torch.Tensor) -> None:
    """`data` (X in float64) holds no NaN or inf; else the error names the first, as X holds it."""
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        row, col = (~finite).nonzero()[0].tolist()
        raise ValueError(f"adapt: X has NaN or inf values, first at X[{row}, {col}] = {X[row, col].item()}; "
                         "drop or repair those examples before adapting")


def _mean_and_std(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's mean and population std, in float64 without overflow: the columns are
    scaled by their largest magnitude first, so no square exceeds 1 (data of size 1e160
    squared directly is inf, which made the std inf and mapped the feature to 0)."""
    scale = data.abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = data / scale
    return unit.mean(0) * scale, unit.std(0, correction=0) * scale


def _check_statistics(mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse statistics that `dtype` would turn into inf (or a std it would turn into 0:
    a division by zero), naming the feature. A mean that rounds to 0 only centres a little
    less exactly."""
    for what, values in (("mean", mean), ("std", std)):
        held = values.to(dtype)
        bad = (~torch.isfinite(held) | ((held == 0) & (what == "std"))).nonzero()
        if len(bad):
            k = int(bad[0])
            becomes = "0" if bool(torch.isfinite(held[k])) else "inf"
            raise ValueError(f"adapt: feature {k} has {what} {float(values[k]):.3g}, which {dtype} cannot hold "
                             f"(it becomes {becomes}); rescale that feature or use a wider dtype")


# -- layers beyond two dims: convolution, pooling, normalisation, dropout ----------------
#
# Values are channels first, as PyTorch lays them out: one example is [C, L] or
# [C, H, W], and a model's batch dim comes before it. Each layer's `output_shape` asks
# its op's shape rule, so a kernel wider than its padded input or channels that do not
# match fail where the layer is added to a model, naming it, the shapes and the fix.


def _spatial(name: str, value: Any, d: int, low: int) -> int | tuple[int, ...]:
    """An int, or one int per spatial dim, each >= low; one int where all agree."""
    if isinstance(value, (tuple, list)):
        if len(value) != d:
            raise ValueError(f"{name} must be an int or {d} ints (one per spatial dim), got {value!r}")
        values = tuple(whole(name, v, low, _LARGEST) for v in value)
        return values[0] if len(set(values)) == 1 else values
    return whole(name, value, low, _LARGEST)


_LARGEST = 2**31 - 1  # a kernel, stride or padding past this is no size torch's kernels take


def _expand(value: int | tuple[int, ...], d: int) -> tuple[int, ...]:
    return (value,) * d if isinstance(value, int) else tuple(value)


def _shape_of(layer: Layer, rule: Callable[[], Shape]) -> Shape:
    """What an op's shape function gives, its ShapeError a GraphError naming the layer."""
    try:
        return rule()
    except ShapeError as e:
        raise GraphError(e.message + (f"\n  hint: {e.hint}" if e.hint else "")) from None


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None,
             dtype: torch.dtype) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=dtype).mul_(2).sub_(1).mul_(bound)


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


class _Conv(Layer):
    """Conv1d and Conv2d: PyTorch's layout, defaults and initialisation."""

    dims = 2
    keeps_shape = False
    weight = Param(shape=lambda layer: (layer.out_channels, layer.in_channels // layer.groups,
                                        *_expand(layer.kernel_size, layer.dims)))
    bias = Param(shape=lambda layer: (layer.out_channels,))

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0,
                 dilation: int | tuple[int, ...] = 1, groups: int = 1, bias: bool = True,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        d = self.dims
        self.in_channels = _check_width("in_channels", in_channels)
        self.out_channels = _check_width("out_channels", out_channels)
        self.kernel_size = _spatial("kernel_size", kernel_size, d, 1)
        self.stride = _spatial("stride", stride, d, 1)
        self.padding = _spatial("padding", padding, d, 0)
        self.dilation = _spatial("dilation", dilation, d, 1)
        self.groups = whole("groups", groups, 1)
        self.has_bias = flag("bias", bias)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={groups} must divide both in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        check_dtype(type(self).__name__, dtype)
        _check_generator(generator)
        shape = (self.out_channels, self.in_channels // self.groups, *_expand(self.kernel_size, d))
        read_shape(shape, f"{type(self).__name__}'s weight", dtype)
        # kaiming_uniform_(a=sqrt(5)), PyTorch's default, is uniform in +-1/sqrt(fan_in), as is the bias.
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        self.weight = _uniform(shape, bound, generator, dtype)
        if self.has_bias:
            self.bias = _uniform((self.out_channels,), bound, generator, dtype)

    def _attrs(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def forward(self, build: Build, x: Value) -> Value:
        op = conv1d if self.dims == 1 else conv2d
        weight = build.param("weight")
        return op(x, weight, *([build.param("bias")] if self.has_bias else []), **self._attrs())

    def input_shape(self) -> Shape | None:
        return None  # channels-first examples of any spatial size

    def output_shape(self, shape: Shape) -> Shape:
        weight = tuple(self.slot("weight").tensor.shape)
        return _shape_of(self, lambda: conv_shape(("N", *shape), weight, **self._attrs()))[1:]

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": _json(self.kernel_size), "stride": _json(self.stride),
                "padding": _json(self.padding), "dilation": _json(self.dilation), "groups": self.groups,
                "bias": self.has_bias, "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("stride", self.stride), ("padding", self.padding),
                                                   ("dilation", self.dilation), ("groups", self.groups),
                                                   ("bias", self.has_bias))
                        if v != {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True}[k])
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}{extra})"


def _json(value: int | tuple[int, ...]) -> int | list[int]:
    return value if isinstance(value, int) else list(value)


class Conv1d(_Conv):
    """Cross-correlation over [N, C, L] (PyTorch's nn.Conv1d): weight [out, in/groups, k], bias
    [out], both uniform in +-1/sqrt(in/groups * k) as PyTorch initialises them."""

    dims = 1


class Conv2d(_Conv):
    """Cross-correlation over [N, C, H, W] (PyTorch's nn.Conv2d): at position k of a model it
    owns "{k}.weight" [out, in/groups, kh, kw] and "{k}.bias" [out], both uniform in
    +-1/sqrt(in/groups * kh * kw) as PyTorch initialises them (kaiming_uniform_ with
    a=sqrt(5)); `bias=False` leaves the bias out."""

    dims = 2


class _Pool(Layer):
    keeps_shape = False
    op: Any = None

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        self.kernel_size = _spatial("kernel_size", kernel_size, 2, 1)
        self.stride = None if stride is None else _spatial("stride", stride, 2, 1)
        self.padding = _spatial("padding", padding, 2, 0)
        for k, p in zip(_expand(self.kernel_size, 2), _expand(self.padding, 2)):
            if 2 * p > k:
                raise ValueError(f"padding={padding!r} must be at most half of kernel_size={kernel_size!r}")

    def _attrs(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}

    def forward(self, build: Build, x: Value) -> Value:
        return type(self).op(x, **self._attrs())

    def input_shape(self) -> Shape | None:
        return None

    def output_shape(self, shape: Shape) -> Shape:
        return _shape_of(self, lambda: pool_shape(("N", *shape), **self._attrs()))[1:]

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "kernel_size": _json(self.kernel_size),
                "stride": None if self.stride is None else _json(self.stride), "padding": _json(self.padding)}

    def __repr__(self) -> str:
        extra = (f", stride={self.stride}" if self.stride is not None else "") + \
            (f", padding={self.padding}" if self.padding else "")
        return f"{type(self).__name__}({self.kernel_size}{extra})"


class MaxPool2d(_Pool):
    """The largest element of each window of [N, C, H, W] (PyTorch's nn.MaxPool2d); stride
    defaults to the kernel size."""

    op = max_pool2d


class AvgPool2d(_Pool):
    """The mean of each window of [N, C, H, W] (PyTorch's nn.AvgPool2d); stride defaults to the
    kernel size, and with count_include_pad (the default) padding counts as zeros."""

    op = avg_pool2d

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, *, count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = flag("count_include_pad", count_include_pad)

    def _attrs(self) -> dict[str, Any]:
        return {**super()._attrs(), "count_include_pad": self.count_include_pad}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "count_include_pad": self.count_include_pad}


class _BatchNorm(Layer):
    """BatchNorm1d and BatchNorm2d (see BatchNorm2d)."""

    ranks: tuple[int, ...] = (3,)  # the ranks of one example it takes
    layouts = "[N, C, H, W]"
    weight = Param(shape=lambda layer: (layer.num_features,))
    bias = Param(shape=lambda layer: (layer.num_features,))
    running_mean = Param(trainable=False, shape=lambda layer: (layer.num_features,))
    running_var = Param(trainable=False, shape=lambda layer: (layer.num_features,))

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_features = _check_width("num_features", num_features)
        self.eps = real("eps", eps, 0.0)
        if self.eps == 0:
            raise ValueError("eps must be > 0: it keeps a channel of one value from dividing by zero")
        self.momentum = real("momentum", momentum, 0.0, 1.0)
        check_dtype(type(self).__name__, dtype)
        n = self.num_features
        self.weight, self.bias = torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)
        self.running_mean, self.running_var = torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)

    def _check(self, shape: Shape) -> None:
        """One example's shape: [C], [C, L] or [C, H, W] as the layer takes, C its num_features."""
        if len(shape) not in self.ranks:
            other = "BatchNorm1d for [N, C] or [N, C, L]" if self.ranks == (3,) else "BatchNorm2d for [N, C, H, W]"
            raise GraphError(f"{type(self).__name__} takes {self.layouts} values, not examples of shape "
                             f"{format_shape(shape)}\n  hint: use {other}")
        if shape[0] != self.num_features:
            raise GraphError(f"it normalises {self.num_features} channels (dim 1) but the values have {shape[0]}"
                             f"\n  hint: make it {type(self).__name__}({shape[0]})")

    def forward(self, build: Build, x: Value) -> Value:
        self._check(x.shape[1:])
        weight, bias = build.param("weight"), build.param("bias")
        running_mean, running_var = build.param("running_mean"), build.param("running_var")
        if not build.training:
            return batch_norm(x, running_mean, running_var, weight, bias, eps=self.eps)
        # The batch's statistics normalise it; the running ones move towards them as
        # torch's do: by momentum, with the unbiased variance.
        axes = (0, *range(2, x.ndim))
        mean, variance = reduce_mean(x, axis=axes), var(x, axis=axes)
        m = self.momentum
        build.update("running_mean", running_mean * (1.0 - m) + mean * m)
        build.update("running_var", running_var * (1.0 - m) + var(x, axis=axes, correction=1) * m)
        return batch_norm(x, mean, variance, weight, bias, eps=self.eps)

    def output_shape(self, shape: Shape) -> Shape:
        self._check(tuple(shape))
        return tuple(shape)

    def batch_error(self, rows: int, shape: Shape) -> str | None:
        values = rows * math.prod(shape[1:])
        if values > 1:
            return None
        return (f"would normalise 1 value per channel in a step of {rows} row: a batch's variance needs two "
                "(PyTorch's BatchNorm refuses to train on one too)")

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "num_features": self.num_features, "eps": self.eps,
                "momentum": self.momentum, "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features})"


class BatchNorm1d(_BatchNorm):
    """BatchNorm2d for [N, C] and [N, C, L] values (PyTorch's nn.BatchNorm1d)."""

    ranks = (1, 2)
    layouts = "[N, C] or [N, C, L]"


class BatchNorm2d(_BatchNorm):
    """Each channel of [N, C, H, W] normalised, then scaled by weight and shifted by bias
    (PyTorch's nn.BatchNorm2d): in `fit` by the batch's mean and biased variance, while the
    running statistics move towards the batch's (running = (1 - momentum) * running +
    momentum * batch, the variance unbiased); in `predict` and `evaluate` by the running
    statistics. weight starts at 1, bias at 0, running_mean at 0, running_var at 1.

    running_mean and running_var are model state, not trained: in `model.state()`, model
    files and checkpoints, not in `model.parameters()`.
    """


class LayerNorm(Layer):
    """Each example normalised over its last dims (`normalized_shape`), then scaled and
    shifted elementwise by weight and bias of that shape (PyTorch's nn.LayerNorm); weight
    starts at 1, bias at 0. The same in training and inference."""

    weight = Param(shape=lambda layer: layer.normalized_shape)
    bias = Param(shape=lambda layer: layer.normalized_shape)

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5,
                 dtype: torch.dtype = torch.float32) -> None:
        dims = (normalized_shape,) if not isinstance(normalized_shape, (tuple, list)) else tuple(normalized_shape)
        if not dims:
            raise ValueError("normalized_shape must name at least one dim, e.g. LayerNorm(64)")
        self.normalized_shape = tuple(_check_width("normalized_shape", d) for d in dims)
        self.eps = real("eps", eps, 0.0)
        if self.eps == 0:
            raise ValueError("eps must be > 0: it keeps an example of equal values from dividing by zero")
        check_dtype("LayerNorm", dtype)
        read_shape(self.normalized_shape, "LayerNorm's weight", dtype)
        self.weight = torch.ones(self.normalized_shape, dtype=dtype)
        self.bias = torch.zeros(self.normalized_shape, dtype=dtype)

    def forward(self, build: Build, x: Value) -> Value:
        self.output_shape(x.shape[1:])
        return layer_norm(x, build.param("weight"), build.param("bias"), eps=self.eps)

    def input_shape(self) -> Shape | None:
        return self.normalized_shape

    def output_shape(self, shape: Shape) -> Shape:
        k = len(self.normalized_shape)
        if tuple(shape[len(shape) - k:]) != self.normalized_shape or len(shape) < k:
            raise GraphError(f"it normalises examples ending in {format_shape(self.normalized_shape)}"
                             f"\n  hint: make normalized_shape the last dims of its input, {format_shape(shape[-k:])}")
        return tuple(shape)

    def config(self) -> dict[str, Any]:
        return {"type": "LayerNorm", "normalized_shape": list(self.normalized_shape), "eps": self.eps,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        shape = self.normalized_shape
        return f"LayerNorm({shape[0] if len(shape) == 1 else shape})"


class Dropout(Layer):
    """In `fit`, each element is zeroed with probability p and the rest scaled by 1/(1 - p)
    (PyTorch's nn.Dropout); in `predict` and `evaluate`, the identity.

    The mask is a pure function of the layer's seed, its key and the element's place
    (graphdl.ops.random): the key, "{k}.key", is a step counter the training step
    advances, kept as model state (in `model.state()`, files and checkpoints; a 0-d
    float64 tensor whatever the model's dtype). So a run is reproduced by its starting
    model and `fit`'s seed, and resumes exactly from a checkpoint.

    Args:
        p: the probability of dropping an element, in [0, 1].
        seed: the layer's stream of masks; None draws one from `generator` or torch's
            global RNG (as the weights of a new layer are drawn).
    """

    key = Param(trainable=False, shape=lambda layer: (), model_dtype=False)

    def __init__(self, p: float = 0.5, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        self.p = real("p", p, 0.0, 1.0)
        _check_generator(generator)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
        self.seed = whole("seed", seed, 0, 2**63 - 1)
        self.key = torch.zeros((), dtype=torch.float64)

    def forward(self, build: Build, x: Value) -> Value:
        key = build.param("key")  # declared in both modes: it is model state, saved with the model
        if not build.training or self.p == 0:
            return x
        build.update("key", key + 1.0)
        return mul(x, dropout_mask(key, x, p=self.p, seed=self.seed))

    def config(self) -> dict[str, Any]:
        return {"type": "Dropout", "p": self.p, "seed": self.seed}

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (Linear, ReLU, Tanh, Sigmoid, Softmax, Standardize,
                                                                 GELU, LeakyReLU, SiLU, Flatten, Reshape, Embedding)}
LAYERS.update((cls.__name__, cls) for cls in (Conv1d, Conv2d, MaxPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d,
                                              LayerNorm, Dropout))
DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES.values()}  # as config() writes them
