"""Convolution and pooling over channels-first values: [N, C, L] and [N, C, H, W].

Weights are laid out as PyTorch lays them out, [out_channels, in_channels / groups,
*kernel], so a model's tensors go to and from PyTorch and ONNX unchanged. Each op's
VJP is another op of this family, lowered to one of aten's backward kernels
(`aten.convolution_backward`, `aten.max_pool2d_with_indices_backward`,
`aten.avg_pool2d_backward`); those backward ops are linear in the cotangent, so their
own VJPs are convolutions and pools again (max pooling's is `max_pool2d_select`), and a
gradient graph can be differentiated once more.

Sizes follow torch: along each spatial dim, a kernel of size k dilated by d spans
d*(k-1)+1 elements of the input padded by p on both sides, and the output has
(size + 2p - span) // stride + 1 elements. The rules check every such number at build
time, so a kernel wider than its padded input, a zero stride or channels that do not
match the weight fail where the layer is built, naming the dim and the fix.

Spatial attrs take an int (the same along every dim) or one int per dim; a rule keeps
an int where every dim agrees, so `stride=1` is the default and does not print.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from .choice import Fastest
from .reductions import reduce_sum
from .registry import CODE_GLOBALS, VARIADIC, bool_attr, defop, same_dtype

_SPATIAL = {1: ("L",), 2: ("H", "W")}


def _ints(name: str, value: Any, d: int, low: int, hint: str = "") -> tuple[int, ...]:
    """A spatial attr as one int per dim, each >= low."""
    values = (value,) * d if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != d or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ShapeError(f"{name}={value!r} must be an int or {d} int{'s' if d > 1 else ''}, one per spatial dim",
                         hint)
    if any(v > 2**31 - 1 for v in values):
        raise ShapeError(f"{name}={value!r} is larger than any size torch's kernels take (2**31 - 1)")
    if any(v < low for v in values):
        what = "a zero stride would never move the window" if name == "stride" else f"each must be >= {low}"
        raise ShapeError(f"{name}={value!r}: {what}", hint or f"use {name}={max(low, 1)} or more")
    return tuple(values)


def _compact(values: tuple[int, ...]) -> int | tuple[int, ...]:
    """One int where every dim agrees (what prints and what the defaults are), else the tuple."""
    return values[0] if len(set(values)) == 1 else values


def _fixed_dims(x: Value, what: str, d: int) -> None:
    """The channel and spatial dims must be known when the graph is built (only the batch may be symbolic)."""
    for i, size in enumerate(x.shape[1:], 1):
        if not isinstance(size, int):
            name = "C" if i == 1 else _SPATIAL[d][i - 2]
            raise ShapeError(f"{what} {format_shape(x.shape)} has a symbolic {name} (dim {i}); only the batch dim "
                             "may be symbolic here", "declare the channel and spatial sizes as numbers")


def _layout(d: int) -> str:
    return "[N, C, L]" if d == 1 else "[N, C, H, W]"


def _check_input(x: Value, op: str, d: int) -> None:
    if x.ndim != d + 2:
        hint = (f"{op} reads channels-first values {_layout(d)}; reshape the input first, e.g. with "
                f"gd.Reshape(({', '.join(['C'] + list(_SPATIAL[d]))})) for rows of C*{'*'.join(_SPATIAL[d])} features")
        raise ShapeError(f"x {format_shape(x.shape)} must be {d + 2}-d, {_layout(d)}", hint)
    _fixed_dims(x, "x", d)


def _window(sizes: Sequence[int], spans: Sequence[int], stride: Sequence[int], padding: Sequence[int], d: int,
            what: str) -> tuple[int, ...]:
    """Output sizes along each spatial dim; a window wider than the padded input is refused."""
    out = []
    for i, (size, span, s, p) in enumerate(zip(sizes, spans, stride, padding)):
        if span > size + 2 * p:
            dim = _SPATIAL[d][i]
            raise ShapeError(f"the {what} spans {span} along {dim} (dim {i + 2}) but the input is only {size} "
                             f"there, {size + 2 * p} padded",
                             f"use a smaller kernel, padding of at least {-(-(span - size) // 2)} along {dim}, "
                             "or a larger input")
        out.append((size + 2 * p - span) // s + 1)
    return tuple(out)


class _Shaped:
    """A shape standing in for a value, for the shape functions layers call (`conv_shape`)."""

    def __init__(self, shape: Shape, label: str) -> None:
        self.shape, self.ndim, self.label = tuple(shape), len(shape), label


def conv_shape(x: Shape, weight: Shape, **attrs: Any) -> Shape:
    """The shape conv1d or conv2d gives for x and weight of these shapes (ShapeError if none)."""
    d = len(weight) - 2
    return _conv_shapes(_Shaped(x, "x"), _Shaped(weight, "weight"), {**_CONV_ATTRS, **attrs}, f"conv{d}d", d)[0]


def pool_shape(x: Shape, **attrs: Any) -> Shape:
    """The shape max_pool2d or avg_pool2d gives for x of this shape (ShapeError if none)."""
    return _pool_geometry(_Shaped(x, "x"), {**_POOL_ATTRS, **attrs}, "a pool")[0]


# -- convolution -----------------------------------------------------------------------


def _conv_shapes(x: Value, w: Value, attrs: Mapping[str, Any], op: str,
                 d: int) -> tuple[Shape, dict[str, Any], tuple]:
    """The output shape of convolving x with w, the normalised attrs, and the expanded
    (stride, padding, dilation, groups) for the lowering."""
    _check_input(x, op, d)
    kernel_dims = ", ".join(f"k{c.lower()}" for c in _SPATIAL[d])
    if w.ndim != d + 2:
        raise ShapeError(f"weight {format_shape(w.shape)} must be {d + 2}-d, [out_channels, in_channels/groups, "
                         f"{kernel_dims}], as PyTorch lays it out")
    _fixed_dims(w, "weight", d)
    if not isinstance(w.shape[0], int):
        raise ShapeError(f"weight {format_shape(w.shape)} has a symbolic out_channels")
    stride = _ints("stride", attrs["stride"], d, 1)
    padding = _ints("padding", attrs["padding"], d, 0)
    dilation = _ints("dilation", attrs["dilation"], d, 1)
    groups = attrs["groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ShapeError(f"groups={groups!r} must be a whole number >= 1")
    channels, out_channels, per_group = x.shape[1], w.shape[0], w.shape[1]
    if channels % groups or out_channels % groups:
        which = f"x's {channels} channels" if channels % groups else f"the weight's {out_channels} out_channels"
        raise ShapeError(f"groups={groups} does not divide {which}",
                         "groups must divide both in_channels and out_channels")
    if per_group * groups != channels:
        took = f"{per_group * groups}" + (f" ({per_group} per group x {groups} groups)" if groups > 1 else "")
        raise ShapeError(f"x has {channels} channel{'s' if channels != 1 else ''} but the weight "
                         f"{format_shape(w.shape)} takes {took}",
                         f"make the layer's in_channels {channels}, or make the layer before it give "
                         f"{per_group * groups} channels")
    spans = [dl * (k - 1) + 1 for dl, k in zip(dilation, w.shape[2:])]
    sizes = _window(x.shape[2:], spans, stride, padding, d, f"kernel {format_shape(w.shape[2:])}"
                    + (f" dilated by {_compact(dilation)}" if max(dilation) > 1 else ""))
    normalised = {"stride": _compact(stride), "padding": _compact(padding), "dilation": _compact(dilation),
                  "groups": groups}
    return (x.shape[0], out_channels, *sizes), normalised, (list(stride), list(padding), list(dilation), groups)


def _conv_rule(d: int):
    op = f"conv{d}d"

    def rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
        if len(inputs) not in (2, 3):
            raise ShapeError(f"takes x, weight and optionally bias, got {len(inputs)} input(s)")
        dtype = same_dtype(inputs)
        x, w, *bias = inputs
        shape, normalised, _ = _conv_shapes(x, w, attrs, op, d)
        if bias and bias[0].shape != (w.shape[0],):
            raise ShapeError(f"bias {format_shape(bias[0].shape)} must be [{w.shape[0]}], one per out_channel")
        return shape, dtype, normalised
    return rule


def _backward_rule(result: int):
    """conv_backward_input (result 1: x's shape) and conv_backward_weight (2: w's shape):
    g must be what convolving x with w gives."""
    def rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
        g, x, w = inputs
        dtype = same_dtype(inputs)
        d = x.ndim - 2
        if d not in _SPATIAL:
            raise ShapeError(f"x {format_shape(x.shape)} must be 3-d [N, C, L] or 4-d [N, C, H, W]")
        shape, normalised, _ = _conv_shapes(x, w, attrs, f"conv{d}d", d)
        if g.shape != shape:
            raise ShapeError(f"the cotangent {format_shape(g.shape)} is not the shape of the convolution's result, "
                             f"{format_shape(shape)}")
        return inputs[result].shape, dtype, normalised
    return rule


def _conv_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    bias = args[2] if len(args) == 3 else "None"
    _, _, (stride, padding, dilation, groups) = _conv_shapes(inputs[0], inputs[1], attrs, "", inputs[1].ndim - 2)
    return (f"aten.convolution.default({args[0]}, {args[1]}, {bias}, {stride}, {padding}, {dilation}, False, "
            f"{[0] * (inputs[1].ndim - 2)}, {groups})")


def _conv_backward_code(result: int):
    mask = [result == 1, result == 2, False]

    def lower(args: list[str], attrs: dict, inputs: list[Value]) -> str:
        g, x, w = inputs
        _, _, (stride, padding, dilation, groups) = _conv_shapes(x, w, attrs, "", w.ndim - 2)
        return (f"aten.convolution_backward.default({args[0]}, {args[1]}, {args[2]}, None, {stride}, {padding}, "
                f"{dilation}, False, {[0] * (w.ndim - 2)}, {groups}, {mask})[{result - 1}]")
    return lower


def _conv_of(w: Value):
    return conv1d if w.ndim == 3 else conv2d


def _conv_vjp(g: Value, out: Value, x: Value, w: Value, *bias: Value, **attrs: Any) -> list[Value | None]:
    spatial = tuple(range(2, g.ndim))
    return [conv_backward_input(g, x, w, **attrs), conv_backward_weight(g, x, w, **attrs),
            *(reduce_sum(g, axis=(0, *spatial)) for _ in bias)]


# The backward ops are linear in the cotangent g. For y = conv(x, w): conv_backward_input
# is w's adjoint, g -> W^T g, and <c, W^T g> = <conv(c, w), g>; conv_backward_weight is
# x's, g -> X^T g, and <c, X^T g> = <conv(x, c), g>. Their VJPs follow from these.


def _backward_input_vjp(c: Value, out: Value, g: Value, x: Value, w: Value, **attrs: Any) -> list[Value | None]:
    return [_conv_of(w)(c, w, **attrs), None, conv_backward_weight(g, c, w, **attrs)]


def _backward_weight_vjp(c: Value, out: Value, g: Value, x: Value, w: Value, **attrs: Any) -> list[Value | None]:
    return [_conv_of(w)(x, c, **attrs), conv_backward_input(g, x, c, **attrs), None]


_CONV_ATTRS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}

conv1d = defop("conv1d", _conv_code, _conv_rule(1), _conv_vjp, arity=VARIADIC, attrs=_CONV_ATTRS, new_storage=True,
               doc="Cross-correlation of x [N, C, L] with weight [out, C/groups, k] (and bias [out]), as "
                   "PyTorch's nn.Conv1d computes it: [N, out, (L + 2*padding - dilation*(k-1) - 1) // stride + 1].")

conv2d = defop("conv2d", _conv_code, _conv_rule(2), _conv_vjp, arity=VARIADIC, attrs=_CONV_ATTRS, new_storage=True,
               doc="Cross-correlation of x [N, C, H, W] with weight [out, C/groups, kh, kw] (and bias [out]), as "
                   "PyTorch's nn.Conv2d computes it; each output size as conv1d's.")

conv_backward_input = defop(
    "conv_backward_input", _conv_backward_code(1), _backward_rule(1), _backward_input_vjp, arity=3,
    attrs=_CONV_ATTRS, new_storage=True,
    doc="The gradient of a convolution's input: g (the result's cotangent), x (read for its shape) and the "
        "weight -> x's shape (aten.convolution_backward).")

conv_backward_weight = defop(
    "conv_backward_weight", _conv_backward_code(2), _backward_rule(2), _backward_weight_vjp, arity=3,
    attrs=_CONV_ATTRS, new_storage=True,
    doc="The gradient of a convolution's weight: g, x and the weight (read for its shape) -> the weight's shape "
        "(aten.convolution_backward).")


# -- pooling ---------------------------------------------------------------------------


def _pool_geometry(x: Value, attrs: Mapping[str, Any], op: str) -> tuple[Shape, dict[str, Any], tuple]:
    """A 2-d pool's output shape, its normalised attrs and the expanded (kernel, stride, padding)."""
    _check_input(x, op, 2)
    kernel = _ints("kernel_size", attrs["kernel_size"], 2, 1)
    stride = kernel if attrs["stride"] is None else _ints("stride", attrs["stride"], 2, 1,
                                                         "stride=None, the default, moves by the kernel size")
    padding = _ints("padding", attrs["padding"], 2, 0)
    for k, p in zip(kernel, padding):
        if 2 * p > k:  # torch's own limit: a window of padding alone would hold no element
            raise ShapeError(f"padding={_compact(padding)} is more than half the kernel size {_compact(kernel)}",
                             f"use padding of at most {k // 2}")
    sizes = _window(x.shape[2:], kernel, stride, padding, 2, f"pooling window {_compact(kernel)}")
    normalised = {"kernel_size": _compact(kernel), "stride": None if stride == kernel else _compact(stride),
                  "padding": _compact(padding)}
    return (*x.shape[:2], *sizes), normalised, (list(kernel), list(stride), list(padding))


