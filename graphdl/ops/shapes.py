"""Shape ops: reshape, flatten, permute, concat, slice (and its adjoint, unslice), and
`split`, slices that tile an axis.

They only move elements, so they take values of any dtype, integer indices too. The
batch dim stays symbolic: a shape such as `(None, 64)` or `("N", 64)` keeps the `N`
of the input where it is, and a shape rule refuses what would fold a symbolic dim into
another (`[N,4]` to `(-1,)`: its size would no longer be a dim of its own) or cut it
(slicing `N`, whose size is unknown until the graph runs). reshape, flatten, permute and
slice may return views of their input, so none of them is `new_storage`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checks import Dim, GraphError, Shape, ShapeError, format_shape
from ..ir import Value
from .registry import VARIADIC, defop, same_dtype


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _axis(x: Value, axis: Any, what: str = "axis") -> int:
    """`axis` as a non-negative axis of x."""
    if not _is_int(axis) or not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"{what}={axis!r} is not an axis of {format_shape(x.shape)}",
                         f"use an int in [{-x.ndim}, {x.ndim - 1}]" if x.ndim else "a 0-d value has no axes")
    return int(axis) % x.ndim


def _static(shape: Sequence[Dim]) -> int:
    return math.prod(d for d in shape if isinstance(d, int))


def _symbols(shape: Sequence[Dim]) -> Counter[str]:
    return Counter(d for d in shape if isinstance(d, str))


def _elements(shape: Sequence[Dim]) -> str:
    """How many elements a shape holds, for messages: 20, or N*20."""
    symbols = [d for d in shape if isinstance(d, str)]
    return "*".join([*symbols, str(_static(shape))] if _static(shape) != 1 or not symbols else symbols)


# -- reshape -----------------------------------------------------------------------------


def _target(shape: Any) -> tuple[Dim, ...]:
    """A reshape's shape as given: ints >= 0, at most one -1, symbols; None is "N"."""
    if not isinstance(shape, (tuple, list)):
        raise ShapeError(f"shape {shape!r} must be a tuple such as (None, 64): ints, one -1 at most, and None "
                         "(or a symbol such as 'N') for the batch dim")
    dims = tuple("N" if d is None else int(d) if _is_int(d) else d for d in shape)
    for d in dims:
        if not (isinstance(d, int) and d >= -1) and not (isinstance(d, str) and d.isidentifier()):
            raise ShapeError(f"shape {shape!r}: dim {d!r} must be a whole number, -1 (inferred), or None "
                             "for the batch dim")
    if dims.count(-1) > 1:
        raise ShapeError(f"shape {shape!r} has more than one -1", "at most one dim can be inferred")
    return dims


