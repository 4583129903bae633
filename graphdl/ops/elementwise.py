"""Elementwise ops: arithmetic that broadcasts as torch does, the activations, and the
softmax family (elementwise but for one normalised axis)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from .reductions import reduce_sum, unbroadcast
from .registry import broadcast_shapes, defop, same_dtype, unary


def broadcasting(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    dtype = same_dtype(inputs)
    a, b = inputs
    shape = broadcast_shapes(a.shape, b.shape)
    if shape is None:
        hint = "shapes broadcast when, from the right, each pair of dims is equal or one of them is 1"
        if any(isinstance(d, str) for d in (*a.shape, *b.shape)):
            hint += "; a symbolic dim such as N only matches itself or 1"
        raise ShapeError(f"shapes {format_shape(a.shape)} and {format_shape(b.shape)} do not broadcast", hint)
    return shape, dtype


def class_axis_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    """softmax and log_softmax: the shape of x, normalised over one axis (the last by default)."""
    (x,) = inputs
    axis = attrs["axis"]
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"axis={axis!r} is not an axis of {format_shape(x.shape)}",
                         f"use an int in [{-x.ndim}, {x.ndim - 1}]; -1, the default, is the last axis"
                         if x.ndim else "softmax needs at least one axis to normalise over")
    return x.shape, x.dtype


zeros_like = defop("zeros_like", "torch.zeros_like({0})", unary, lambda g, out, x: [None], new_storage=True,
                   doc="Zeros of x's shape and dtype.")

add = defop("add", "torch.add({0}, {1})", broadcasting, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g, a), unbroadcast(g, b)],
            new_storage=True, inplace={0: "{0}.add_({1})", 1: "{1}.add_({0})"},
            doc="a + b, broadcasting as torch does.")

sub = defop("sub", "torch.sub({0}, {1})", broadcasting, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g, a), unbroadcast(neg(g), b)],
            new_storage=True, inplace={0: "{0}.sub_({1})"},
            doc="a - b, broadcasting as torch does.")

mul = defop("mul", "torch.mul({0}, {1})", broadcasting, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g * b, a), unbroadcast(g * a, b)],
            new_storage=True, inplace={0: "{0}.mul_({1})", 1: "{1}.mul_({0})"},
            doc="a * b elementwise, broadcasting as torch does.")

div = defop("div", "torch.div({0}, {1})", broadcasting, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g / b, a), unbroadcast(neg(g * out) / b, b)],
            new_storage=True, inplace={0: "{0}.div_({1})"},
            doc="a / b elementwise, broadcasting as torch does.")

neg = defop("neg", "torch.neg({0})", unary, lambda g, out, x: [neg(g)], out=True,
            new_storage=True, inplace={0: "{0}.neg_()"},
            doc="-x.")

exp = defop("exp", "torch.exp({0})", unary, lambda g, out, x: [g * out], out=True,
            new_storage=True, inplace={0: "{0}.exp_()"},
            doc="e**x elementwise.")

log = defop("log", "torch.log({0})", unary, lambda g, out, x: [g / x], out=True,
            new_storage=True, inplace={0: "{0}.log_()"},
            doc="Natural log, elementwise.")

# Bound to gd.abs in graphdl.ops' __init__ only: inside the package, abs is Python's.
absolute = defop("abs", "torch.abs({0})", unary, lambda g, out, x: [g * sign(x)], out=True,
                 new_storage=True, inplace={0: "{0}.abs_()"},
                 doc="|x| elementwise.")

sign = defop("sign", "torch.sign({0})", unary, lambda g, out, x: [None], new_storage=True,
             doc="-1, 0 or 1 elementwise; its gradient is zero almost everywhere, so none flows.")

greater = defop("greater", "torch.gt({0}, {1}).to({0}.dtype)", broadcasting, arity=2,
                vjp=lambda g, out, a, b: [None, None], new_storage=True,
                doc="1.0 where a > b else 0.0 (a mask in a's dtype); no gradient flows through it.")

relu = defop("relu", "torch.relu({0})", unary, lambda g, out, x: [g * greater(out, 0.0)],
             new_storage=True, inplace={0: "{0}.relu_()"},
             doc="max(x, 0) elementwise.")

tanh = defop("tanh", "torch.tanh({0})", unary, lambda g, out, x: [g * (1.0 - out * out)], out=True,
             new_storage=True, inplace={0: "{0}.tanh_()"},
             doc="Hyperbolic tangent, elementwise.")

sigmoid = defop("sigmoid", "torch.sigmoid({0})", unary, lambda g, out, x: [g * (out * (1.0 - out))], out=True,
                new_storage=True, inplace={0: "{0}.sigmoid_()"},
                doc="1 / (1 + e**-x) elementwise.")

softmax = defop("softmax", "torch.softmax({0}, {axis})", class_axis_rule, attrs={"axis": -1}, new_storage=True,
                vjp=lambda g, out, x, axis: [out * (g - reduce_sum(g * out, axis=axis, keepdims=True))],
                doc="exp(x) / sum(exp(x)) over `axis` (the last by default): rows of probabilities.")

log_softmax = defop("log_softmax", "torch.log_softmax({0}, {axis})", class_axis_rule, attrs={"axis": -1},
                    new_storage=True,
                    vjp=lambda g, out, x, axis: [g - exp(out) * reduce_sum(g, axis=axis, keepdims=True)],
                    doc="x - log(sum(exp(x))) over `axis` (the last by default), computed stably.")


# -- activations beyond the classic three ---------------------------------------------------
# Lowered to aten's kernels (graphdl computes nothing through torch's neural-network module).

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715  # the tanh form's coefficient, as torch's


def gelu_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    same_dtype(inputs)
    if attrs["approximate"] not in ("none", "tanh"):
        raise ShapeError(f"approximate={attrs['approximate']!r} is not a form of GELU",
                         "use 'none' (exact, with erf) or 'tanh' (the tanh approximation), as torch's")
    if any(v.shape != inputs[0].shape for v in inputs):
        raise ShapeError("shapes differ (" + ", ".join(format_shape(v.shape) for v in inputs) + ")",
                         "gelu_backward takes the cotangent and the input of gelu, of one shape")
    return inputs[0].shape, inputs[0].dtype


def _gelu_code(out: bool) -> Any:
    def lower(args: list[str], attrs: dict, inputs: list[Value]) -> str:
        if out:
            return f"aten.gelu.out({args[0]}, approximate={attrs['approximate']!r}, out={attrs['out']})"
        return f"aten.gelu.default({args[0]}, approximate={attrs['approximate']!r})"
    return lower


def _gelu_backward_code(out: bool) -> Any:
    def lower(args: list[str], attrs: dict, inputs: list[Value]) -> str:
        if out:
            return f"aten.gelu_backward.grad_input({args[0]}, {args[1]}, approximate={attrs['approximate']!r}, " \
                   f"grad_input={attrs['out']})"
        return f"aten.gelu_backward.default({args[0]}, {args[1]}, approximate={attrs['approximate']!r})"
    return lower


def _gelu_second(x: Value, approximate: str) -> Value:
    """gelu''(x), in primitives: the exact form's phi(x) (2 - x^2), or the tanh form's."""
    if approximate == "none":
        return exp(x * x * -0.5) * _INV_SQRT_2PI * (2.0 - x * x)
    t = tanh((x + x * x * x * _GELU_CUBIC) * _SQRT_2_OVER_PI)
    sech2 = 1.0 - t * t
    du = (1.0 + x * x * (3.0 * _GELU_CUBIC)) * _SQRT_2_OVER_PI
    return sech2 * du + x * 0.5 * (sech2 * (x * (6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI)) - t * sech2 * du * du * 2.0)


gelu = defop("gelu", _gelu_code(False), gelu_rule, attrs={"approximate": "none"}, out=_gelu_code(True),
             vjp=lambda g, out, x, approximate: [gelu_backward(g, x, approximate=approximate)], new_storage=True,
             doc="x * Phi(x), Phi the standard normal's CDF (approximate='tanh': torch's tanh form).")

gelu_backward = defop(
    "gelu_backward", _gelu_backward_code(False), gelu_rule, arity=2, attrs={"approximate": "none"},
    out=_gelu_backward_code(True), new_storage=True,
    vjp=lambda gc, out, g, x, approximate: [gelu_backward(gc, x, approximate=approximate),
                                            gc * g * _gelu_second(x, approximate)],
    doc="g * gelu'(x): gelu's VJP, one aten kernel; its own VJP is written with the primitives.")


def leaky_relu_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    slope = attrs["negative_slope"]
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise ShapeError(f"negative_slope={slope!r} must be a finite number, such as 0.01")
    return inputs[0].shape, inputs[0].dtype, {"negative_slope": float(slope)}


def _leaky_relu_vjp(g: Value, out: Value, x: Value, negative_slope: float) -> list[Value]:
    positive = greater(x, 0.0)
    return [g * (positive * (1.0 - negative_slope) + negative_slope)]


leaky_relu = defop("leaky_relu", "aten.leaky_relu.default({0}, {negative_slope})", leaky_relu_rule,
                   attrs={"negative_slope": 0.01},
                   out=lambda args, attrs, inputs: f"aten.leaky_relu.out({args[0]}, {attrs['negative_slope']!r}, "
                                                   f"out={attrs['out']})",
                   vjp=_leaky_relu_vjp, new_storage=True,
                   doc="x where x > 0, else negative_slope * x.")


def _silu_vjp(g: Value, out: Value, x: Value) -> list[Value]:
    s = sigmoid(x)
    return [g * (s * (1.0 + x * (1.0 - s)))]


silu = defop("silu", "aten.silu.default({0})", unary, _silu_vjp, out="aten.silu.out({0}, out={out})",
             new_storage=True, inplace={0: "aten.silu_.default({0})"},
             doc="x * sigmoid(x) (also called swish).")
