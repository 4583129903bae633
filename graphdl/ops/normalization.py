"""Normalisation: the variance (and correct_var), batch norm and layer norm.

Batch norm is one op, `batch_norm(x, mean, var, weight, bias)`, that normalises x's
channels (axis 1) with the statistics it is given. Which statistics is the mode, and it
is data in the graph, not a flag: a training graph gives it the batch's own mean and
(biased) variance, computed by `mean` and `var` nodes that gradients flow back through,
and also computes the running statistics' next values; an inference graph gives it the
running statistics, params that take no gradient (see graphdl.layers.BatchNorm2d).

Each op's VJP is written with the primitives, so a gradient graph through a
normalisation can be differentiated again.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..checks import GraphError, Shape, ShapeError, format_shape, read_float
from ..ir import Value
from .elementwise import neg, zeros_like
from .reductions import broadcast_like, count_code, reduce_mean, reduce_rule, reduce_sum, unbroadcast
from .registry import CODE_GLOBALS, defop, same_dtype, unary


def _eps(attrs: Mapping[str, Any], dtype: torch.dtype) -> float:
    eps = attrs["eps"]
    try:
        value = read_float(eps, "eps", dtype)
    except GraphError as e:
        raise ShapeError(str(e)) from None
    if not value > 0 or value == float("inf"):
        raise ShapeError(f"eps={eps!r} must be a finite number > 0", "torch's default is 1e-5")
    return value


rsqrt = defop("rsqrt", "torch.rsqrt({0})", unary, lambda g, out, x: [g * (out * out * out) * -0.5], out=True,
              new_storage=True, inplace={0: "{0}.rsqrt_()"},
              doc="1 / sqrt(x) elementwise.")


# -- the variance ----------------------------------------------------------------------


def var_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (x,) = inputs
    correction = attrs["correction"]
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
        raise ShapeError(f"correction={correction!r} must be a whole number >= 0",
                         "0 for the population variance, 1 for the unbiased sample variance")
    shape, dtype, normalised = reduce_rule(inputs, attrs)
    return shape, dtype, {**normalised, "correction": correction}


def variance(x: torch.Tensor, dims: tuple[int, ...], correction: int, keepdim: bool) -> torch.Tensor:
    """sum((x - mean)**2) / (n - correction) over `dims`, in two passes. torch.var's
    one-pass (Welford) CPU kernel took 211 us for the [32, 16, 8, 8] activations of the
    digits CNN over (0, 2, 3), this 26 us (one thread); the two-pass sum is as accurate.
    n - correction <= 0 divides by zero, as torch.var does (inf, or nan for 0 / 0). A half
    dtype is squared and summed in float32, as torch.var computes it: in float16 a
    deviation of 300 squares past 65504, and the squares of 70,000 standard normal values
    add up past it."""
    centred = x - x.mean(dims, keepdim=True)
    if x.dtype in (torch.float16, torch.bfloat16):
        centred = centred.float()
    count = math.prod(x.shape[d] for d in dims)
    squares = centred.mul_(centred).sum(dims, keepdim=keepdim)
    return squares.div_(max(count - correction, 0)).to(x.dtype)


CODE_GLOBALS["norm"] = sys.modules[__name__]  # what the generated code calls


def _var_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    axis = attrs["axis"] if attrs["axis"] is not None else tuple(range(inputs[0].ndim))
    return f"norm.variance({args[0]}, {axis!r}, {attrs['correction']}, {attrs['keepdims']})"


def _var_vjp(g: Value, out: Value, x: Value, axis: tuple[int, ...] | None, keepdims: bool,
             correction: int) -> list[Value | None]:
    # d var / dx = 2 (x - mean) / (n - correction), n the count over the axes (symbolic
    # where the batch is): broadcast_like's mean divides by n, and a correction scales
    # that by n / (n - correction), with n counted from x itself.
    axes = tuple(range(x.ndim)) if axis is None else axis
    if correction:
        count = reduce_sum(zeros_like(x) + 1.0, axis=axes, keepdims=keepdims)
        g = g * (count / (count - float(correction)))
    # (g is divided by n before it is doubled: doubled first, a float16 g above 32752 would overflow.)
    centred = x - broadcast_like(reduce_mean(x, axis=axes, keepdims=keepdims), x, axis=axes)
    return [broadcast_like(g, x, axis=axes, mean=True) * centred * 2.0]


var = defop("var", _var_code, var_rule, _var_vjp, attrs={"axis": None, "keepdims": False, "correction": 0},
            new_storage=True,
            doc="The variance over `axis` (None, the default, for every axis): sum((x - mean)**2) / (n - "
                "correction); correction=0 (the default) is the population variance, 1 the unbiased one.")


def _correct_var_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    v, x = inputs
    shape, dtype, normalised = var_rule([x], attrs)
    if v.shape != shape or v.dtype != dtype:
        raise ShapeError(f"v {format_shape(v.shape)} must be the shape of x's variance over the axes, "
                         f"{format_shape(shape)}")
    return shape, dtype, normalised


def unbiasing(count: int, correction: int) -> float:
    """n / (n - correction), the factor from the population variance to the corrected one
    (a number, not tensor arithmetic: v * n would overflow float16 from v * n > 65504); inf
    where n <= correction, where torch.var divides by zero (v * inf: inf, or nan for 0)."""
    return count / (count - correction) if count > correction else math.inf


def _correct_var_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    x = inputs[1]
    count = count_code(args[1], x.shape, attrs["axis"] if attrs["axis"] is not None else tuple(range(x.ndim)))
    return f"torch.mul({args[0]}, norm.unbiasing({count}, {attrs['correction']}))"


# BatchNorm's running variance is the unbiased one; computed from the batch's population
# variance, which normalises the batch anyway, as torch's kernel computes it, instead of
# a second pass over the activations (62 us of the digits CNN's step).
correct_var = defop(
    "correct_var", _correct_var_code, _correct_var_rule,
    lambda g, out, v, x, axis, keepdims, correction: [correct_var(g, x, axis=axis, keepdims=keepdims,
                                                                  correction=correction), None],
    arity=2, attrs={"axis": None, "keepdims": False, "correction": 1}, new_storage=True,
    doc="v, the population variance of x over `axis` (x read for its counts), made the variance with "
        "`correction`: v * n / (n - correction), n the number of elements the variance is over.")


# -- batch norm ------------------------------------------------------------------------


def _channel_axes(x: Value) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def batch_norm_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    x, *per_channel = inputs
    dtype = same_dtype(inputs)
    if x.ndim < 2:
        raise ShapeError(f"x {format_shape(x.shape)} must have a channel axis: [N, C], [N, C, L] or [N, C, H, W]")
    channels = x.shape[1]
    if not isinstance(channels, int):
        raise ShapeError(f"x {format_shape(x.shape)} has a symbolic channel dim", "declare the channels as a number")
    for name, v in zip(("mean", "var", "weight", "bias"), per_channel):
        if v.shape != (channels,):
            raise ShapeError(f"{name} {format_shape(v.shape)} must be [{channels}], one per channel of x "
                             f"{format_shape(x.shape)}",
                             f"make the layer's num_features {channels}" if name in ("weight", "bias") else "")
    return x.shape, dtype, {"eps": _eps(attrs, dtype)}


def _batch_norm_vjp(g: Value, out: Value, x: Value, mean: Value, var_: Value, weight: Value, bias: Value,
                    eps: float) -> list[Value | None]:
    # y = (x - mean) * r * weight + bias per channel, r = 1 / sqrt(var + eps). mean and var
    # are inputs like any other: in a training graph they are the batch's statistics, and
    # their own VJPs carry these cotangents on to x. Where they are x's own statistics
    # (BatchNorm training), x's whole cotangent, through them too, is one fused op instead
    # (batch_norm_backward: torch's kernel, in place of a dozen passes over x).
    axes = _channel_axes(x)
    r = rsqrt(var_ + eps)
    centred = x - broadcast_like(mean, x, axis=axes)
    scale = r * weight
    summed = reduce_sum(g, axis=axes)
    spread = reduce_sum(g * centred, axis=axes)
    if _batch_statistics(x, mean, var_):
        return [batch_norm_backward(g, x, mean, var_, weight, eps=eps), None, None, spread * r, summed]
    return [g * broadcast_like(scale, x, axis=axes), neg(summed * scale), ((spread * r) * r) * r * weight * -0.5,
            spread * r, summed]


def _batch_statistics(x: Value, mean: Value, var_: Value) -> bool:
    """Whether mean and var_ are x's population mean and variance over its channel axes."""
    axes = _channel_axes(x)
    m, v = mean.node, var_.node
    return (m is not None and m.op is reduce_mean and m.inputs[0] is x and m.attrs["axis"] == axes
            and not m.attrs["keepdims"] and v is not None and v.op is var and v.inputs[0] is x
            and v.attrs["axis"] == axes and not v.attrs["keepdims"] and v.attrs["correction"] == 0)