def _pool_rule(op: str):
    def rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
        (x,) = inputs
        shape, normalised, _ = _pool_geometry(x, attrs, op)
        if "count_include_pad" in attrs:
            normalised["count_include_pad"] = bool_attr("count_include_pad", attrs["count_include_pad"])
        return shape, x.dtype, normalised
    return rule


def _pool_backward_rule(op: str):
    def rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
        g, x = inputs
        dtype = same_dtype(inputs)
        shape, normalised = _pool_rule(op)([x], attrs)[::2]
        if g.shape != shape:
            raise ShapeError(f"the cotangent {format_shape(g.shape)} is not the shape of the pool's result, "
                             f"{format_shape(shape)}")
        return x.shape, dtype, normalised
    return rule


def _max_pool_args(x: str, attrs: dict, inputs: list[Value]) -> str:
    _, _, (kernel, stride, padding) = _pool_geometry(inputs[-1], attrs, "")
    return f"{x}, {kernel}, {stride}, {padding}"


# Max pooling's two kernels, each by the faster of two layouts for the shape at hand
# (graphdl.ops.choice): torch's NCHW kernel, or its channels-last one with the copies to
# and from that layout. At the digits CNN's [32, 16, 8, 8] with a 2x2 window the
# channels-last way took 58 against 188 us for the pool and 70 against 200 us for the
# argmax; at [2, 3, 224, 224] with 3x3 NCHW won (1.5 against 2.6 ms). Both give the same
# values and indices, in contiguous NCHW tensors.
def _pool_nchw(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> torch.Tensor:
    return torch.ops.aten.max_pool2d.default(x, kernel, stride, padding, [1, 1], False).contiguous()


def _pool_channels_last(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.aten.max_pool2d.default(x, kernel, stride, padding, [1, 1], False).contiguous()


def _argmax_nchw(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> torch.Tensor:
    return torch.ops.aten.max_pool2d_with_indices.default(x, kernel, stride, padding, [1, 1], False)[1].contiguous()


def _argmax_channels_last(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.aten.max_pool2d_with_indices.default(x, kernel, stride, padding, [1, 1], False)[1].contiguous()


pool_max = Fastest("max_pool2d", _pool_nchw, _pool_channels_last)
pool_argmax = Fastest("max_pool2d argmax", _argmax_nchw, _argmax_channels_last)
CODE_GLOBALS["conv"] = sys.modules[__name__]  # what the generated code calls


def _avg_pool_args(x: str, attrs: dict, inputs: list[Value]) -> str:
    _, _, (kernel, stride, padding) = _pool_geometry(inputs[-1], attrs, "")
    return f"{x}, {kernel}, {stride}, {padding}, False, {attrs['count_include_pad']}, None"


_POOL_ATTRS = {"kernel_size": 1, "stride": None, "padding": 0}

max_pool2d = defop(
    "max_pool2d", lambda args, attrs, inputs: f"conv.pool_max({_max_pool_args(args[0], attrs, inputs)})",
    _pool_rule("max_pool2d"), lambda g, out, x, **attrs: [max_pool2d_backward(g, x, **attrs)],
    attrs=_POOL_ATTRS, new_storage=True,
    doc="The largest element of each kernel_size window of x [N, C, H, W], moved by stride (default: the "
        "kernel size), with padding that never wins (PyTorch's nn.MaxPool2d).")

# The window's argmax is found again from x (aten.max_pool2d_with_indices) rather than
# kept from the forward pass, which would take a second, int64 output from the pool's
# node. It costs one more pooling pass in the backward.
def _argmax_code(x: str, attrs: dict, inputs: list[Value]) -> str:
    return f"conv.pool_argmax({_max_pool_args(x, attrs, inputs)})"


def _max_pool_select_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    # The indices count within each [H, W] plane, as c's planes flattened do.
    pooled = _pool_geometry(inputs[1], attrs, "")[0][2:]
    return (f"torch.gather({args[0]}.flatten(2), 2, {_argmax_code(args[1], attrs, inputs)}.flatten(2))"
            f".unflatten(2, {tuple(pooled)})")


def _select_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    c, x = inputs
    dtype = same_dtype(inputs)
    shape, _, normalised = _pool_rule("max_pool2d")([x], attrs)
    if c.shape != x.shape:
        raise ShapeError(f"c {format_shape(c.shape)} must have x's shape {format_shape(x.shape)}")
    return shape, dtype, normalised


max_pool2d_backward = defop(
    "max_pool2d_backward",
    lambda args, attrs, inputs: (f"aten.max_pool2d_with_indices_backward.default({args[0]}, "
                                 f"{_max_pool_args(args[1], attrs, inputs)}, [1, 1], False, "
                                 f"{_argmax_code(args[1], attrs, inputs)})"),
    _pool_backward_rule("max_pool2d"), lambda c, out, g, x, **attrs: [max_pool2d_select(c, x, **attrs), None],
    arity=2, attrs=_POOL_ATTRS, new_storage=True,
    doc="max_pool2d's VJP: g [N, C, H', W'] routed to the argmax of each window of x, summed where windows "
        "overlap (aten.max_pool2d_with_indices_backward).")

# The adjoint of max_pool2d_backward (linear in g): each window takes c at its argmax.
max_pool2d_select = defop(
    "max_pool2d_select", _max_pool_select_code, _select_rule,
    lambda g, out, c, x, **attrs: [max_pool2d_backward(g, x, **attrs), None], arity=2, attrs=_POOL_ATTRS,
    new_storage=True,
    doc="c [N, C, H, W] read at the argmax of each max_pool2d window of x (of c's shape): the VJP of "
        "max_pool2d_backward, so that a gradient graph through a max pool can be differentiated again.")

avg_pool2d = defop(
    "avg_pool2d", lambda args, attrs, inputs: f"aten.avg_pool2d.default({_avg_pool_args(args[0], attrs, inputs)})",
    _pool_rule("avg_pool2d"), lambda g, out, x, **attrs: [avg_pool2d_backward(g, x, **attrs)],
    attrs={**_POOL_ATTRS, "count_include_pad": True}, new_storage=True,
    doc="The mean of each kernel_size window of x [N, C, H, W], moved by stride (default: the kernel size); "
        "with count_include_pad (the default) padding counts as zeros in the mean (PyTorch's nn.AvgPool2d).")

avg_pool2d_backward = defop(
    "avg_pool2d_backward",
    lambda args, attrs, inputs: (f"aten.avg_pool2d_backward.default({args[0]}, "
                                 f"{_avg_pool_args(args[1], attrs, inputs)})"),
    _pool_backward_rule("avg_pool2d"), lambda c, out, g, x, **attrs: [avg_pool2d(c, **attrs), None], arity=2,
    attrs={**_POOL_ATTRS, "count_include_pad": True}, new_storage=True,
    doc="avg_pool2d's VJP: g spread evenly over each window of x (read for its shape); it is the pool's "
        "adjoint, so its own VJP is the pool (aten.avg_pool2d_backward).")
