"""Reductions and their adjoints: sum and mean over axes, and the broadcasts that undo them.

These are the lowest family: every other family's VJPs undo broadcasting with
`unbroadcast`, and these ops' own VJPs need nothing but each other.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from .registry import Lowering, bool_attr, broadcast_shapes, defop, same_dtype


def _normalise_axis(x: Value, attrs: Mapping[str, Any]) -> tuple[int, ...]:
    """attrs["axis"] (None for all, an int or ints) as sorted non-negative axes."""
    axis = attrs["axis"]
    if axis is None:
        return tuple(range(x.ndim))
    if not isinstance(axis, (numbers.Integral, tuple, list)):
        raise ShapeError(f"axis must be None, an int or a tuple of ints, got {axis!r}",
                         "e.g. axis=1 or axis=(0, 1); None reduces every axis")
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    out = []
    for a in axes:
        # A 0-d value has no axis: torch would take 0 or -1 there, but the VJP could not put it back.
        if not isinstance(a, numbers.Integral) or isinstance(a, bool) or not -x.ndim <= a < x.ndim:
            raise ShapeError(f"axis {axis!r} is out of range for shape {format_shape(x.shape)}",
                             f"use an axis in [{-x.ndim}, {x.ndim - 1}]" if x.ndim else
                             "a 0-d value has no axes; use axis=None")
        out.append(int(a) % x.ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def reduce_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (x,) = inputs
    axes = _normalise_axis(x, attrs)
    if not axes and x.ndim:  # torch reads an empty dim list as "every dim": refuse rather than disagree
        raise ShapeError(f"axis={attrs['axis']!r} names no axis", "use axis=None to reduce every axis")
    keepdims = bool_attr("keepdims", attrs["keepdims"])
    if keepdims:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    # None prints as "all axes"
    return shape, x.dtype, {"axis": None if len(axes) == x.ndim else axes, "keepdims": keepdims}


def broadcast_like_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    g, ref = inputs
    dtype = same_dtype(inputs)
    shape = g.shape
    axes = None if attrs["axis"] is None else _normalise_axis(ref, attrs)
    if axes is not None:
        if not axes and ref.ndim:  # the VJP reduces over these axes, and sum refuses an empty list
            raise ShapeError(f"axis={axes!r} names no axis", "use axis=None to broadcast without one")
        if g.ndim + len(axes) == ref.ndim:  # the reduction dropped these axes: put them back
            for a in axes:
                shape = (*shape[:a], 1, *shape[a:])
        elif g.ndim != ref.ndim or any(g.shape[a] != 1 for a in axes):  # nor kept them as 1s
            raise ShapeError(f"{format_shape(g.shape)} is not {format_shape(ref.shape)} reduced over axes "
                             f"{axes} (with or without keepdims)", "use axis=None to broadcast g as it is")
    elif attrs["mean"]:
        raise ShapeError("mean=True needs the reduced axes in axis")
    if len(shape) > ref.ndim or broadcast_shapes(shape, ref.shape) != ref.shape:
        raise ShapeError(f"{format_shape(g.shape)} does not broadcast to {format_shape(ref.shape)}")
    return ref.shape, dtype, {"axis": axes, "mean": bool_attr("mean", attrs["mean"])}


def sum_to_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (x,) = inputs
    shape = attrs["shape"]
    if not isinstance(shape, (tuple, list)) or not all(
            (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d.isidentifier())
            for d in shape):
        raise ShapeError(f"shape {shape!r} must be a tuple of non-negative ints or symbols such as 'N'")
    shape = tuple(shape)
    if len(shape) > x.ndim or broadcast_shapes(shape, x.shape) != x.shape:
        raise ShapeError(f"{format_shape(x.shape)} cannot be summed down to {format_shape(shape)}")
    return shape, x.dtype, {"shape": shape}


def _reduce_code(fn: str, out: bool = False) -> Lowering:
    """torch.sum / torch.mean over the node's axes; with `out`, into attrs["out"] (only
    the overload with dims takes out=)."""
    def lower(args: list[str], attrs: dict, inputs: list[Value]) -> str:
        if attrs["axis"] is None and not attrs["keepdims"] and not out:
            return f"torch.{fn}({args[0]})"
        axis = attrs["axis"] if attrs["axis"] is not None else tuple(range(inputs[0].ndim))
        dims = axis[0] if len(axis) == 1 else axis  # torch.sum(x, 0) parses faster than (0,)
        tail = (", keepdim=True" if attrs["keepdims"] else "") + (f", out={attrs['out']}" if out else "")
        return f"torch.{fn}({args[0]}, {dims!r}{tail})"
    return lower


def count_code(ref: str, shape: Shape, axes: Sequence[int]) -> str:
    """Code for the number of elements of `ref` over `axes` (symbolic dims read at run time)."""
    static = math.prod(d for i, d in enumerate(shape) if i in axes and isinstance(d, int))
    dynamic = [f"{ref}.shape[{i}]" for i in axes if isinstance(shape[i], str)]
    return " * ".join([*dynamic, str(static)] if static != 1 or not dynamic else dynamic)


def _broadcast_like_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    g, ref = inputs
    src = args[0]
    axes = tuple(range(ref.ndim)) if attrs["axis"] is None else attrs["axis"]
    if attrs["axis"] is not None and g.ndim and g.ndim + len(axes) == ref.ndim:
        for a in axes:
            src = f"{src}.unsqueeze({a})"
    if attrs["mean"]:
        src = f"torch.div({src}, {count_code(args[1], ref.shape, axes)})"
    return f"{src}.expand_as({args[1]})"


def _sum_to_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    (x,) = inputs
    shape = attrs["shape"]
    lead = x.ndim - len(shape)
    kept = tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
    src = args[0]
    if kept:
        src = f"torch.sum({src}, {kept!r}, keepdim=True)"
    if lead:
        src = f"torch.sum({src}, {tuple(range(lead))!r})"
    return src


def unbroadcast(g: Value, x: Value) -> Value:
    """Sum a cotangent back down to the shape of the input it flows into."""
    return g if g.shape == x.shape else sum_to(g, shape=x.shape)


def _axes(x: Value, axis: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(range(x.ndim)) if axis is None else axis


reduce_sum = defop("sum", _reduce_code("sum"), reduce_rule, attrs={"axis": None, "keepdims": False},
                   out=_reduce_code("sum", out=True), new_storage=True,
                   vjp=lambda g, out, x, axis, keepdims: [broadcast_like(g, x, axis=axis)],
                   doc="Sum over `axis` (None, the default, for every axis); keepdims keeps them as 1s.")

reduce_mean = defop("mean", _reduce_code("mean"), reduce_rule, attrs={"axis": None, "keepdims": False},
                    new_storage=True,
                    vjp=lambda g, out, x, axis, keepdims: [broadcast_like(g, x, axis=_axes(x, axis), mean=True)],
                    doc="Mean over `axis` (None, the default, for every axis); keepdims keeps them as 1s.")


def _broadcast_like_vjp(g: Value, out: Value, x: Value, ref: Value, axis: tuple | None, mean: bool) -> list:
    if axis is None:
        return [unbroadcast(g, x), None]
    reduce = reduce_mean if mean else reduce_sum
    # x may also have been broadcast along other axes (x [1] against ref [N,4], axis=0).
    return [unbroadcast(reduce(g, axis=axis, keepdims=x.ndim == ref.ndim), x), None]


broadcast_like = defop(
    "broadcast_like", _broadcast_like_code, broadcast_like_rule, _broadcast_like_vjp, arity=2,
    attrs={"axis": None, "mean": False},
    doc="g expanded to ref's shape. With axis, g is the reduction of ref over those axes "
        "(they are re-inserted first); with mean, g is also divided by their size. The "
        "adjoint of sum and mean.",
)

sum_to = defop("sum_to", _sum_to_code, sum_to_rule, attrs={"shape": ()},
               vjp=lambda g, out, x, shape: [broadcast_like(g, x)],
               doc="Sum x down to `shape` (the adjoint of broadcasting).")

