"""The layers whose training differs from their inference: BatchNorm1d/2d (batch statistics,
running statistics moved inside the step), LayerNorm, and Dropout (masks from a seeded key)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import (
    GraphError,
    Shape,
    check_dtype,
    format_shape,
    read_shape,
    real,
    whole,
)
from ..ir import Value
from ..ops import (
    batch_norm,
    correct_var,
    dropout_mask,
    layer_norm,
    mul,
    reduce_mean,
    var,
)
from .base import Build, Layer, Param, check_generator, check_width


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
        self.num_features = check_width("num_features", num_features)
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

    rows_apart = True

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
        build.update("running_var", running_var * (1.0 - m) + correct_var(variance, x, axis=axes) * m)
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
        self.normalized_shape = tuple(check_width("normalized_shape", d) for d in dims)
        self.eps = real("eps", eps, 0.0)
        if self.eps == 0:
            raise ValueError("eps must be > 0: it keeps an example of equal values from dividing by zero")
        check_dtype("LayerNorm", dtype)
        read_shape(self.normalized_shape, "LayerNorm's weight", dtype)
        self.weight = torch.ones(self.normalized_shape, dtype=dtype)
        self.bias = torch.zeros(self.normalized_shape, dtype=dtype)

    rows_apart = True

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
        check_generator(generator)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
        self.seed = whole("seed", seed, 0, 2**63 - 1)
        self.key = torch.zeros((), dtype=torch.float64)

    rows_apart = True

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
