"""Indexing: index_select (numpy's `take`, ONNX's Gather: rows of a table picked by
integer indices, what gd.Embedding computes) and index_add, its adjoint, which adds rows
back where they were picked (a scatter-add).

The indices are an i64 value of any rank: index_select(x, index, axis) has the shape
x.shape[:axis] + index.shape + x.shape[axis+1:]. They take no gradient. An index out of
range is refused by torch's kernel on the CPU, and the compiled function names the node
and its layer (`Compiled` turns the kernel's IndexError into a GraphError).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..checks import Shape, ShapeError, dtype_name, format_shape
from ..ir import Value
from .elementwise import zeros_like
from .registry import defop
from .shapes import _axis


def _picked(x: Value, index: Value, attrs: Mapping[str, Any]) -> tuple[int, Shape]:
    if x.ndim == 0:
        raise ShapeError("index_select picks along an axis; a 0-d value has none")
    axis = _axis(x, attrs["axis"])
    return axis, (*x.shape[:axis], *index.shape, *x.shape[axis + 1:])


def index_select_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    x, index = inputs
    axis, shape = _picked(x, index, attrs)
    return shape, x.dtype, {"axis": axis}


def index_add_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    x, index, src = inputs
    if src.dtype != x.dtype:
        raise ShapeError(f"dtypes differ ({x.label}: {dtype_name(x.dtype)}, {src.label}: {dtype_name(src.dtype)})",
                         "src must have x's dtype")
    axis, shape = _picked(x, index, attrs)
    if src.shape != shape:
        raise ShapeError(f"src {format_shape(src.shape)} is not what index_select of {format_shape(x.shape)} by "
                         f"{format_shape(index.shape)} along axis {axis} gives, {format_shape(shape)}")
    return x.shape, x.dtype, {"axis": axis}


def _flat(args: list[str], index: Value) -> str:
    """The indices as torch's kernels take them: one dim."""
    return args[1] if index.ndim == 1 else f"{args[1]}.reshape(-1)"


def _index_select_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    x, index = inputs
    axis = attrs["axis"]
    code = f"torch.index_select({args[0]}, {axis}, {_flat(args, index)})"
    if index.ndim == 1:
        return code
    return f"{code}.reshape({args[0]}.shape[:{axis}] + {args[1]}.shape + {args[0]}.shape[{axis + 1}:])"


def _index_add_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    x, index, src = inputs
    axis = attrs["axis"]
    values = args[2] if index.ndim == 1 else \
        f"{args[2]}.reshape({args[0]}.shape[:{axis}] + ({args[1]}.numel(),) + {args[0]}.shape[{axis + 1}:])"
    return f"torch.index_add({args[0]}, {axis}, {_flat(args, index)}, {values})"


index_select = defop(
    "index_select", _index_select_code, index_select_rule, arity=2, attrs={"axis": 0}, indices=(1,),
    any_dtype=True, new_storage=True,
    vjp=lambda g, out, x, index, axis: [index_add(zeros_like(x), index, g, axis=axis), None],
    doc="The entries of x at `index` (i64, any rank) along `axis`: x.shape[:axis] + index.shape + "
        "x.shape[axis+1:], as numpy's take.")

index_add = defop(
    "index_add", _index_add_code, index_add_rule, arity=3, attrs={"axis": 0}, indices=(1,), new_storage=True,
    vjp=lambda g, out, x, index, src, axis: [g, None, index_select(g, index, axis=axis)],
    doc="x with src added at `index` along `axis`, repeated indices adding up: the adjoint of index_select.")