batch_norm = defop(
    "batch_norm", lambda args, attrs, inputs: (f"aten.batch_norm.default({args[0]}, {args[3]}, {args[4]}, {args[1]}, "
                                               f"{args[2]}, False, 0.0, {attrs['eps']!r}, False)"),
    batch_norm_rule, _batch_norm_vjp, arity=5, attrs={"eps": 1e-5}, new_storage=True,
    doc="(x - mean) / sqrt(var + eps) * weight + bias over x's channels (axis 1), given the statistics "
        "mean and var [C] and the affine weight and bias [C] (PyTorch's nn.BatchNorm1d/2d's formula).")


def batch_norm_dx(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var_: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """batch_norm_backward's kernel: torch's batch-norm backward for the input alone, with
    the statistics given (it takes 1 / sqrt(var + eps), as its forward saves it)."""
    return torch.ops.aten.native_batch_norm_backward.default(
        g, x, weight, None, None, mean, torch.rsqrt(var_ + eps), True, eps, [True, False, False])[0]


def _batch_norm_backward_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype,
                                                                                        dict[str, Any]]:
    g, x, *per_channel = inputs
    if g.shape != x.shape:
        raise ShapeError(f"the cotangent {format_shape(g.shape)} must have x's shape {format_shape(x.shape)}")
    shape, dtype, normalised = batch_norm_rule([x, *per_channel, per_channel[-1]], attrs)
    same_dtype(inputs)
    return shape, dtype, normalised