def reshape_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (x,) = inputs
    dims = _target(attrs["shape"])
    given = f"shape {tuple(attrs['shape'])!r}"
    extra = _symbols(dims) - _symbols(x.shape)
    if extra:
        raise ShapeError(f"{given} names {', '.join(extra)}, which is no dim of {format_shape(x.shape)}",
                         "a symbolic dim can only be kept where it is, as None or by its name")
    lost = _symbols(x.shape) - _symbols(dims)
    if lost:
        symbol = next(iter(lost))
        raise ShapeError(f"{given} would fold the symbolic dim {symbol} of {format_shape(x.shape)} into another "
                         "dim, whose size would not be known until the graph runs",
                         f"keep {symbol} as a dim of its own, e.g. None first for the batch dim: "
                         f"(None, {_static(x.shape) if x.ndim > 1 else 1})")
    have, known = _static(x.shape), _static(d for d in dims if d != -1)
    if -1 in dims:
        if known == 0 or have % known:
            why = "a 0 dim leaves -1 undetermined" if known == 0 else f"{have} is not a multiple of {known}"
            raise ShapeError(f"cannot reshape {format_shape(x.shape)} to {given}: {why}",
                             f"{format_shape(x.shape)} holds {_elements(x.shape)} elements")
        dims = tuple(have // known if d == -1 else d for d in dims)
    elif have != known:
        raise ShapeError(f"cannot reshape {format_shape(x.shape)} ({_elements(x.shape)} elements) to {given} "
                         f"({_elements(dims)} elements)", "the element counts must be equal; a -1 infers one dim")
    return dims, x.dtype, {"shape": dims}


def _sizes(args: list[str], x: Value, shape: Shape) -> str:
    """Code for `shape` at run time: a symbolic dim as -1 when it is the only one (and no
    dim is 0, which would leave -1 undetermined), else read from x's shape."""
    symbols = [d for d in shape if isinstance(d, str)]
    if len(symbols) == 1 and _static(shape) > 0:
        dims = ["-1" if isinstance(d, str) else str(d) for d in shape]
    else:
        dims = [f"{args[0]}.shape[{x.shape.index(d)}]" if isinstance(d, str) else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def _reshape_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    return f"torch.reshape({args[0]}, {_sizes(args, inputs[0], attrs['shape'])})"


reshape = defop("reshape", _reshape_code, reshape_rule, attrs={"shape": ()}, any_dtype=True,
                vjp=lambda g, out, x, shape: [reshape(g, x.shape)],
                doc="x with the same elements in `shape`: ints, at most one -1 (inferred), and None or the "
                    "symbol for each symbolic dim ((None, 64) or ('N', 64)); may be a view of x.")


# -- flatten -----------------------------------------------------------------------------


def flatten_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    (x,) = inputs
    if x.ndim == 0:
        raise ShapeError("flatten needs at least one dim, got a 0-d value", "reshape it to (1,) instead")
    start, end = _axis(x, attrs["start_dim"], "start_dim"), _axis(x, attrs["end_dim"], "end_dim")
    if start > end:
        raise ShapeError(f"start_dim={attrs['start_dim']} comes after end_dim={attrs['end_dim']} in "
                         f"{format_shape(x.shape)}", "flatten merges the dims from start_dim to end_dim")
    merged = x.shape[start:end + 1]
    symbols = [d for d in merged if isinstance(d, str)]
    if symbols and len(merged) > 1:
        raise ShapeError(f"flattening dims {start} to {end} of {format_shape(x.shape)} would fold the symbolic dim "
                         f"{symbols[0]} into one dim with others",
                         f"flatten from the dim after {symbols[0]}, e.g. start_dim={x.shape.index(symbols[0]) + 1}")
    return (*x.shape[:start], merged[0] if symbols else math.prod(merged), *x.shape[end + 1:]), x.dtype


flatten = defop("flatten", "torch.flatten({0}, {start_dim}, {end_dim})", flatten_rule, any_dtype=True,
                attrs={"start_dim": 1, "end_dim": -1},
                vjp=lambda g, out, x, start_dim, end_dim: [reshape(g, x.shape)],
                doc="x with dims start_dim to end_dim merged into one (by default all but the batch dim); "
                    "may be a view of x.")


# -- permute -----------------------------------------------------------------------------


def permute_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (x,) = inputs
    dims = attrs["dims"]
    ok = isinstance(dims, (tuple, list)) and all(_is_int(d) and -x.ndim <= d < x.ndim for d in dims)
    normal = tuple(int(d) % x.ndim for d in dims) if ok and x.ndim else tuple(dims) if ok else ()
    if not ok or sorted(normal) != list(range(x.ndim)):
        raise ShapeError(f"dims={dims!r} is not an order of the {x.ndim} dims of {format_shape(x.shape)}",
                         f"give each of 0..{x.ndim - 1} once, e.g. dims={tuple(reversed(range(x.ndim)))!r}"
                         if x.ndim else "a 0-d value has no dims to order: dims=()")
    return tuple(x.shape[d] for d in normal), x.dtype, {"dims": normal}


def _inverse(dims: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return tuple(inverse)


permute = defop("permute", "torch.permute({0}, {dims})", permute_rule, attrs={"dims": ()}, any_dtype=True,
                vjp=lambda g, out, x, dims: [permute(g, _inverse(dims))],
                doc="x with its dims in the order `dims` (out.shape[i] = x.shape[dims[i]]); a view of x.")


# -- concat ------------------------------------------------------------------------------


def concat_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    dtype = same_dtype(inputs)
    first = inputs[0]
    if first.ndim == 0:
        raise ShapeError("concat joins values along an axis; a 0-d value has none", "reshape them to (1,) first")
    axis = _axis(first, attrs["axis"])
    for v in inputs[1:]:
        if v.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(v.shape, first.shape)) if i != axis):
            shapes = ", ".join(format_shape(u.shape) for u in inputs)
            raise ShapeError(f"shapes {shapes} differ outside axis {axis}",
                             f"every input needs the same dims except along axis {axis}")
    sizes = [v.shape[axis] for v in inputs]
    symbolic = [d for d in sizes if isinstance(d, str)]
    if symbolic and len(inputs) > 1:
        raise ShapeError(f"axis {axis} is the symbolic dim {symbolic[0]} in {format_shape(first.shape)}; joined, "
                         "its size would not be a dim of its own", "concat along a dim of known size")
    size = sizes[0] if symbolic else sum(sizes)
    return (*first.shape[:axis], size, *first.shape[axis + 1:]), dtype, {"axis": axis}


def _concat_code(out: bool) -> Any:
    def lower(args: list[str], attrs: dict, inputs: list[Value]) -> str:
        tail = f", out={attrs['out']}" if out else ""
        return f"torch.cat([{', '.join(args)}], {attrs['axis']}{tail})"
    return lower


def _concat_vjp(g: Value, out: Value, *xs: Value, axis: int) -> list[Value]:
    starts = [0, *itertools.accumulate(x.shape[axis] for x in xs)]
    return [slice_(g, axis, starts[i], starts[i + 1]) for i in range(len(xs))]


concat = defop("concat", _concat_code(False), concat_rule, arity=VARIADIC, attrs={"axis": 0}, any_dtype=True,
               vjp=_concat_vjp, new_storage=True, out=_concat_code(True),
               doc="The inputs joined along `axis` (their other dims equal; the axis of known size).")


# -- slice and its adjoint ---------------------------------------------------------------


def _span(x_shape: Shape, x_label: str, attrs: Mapping[str, Any], axis: int) -> range:
    """The positions along `axis` that the slice keeps, as a range (start, stop normalised)."""
    size = x_shape[axis]
    if isinstance(size, str):
        raise ShapeError(f"axis {axis} of {format_shape(x_shape)} is the symbolic dim {size}, whose size is "
                         "unknown until the graph runs", "slice along a dim of known size")
    start, stop, step = attrs["start"], attrs["stop"], attrs["step"]
    for name, v in (("start", start), ("stop", stop)):
        if v is not None and not _is_int(v):
            raise ShapeError(f"{name}={v!r} must be a whole number or None")
    if not _is_int(step) or step < 1:
        raise ShapeError(f"step={step!r} must be a whole number >= 1", "torch slices only forwards")
    return range(size)[slice(start, stop, step)]


def slice_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (x,) = inputs
    axis = _axis(x, attrs["axis"])
    kept = _span(x.shape, x.label, attrs, axis)
    return (*x.shape[:axis], len(kept), *x.shape[axis + 1:]), x.dtype, \
        {"axis": axis, "start": kept.start, "stop": kept.stop, "step": int(attrs["step"])}


def _slice_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    step = f":{attrs['step']}" if attrs["step"] != 1 else ""
    return f"{args[0]}[{':, ' * attrs['axis']}{attrs['start']}:{attrs['stop']}{step}]"


def unslice_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (g,) = inputs
    axis, size = _axis(g, attrs["axis"]), attrs["size"]
    if not _is_int(size) or size < 0:
        raise ShapeError(f"size={size!r} must be a whole number >= 0")
    shape = (*g.shape[:axis], int(size), *g.shape[axis + 1:])
    kept = _span(shape, g.label, attrs, axis)
    if g.shape[axis] != len(kept):
        raise ShapeError(f"{format_shape(g.shape)} is not a slice [{kept.start}:{kept.stop}:{kept.step}] of "
                         f"axis {axis} of {format_shape(shape)}, which keeps {len(kept)}")
    return shape, g.dtype, {"axis": axis, "start": kept.start, "stop": kept.stop, "step": int(attrs["step"])}


def _unslice_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    axis = attrs["axis"]
    sizes = f"[*{args[0]}.shape[:{axis}], {attrs['size']}, *{args[0]}.shape[{axis + 1}:]]"
    return f"aten.slice_backward.default({args[0]}, {sizes}, {axis}, {attrs['start']}, {attrs['stop']}, " \
           f"{attrs['step']})"


# Bound to gd.slice in graphdl.ops' __init__ only: inside the package, slice is Python's.
slice_ = defop("slice", _slice_code, slice_rule, attrs={"axis": 0, "start": 0, "stop": None, "step": 1},
               any_dtype=True,
               vjp=lambda g, out, x, axis, start, stop, step: [
                   unslice(g, axis=axis, start=start, stop=stop, step=step, size=x.shape[axis])],
               doc="x[start:stop:step] along `axis` (of known size), Python's rules for start and stop; "
                   "a view of x.")

unslice = defop("unslice", _unslice_code, unslice_rule,
                attrs={"axis": 0, "start": 0, "stop": None, "step": 1, "size": 0}, new_storage=True,
                vjp=lambda gc, out, g, axis, start, stop, step, size: [slice_(gc, axis, start, stop, step)],
                doc="g put back into zeros of `size` along `axis`, where slice[start:stop:step] took it: "
                    "the adjoint of slice.")


def split(x: Value, sizes: int | Sequence[int], axis: int = 0) -> list[Value]:
    """x cut along `axis` (of known size) into consecutive slices, as torch.split: of the
    lengths in `sizes` (a list that adds up to the axis's size), or of `sizes` elements
    each (an int; the last slice may be shorter)."""
    if not isinstance(x, Value):
        raise GraphError(f"split: x must be a graph value, got {type(x).__name__}")
    try:
        axis = _axis(x, axis)
        size = x.shape[axis]
        if isinstance(size, str):
            raise ShapeError(f"axis {axis} is the symbolic dim {size}, whose size is unknown until the graph runs",
                             "split along a dim of known size")
        if _is_int(sizes) and sizes >= 1:
            sizes = [min(sizes, size - s) for s in range(0, size, sizes)]
        if not isinstance(sizes, (list, tuple)) or not all(_is_int(s) and s >= 0 for s in sizes) \
                or sum(sizes) != size:
            raise ShapeError(f"sizes={sizes!r} must be a whole number >= 1, or lengths that add up to {size}, the "
                             f"size of axis {axis} of {format_shape(x.shape)}")
    except ShapeError as e:
        raise x.graph.node_error("split", [x], e.message, e.hint) from None
    starts = [0, *itertools.accumulate(sizes)]
    return [slice_(x, axis, starts[i], starts[i + 1]) for i in range(len(sizes))]
