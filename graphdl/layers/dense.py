"""Layers of feature rows: Linear, the activations, Softmax, Standardize, and the shape
layers Flatten, Reshape and Embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..checks import (
    GraphError,
    Shape,
    all_finite,
    check_dtype,
    format_shape,
    read_shape,
    real,
    shown,
    tensor_problem,
    whole,
)
from ..ir import Value
from ..ops import (
    add,
    div,
    flatten,
    gelu,
    index_select,
    leaky_relu,
    matmul,
    relu,
    reshape,
    sigmoid,
    silu,
    softmax,
    sub,
    tanh,
)
from .base import Build, Layer, Param, check_width


class Linear(Layer):
    """x @ weight + bias, with weight [in_features, out_features] and bias [out_features].

    Both start uniform in (-1/sqrt(in_features), 1/sqrt(in_features)), PyTorch's default,
    drawn from `generator` or torch's global RNG.
    """

    weight = Param(shape=lambda layer: (layer.in_features, layer.out_features))
    bias = Param(shape=lambda layer: (layer.out_features,))

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = check_width("in_features", in_features)
        self.out_features = check_width("out_features", out_features)
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

    rows_apart = True

    def forward(self, build: Build, x: Value) -> Value:
        return add(matmul(x, build.param("weight")), build.param("bias"))

    def config(self) -> dict[str, Any]:
        return {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    """max(x, 0)."""

    rows_apart = True

    def forward(self, build: Build, x: Value) -> Value:
        return relu(x)


class Tanh(Layer):
    """Hyperbolic tangent."""

    rows_apart = True

    def forward(self, build: Build, x: Value) -> Value:
        return tanh(x)


class Sigmoid(Layer):
    """1 / (1 + exp(-x))."""

    rows_apart = True

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

    rows_apart = True

    def forward(self, build: Build, x: Value) -> Value:
        if (self.dim if self.dim >= 0 else x.ndim + self.dim) == 0:  # (dim set after __init__ checked it)
            raise GraphError(f"Softmax(dim={self.dim}) would normalise across the batch; use dim=1 or more, or -1")
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

    rows_apart = True

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

    rows_apart = True

    def forward(self, build: Build, x: Value) -> Value:
        return leaky_relu(x, negative_slope=self.negative_slope)

    def config(self) -> dict[str, Any]:
        return {"type": "LeakyReLU", "negative_slope": self.negative_slope}

    def __repr__(self) -> str:
        return f"LeakyReLU({self.negative_slope!r})"


class SiLU(Layer):
    """x * sigmoid(x) (also called swish)."""

    rows_apart = True

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

    rows_apart = True

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
        dims = tuple(-1 if d == -1 and not isinstance(d, bool) else check_width("shape", d) for d in shape)
        if dims.count(-1) > 1:
            raise ValueError(f"shape {shown(shape)} has more than one -1; at most one dim can be inferred")
        read_shape([d for d in dims if d != -1], "Reshape's shape", torch.float64)
        self.shape = dims

    def input_shape(self) -> Shape | None:
        return None if -1 in self.shape else (math.prod(self.shape),)

    rows_apart = True

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
        self.num_embeddings = check_width("num_embeddings", num_embeddings)
        self.embedding_dim = check_width("embedding_dim", embedding_dim)
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

    rows_apart = True

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
            self.in_features = self.out_features = check_width("features", features)
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

    rows_apart = True

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
    if not all_finite(data):
        row, col = (~torch.isfinite(data)).nonzero()[0].tolist()
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