def _batch_norm_backward_vjp(c: Value, out: Value, g: Value, x: Value, mean: Value, var_: Value, weight: Value,
                             eps: float) -> list[Value | None]:
    # out = w r (g - a) - w r^3 d m per channel, d = x - mean, r = 1 / sqrt(var + eps),
    # a = mean(g), m = mean(g d), the means over the channel axes: linear in g, and its
    # own adjoint there (a projection, scaled by w r), so g's cotangent is the op again.
    axes = _channel_axes(x)
    def spread(v: Value) -> Value:
        return broadcast_like(v, x, axis=axes)
    # r is multiplied into m and cd one factor at a time, never as r^3 first: a half dtype's
    # r^3 overflows for var + eps below 6e-4 (a constant channel), where m and cd are 0.
    r = rsqrt(var_ + eps)
    d = x - spread(mean)
    m, cd = reduce_mean(g * d, axis=axes), reduce_sum(c * d, axis=axes)
    rrm, rrcd = r * (r * m), r * (r * cd)
    cg_less_ca = reduce_sum(c * g, axis=axes) - reduce_mean(g, axis=axes) * reduce_sum(c, axis=axes)
    dx = neg(spread(weight * r)) * (c * spread(rrm) + g * broadcast_like(rrcd, x, axis=axes, mean=True))
    dvar = weight * (r * (r * (r * (cg_less_ca * -0.5)))) + weight * rrm * (r * rrcd) * 1.5
    return [batch_norm_backward(c, x, mean, var_, weight, eps=eps), dx, neg(reduce_sum(dx, axis=axes)),
            dvar, r * cg_less_ca - rrm * (r * cd)]


batch_norm_backward = defop(
    "batch_norm_backward", lambda args, attrs, inputs: f"norm.batch_norm_dx({', '.join(args)}, {attrs['eps']!r})",
    _batch_norm_backward_rule, _batch_norm_backward_vjp, arity=5, attrs={"eps": 1e-5}, new_storage=True,
    doc="x's cotangent through batch_norm(x, mean, var, weight, bias) where mean and var are x's own "
        "statistics over its channel axes, given the output's cotangent g: w r (g - mean(g)) - w r^3 (x - mean) "
        "mean(g (x - mean)), r = 1 / sqrt(var + eps) (torch's batch-norm backward, for the input).")


# -- layer norm ------------------------------------------------------------------------


def layer_norm_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    x, weight, bias = inputs
    dtype = same_dtype(inputs)
    k = weight.ndim
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k:]) != weight.shape:
        raise ShapeError(f"x {format_shape(x.shape)} does not end in the normalised shape {format_shape(weight.shape)}"
                         " (the weight's)", "make the layer's normalized_shape the last dims of its input")
    if not all(isinstance(d, int) for d in weight.shape):
        raise ShapeError(f"the normalised shape {format_shape(weight.shape)} must be fixed, not symbolic",
                         "normalise over dims whose sizes are numbers (the features, not the batch)")
    if bias.shape != weight.shape:
        raise ShapeError(f"bias {format_shape(bias.shape)} must have the weight's shape {format_shape(weight.shape)}")
    return x.shape, dtype, {"eps": _eps(attrs, dtype)}


def _layer_norm_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    shape = list(inputs[1].shape)
    return f"aten.native_layer_norm.default({args[0]}, {shape}, {args[1]}, {args[2]}, {attrs['eps']!r})[0]"


def _layer_norm_vjp(g: Value, out: Value, x: Value, weight: Value, bias: Value, eps: float) -> list[Value | None]:
    axes = tuple(range(x.ndim - weight.ndim, x.ndim))
    mean = reduce_mean(x, axis=axes, keepdims=True)
    r = rsqrt(var(x, axis=axes, keepdims=True) + eps)
    normed = (x - mean) * r
    gn = g * weight
    gx = r * (gn - reduce_mean(gn, axis=axes, keepdims=True)
              - normed * reduce_mean(gn * normed, axis=axes, keepdims=True))
    return [gx, unbroadcast(g * normed, weight), unbroadcast(g, bias)]


layer_norm = defop(
    "layer_norm", _layer_norm_code, layer_norm_rule, _layer_norm_vjp, arity=3, attrs={"eps": 1e-5},
    new_storage=True,
    doc="(x - mean) / sqrt(var + eps) * weight + bias, the statistics over x's last dims (as many as the "
        "weight has, whose shape they must have): PyTorch's nn.LayerNorm with an elementwise affine.")

