"""Elementwise ops: arithmetic that broadcasts as torch does, the activations, and the
softmax family (elementwise but for one normalised axis)."""

from __future__ import annotations

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
