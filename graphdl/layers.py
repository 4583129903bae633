"""Layers: each owns its tensors (`Param`s) and builds the IR of its forward pass.

A model (graphdl.model's Sequential) names each layer's tensors by position and builds
its graph through `Build`, which makes a tensor held in several places one param."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .checks import FLOAT_DTYPES, GraphError, check_dtype, read_shape, whole
from .ir import Graph, Slot, Value, check_param_tensor, tensor_problem
from .ops import add, div, matmul, relu, sigmoid, softmax, sub, tanh


class Param:
    """A layer attribute holding a param: reading it gives the live tensor; assigning a
    tensor (`layer.weight = t`) puts it in the param's `Slot`, so every graph and compiled
    function built from the layer computes with `t` from its next call on.

    `trainable=False` makes a buffer: a graph param that `fit` neither differentiates nor
    updates, such as Standardize's mean and std. `shape(layer)` gives the shape the layer
    declares for it (None where it is not known yet): a tensor of another shape is refused
    where it is assigned, not found later as a model that computes something else."""

    def __init__(self, trainable: bool = True,
                 shape: Callable[[Any], tuple[int | None, ...]] | None = None) -> None:
        self.trainable = trainable
        self.shape = shape

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
        slots = layer.__dict__.setdefault("_slots", {})
        if self.name in slots:
            slots[self.name].tensor = tensor
        else:
            slots[self.name] = Slot(tensor)


class Layer:
    """A building block: owns its tensors and emits the IR of its forward pass."""

    in_features: int | None = None  # None: keeps the width it is given
    out_features: int | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """The layer's trainable params by short name ("weight", "bias"), live tensors."""
        return {name: getattr(self, name) for name, p in self._declared() if p.trainable}

    def buffers(self) -> dict[str, torch.Tensor]:
        """The layer's non-trainable tensors by short name (Standardize's "mean" and "std"):
        graph params that the optimizer never touches and `fit` does not differentiate."""
        return {name: getattr(self, name) for name, p in self._declared() if not p.trainable}

    def _declared(self) -> list[tuple[str, Param]]:
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
    classifier on its logits with gd.CrossEntropy(), then add Softmax to output probabilities."""

    def forward(self, build: Build, x: Value) -> Value:
        return softmax(x)


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

    mean = Param(trainable=False, shape=lambda layer: (layer.in_features,))
    std = Param(trainable=False, shape=lambda layer: (layer.in_features,))

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
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or len(X) == 0:
            got = f"shape {list(X.shape)}" if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"adapt: X must be a 2-d torch.Tensor [examples, features] with at least one "
                             f"example, got {got}")
        problem = tensor_problem(X) or ("is on the meta device, which holds no values" if X.is_meta else None) \
            or ("is complex; the statistics are of real numbers" if X.is_complex() else None)
        if problem:
            raise ValueError(f"adapt: X {problem}")
        if self.in_features is not None and X.shape[1] != self.in_features:
            raise ValueError(f"adapt: X has {X.shape[1]} features but this Standardize takes {self.in_features}")
        data = X.detach().to("cpu", torch.float64)  # statistics in float64, whatever the data's dtype
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            row, col = (~finite).nonzero()[0].tolist()
            raise ValueError(f"adapt: X has NaN or inf values, first at X[{row}, {col}] = {X[row, col].item()}; "
                             "drop or repair those examples before adapting")
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


LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (Linear, ReLU, Tanh, Sigmoid, Softmax, Standardize)}
DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES.values()}  # as config() writes them
