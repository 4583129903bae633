"""Convolution and pooling layers, channels first as PyTorch: Conv1d, Conv2d, MaxPool2d,
AvgPool2d."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..checks import (
    GraphError,
    Shape,
    ShapeError,
    check_dtype,
    flag,
    read_shape,
    whole,
)
from ..ir import Value
from ..ops import (
    avg_pool2d,
    conv1d,
    conv2d,
    max_pool2d,
)
from ..ops.conv import conv_shape, pool_shape
from .base import Build, Layer, Param, check_generator, check_width

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
        self.in_channels = check_width("in_channels", in_channels)
        self.out_channels = check_width("out_channels", out_channels)
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
        check_generator(generator)
        shape = (self.out_channels, self.in_channels // self.groups, *_expand(self.kernel_size, d))
        read_shape(shape, f"{type(self).__name__}'s weight", dtype)
        # kaiming_uniform_(a=sqrt(5)), PyTorch's default, is uniform in +-1/sqrt(fan_in), as is the bias.
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        self.weight = _uniform(shape, bound, generator, dtype)
        if self.has_bias:
            self.bias = _uniform((self.out_channels,), bound, generator, dtype)

    def _attrs(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    rows_apart = True

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

    rows_apart = True

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
