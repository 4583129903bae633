"""The op registry: each op defined once, in one place.

An op is a name, a shape rule (input shapes and attrs -> output shape and dtype), a
lowering (the torch expression the compiler emits for it) and a VJP rule. A VJP rule
receives the cotangent `g`, the op's output `out` and the op's inputs, and returns one
cotangent per input (`None` where an input gets no gradient). It builds those with the
same functional ops users call, so the backward pass is IR like any other graph, and
`grad` of a gradient graph works.

Broadcasting follows torch, with one static rule for symbolic dims: a symbol such as
"N" only matches itself or 1, since its size is unknown until the graph runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .checks import DTYPES, Dim, GraphError, Shape, ShapeError, dtype_name, format_shape, read_float
from .ir import Value, caller_location

Lowering = Callable[[list[str], dict[str, Any], list[Value]], str]
# A shape rule reads the inputs and the attrs (a read-only view, defaults filled in) and
# returns the output's shape and dtype, and, if it normalises any attrs (axis=1 becomes
# (1,), a const's value a float), a dict of those: it never edits the attrs it is given.
Rule = Callable[[list[Value], Mapping[str, Any]],
                tuple[Shape, torch.dtype] | tuple[Shape, torch.dtype, dict[str, Any]]]


class _Kernels:
    """`torch.ops.aten` for generated code, each overload resolved to its C++ entry.

    `aten.tanh_backward.grad_input(...)` reads the same in the generated source, but
    skips the Python frame of `OpOverload.__call__`: 1.7 µs a call instead of 2.5 µs
    (tanh_backward at batch 5, one CPU thread). Lookups are cached on first use.
    """

    def __init__(self, packet: Any = None) -> None:
        self._packet = packet

    def __getattr__(self, name: str) -> Any:
        if self._packet is None:  # an op: its overloads, resolved on demand
            value: Any = _Kernels(getattr(torch.ops.aten, name))
        else:
            overload = getattr(self._packet, name)
            value = getattr(overload, "_op", overload)
        setattr(self, name, value)
        return value


# The globals lowered code runs with (the compiler's and constant folding's). aten's
# kernels are called through their C++ entries (`_Kernels`), not the neural-network
# module's own bindings (its mse_loss measured ~1 µs less a call, but graphdl computes
# nothing through that module).
CODE_GLOBALS: dict[str, Any] = {"torch": torch, "math": math, "aten": _Kernels()}


@dataclass(frozen=True, eq=False)
class OpDef:
    """An op: its name, shape rule, lowering to torch, VJP rule and attribute defaults."""

    name: str
    arity: int
    rule: Rule
    kernel: Lowering  # the torch expression, given the operands' expressions (see `lower`)
    vjp: Callable[..., list[Value | None]] | None
    attrs: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    # Memory planning (passes/memory.py). fresh: the result is new storage, never a view
    # of an input. inplace: input index -> code that writes the result into that input.
    # out: code (or a lowering) that writes the result into a preallocated buffer `{out}`
    # (fit's arena). transposed: inputs the kernel reads transposed; the code names
    # them by an expression for that transpose (see `operands`).
    fresh: bool = False
    inplace: dict[int, str] = field(default_factory=dict)
    # Collectives (graphdl.distributed). effect: the op talks to the other processes, which
    # must issue the same collectives in the same order, so passes never drop, merge, fold
    # or reorder it and compile never runs it ahead of time. read_by: the one op that may
    # read its result (an operation in flight is no tensor to compute with).
    effect: bool = False
    read_by: str = ""
    out: str | Lowering | None = None
    transposed: tuple[int, ...] = ()

    def infer(self, inputs: Sequence[Value], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
        """Output shape and dtype, and the attrs completed with defaults and normalised."""
        if self.arity == VARIADIC and not inputs:
            raise ShapeError("takes one or more inputs, got none")
        if self.arity != VARIADIC and len(inputs) != self.arity:
            raise ShapeError(f"takes {self.arity} input(s), got {len(inputs)}")
        for v in inputs:
            made_by = v.node.op if v.node is not None else None
            if made_by is not None and made_by.read_by and made_by.read_by != self.name:
                raise ShapeError(f"{v.label} is the result of {made_by.name}, which only {made_by.read_by} may read",
                                 f"apply {made_by.read_by} to it first")
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            takes = ", ".join(self.attrs) or "no attributes"
            raise ShapeError(f"unknown attribute(s) {', '.join(unknown)}", f"{self.name} takes {takes}")
        full = {**self.attrs, **attrs}
        shape, dtype, *normalised = self.rule(list(inputs), MappingProxyType(full))
        return shape, dtype, {**full, **normalised[0]} if normalised else full

    def operands(self, names: list[str], transposes: dict[int, str] | None = None) -> list[str]:
        """The expressions the code takes for inputs named `names`: an input the kernel
        reads transposed becomes a prepared transpose from `transposes` (by input index),
        or `name.mT`, a view made at each call (~0.7 µs on CPU)."""
        transposes = transposes or {}
        return [transposes.get(i, f"{n}.mT") if i in self.transposed else n for i, n in enumerate(names)]

    def lower(self, names: list[str], attrs: dict[str, Any], inputs: Sequence[Value]) -> str:
        """The torch expression for a node of this op on inputs named `names`."""
        return self.code(names, attrs, inputs)

    def code(self, names: list[str], attrs: dict[str, Any], inputs: Sequence[Value], out: str | None = None,
             transposes: dict[int, str] | None = None) -> str:
        """`lower`, with the choices of fit's arena: with `out`, the expression that writes
        into the buffer named `out` (the op must have an `out` code); `transposes` names
        prepared transposes of inputs the kernel reads transposed."""
        args = self.operands(names, transposes)
        if out is None:
            return self.kernel(args, attrs, list(inputs))
        assert self.out is not None, f"{self.name} has no out= code"
        if isinstance(self.out, str):
            return self.out.format(*args, out=out)
        return self.out(args, {**attrs, "out": out}, list(inputs))


OPS: dict[str, OpDef] = {}
VARIADIC = -1  # the arity of an op that takes one or more inputs


def defop(name: str, code: str | Lowering, rule: Rule, vjp: Callable | None, arity: int = 1,
          attrs: dict[str, Any] | None = None, doc: str = "", fresh: bool = False,
          inplace: dict[int, str] | None = None, effect: bool = False, read_by: str = "",
          out: bool | str | Lowering | None = None, transposed: tuple[int, ...] = ()) -> Callable[..., Value]:
    """Register an op and return its builder, `builder(*inputs, **attrs) -> Value`.

    `code` is a torch expression with `{0}`, `{1}` for the inputs and `{attr}` for the
    attrs' reprs, or a function `(args, attrs, inputs) -> str` for ops whose code depends
    on shapes. `fresh` and `inplace` tell the memory planner whether the result owns
    new storage and how to compute it into a dying input's buffer instead; `effect` and
    `read_by` mark collectives (see `OpDef`); `out` how to compute it into a preallocated
    buffer `{out}` (True: the code's own call with `out=`); `transposed` which inputs the
    code reads transposed (the code names them by an expression for the transpose).
    """
    if isinstance(code, str):
        template = code

        def lower(args: list[str], attrs: dict[str, Any], inputs: list[Value]) -> str:
            return template.format(*args, **{k: repr(v) for k, v in attrs.items()})
    else:
        lower = code
    if out is True:  # the code's call with the buffer as its out= argument
        assert isinstance(code, str) and code.endswith(")"), f"{name}: out=True needs code that ends in a call"
        out = code[:-1] + ", out={out})"
    op = OpDef(name, arity, rule, lower, vjp, dict(attrs or {}), doc, fresh, dict(inplace or {}), effect, read_by,
               out, transposed)
    OPS[name] = op

    def builder(*inputs: Value | float, **attrs: Any) -> Value:
        return apply(op, *inputs, **attrs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    return builder


def apply(op: OpDef, *inputs: Value | float, **attrs: Any) -> Value:
    """Add a node applying `op`; Python numbers become scalar constants of the other
    inputs' dtype."""
    values = [v for v in inputs if isinstance(v, Value)]
    if not values:
        if op.arity == 0:
            raise GraphError(f"{op.name}: build it with Graph.const(...)")
        raise GraphError(
            f"{op.name}: at least one input must be a graph value (from Graph.input, Graph.param "
            f"or another op), got {', '.join(type(v).__name__ for v in inputs) or 'no inputs'}"
            f"\n  created at {caller_location()}"
        )
    graph = values[0].graph
    for i, v in enumerate(inputs):
        if not isinstance(v, (Value, numbers.Real)) or isinstance(v, bool):
            hint = "wrap tensors with Graph.param or Graph.input" if isinstance(v, torch.Tensor) else ""
            raise graph.node_error(op.name, inputs, f"input {i} is a {type(v).__name__}; inputs must be graph "
                                   "values or Python numbers", hint)
    consts = [graph.const(v, values[0].dtype) for v in inputs if not isinstance(v, Value)]
    it = iter(consts)
    args = [v if isinstance(v, Value) else next(it) for v in inputs]
    try:
        return graph.add_node(op, args, attrs)
    except GraphError:
        for c in reversed(consts):  # a failed call leaves the graph as it was
            graph.remove_node(c.node)
        raise


# -- shape rules ----------------------------------------------------------------------


def _same_dtype(inputs: list[Value]) -> torch.dtype:
    dtypes = {v.dtype for v in inputs}
    if len(dtypes) > 1:
        names = ", ".join(f"{v.label}: {dtype_name(v.dtype)}" for v in inputs)
        raise ShapeError(f"dtypes differ ({names})", "make every input of the op the same dtype")
    return inputs[0].dtype


def broadcast_shapes(a: Shape, b: Shape) -> Shape | None:
    """torch's broadcasting, statically: None if the shapes do not broadcast."""
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def unary(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    return inputs[0].shape, inputs[0].dtype


def elementwise(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    dtype = _same_dtype(inputs)
    a, b = inputs
    shape = broadcast_shapes(a.shape, b.shape)
    if shape is None:
        hint = "shapes broadcast when, from the right, each pair of dims is equal or one of them is 1"
        if any(isinstance(d, str) for d in (*a.shape, *b.shape)):
            hint += "; a symbolic dim such as N only matches itself or 1"
        raise ShapeError(f"shapes {format_shape(a.shape)} and {format_shape(b.shape)} do not broadcast", hint)
    return shape, dtype


def loss_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    a, b = inputs
    _same_dtype(inputs)
    both = broadcast_shapes(a.shape, b.shape)
    if both != a.shape:  # a target may broadcast to the prediction, never enlarge it
        grown = f" (they broadcast to {format_shape(both)}, averaging every pair)" if both is not None else ""
        raise ShapeError(
            f"prediction {format_shape(a.shape)} and target {format_shape(b.shape)} differ{grown}",
            f"give the target the prediction's shape, {format_shape(a.shape)}"
            + (": declare it with shape (None, 1), or reshape it with y.reshape(-1, 1)"
               if a.ndim == 2 and a.shape[1] == 1 else ""),
        )
    return (), a.dtype


def class_axis_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    """softmax and log_softmax: the shape of x, normalised over one axis (the last by default)."""
    (x,) = inputs
    axis = attrs["axis"]
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"axis={axis!r} is not an axis of {format_shape(x.shape)}",
                         f"use an int in [{-x.ndim}, {x.ndim - 1}]; -1, the default, is the last axis"
                         if x.ndim else "softmax needs at least one axis to normalise over")
    return x.shape, x.dtype


def cross_entropy_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    logits, target = inputs
    _same_dtype(inputs)
    if logits.ndim != 2:
        raise ShapeError(f"logits {format_shape(logits.shape)} must be 2-d, [examples, classes]")
    if isinstance(logits.shape[1], int) and logits.shape[1] < 2:  # softmax over one class is 1: the loss is 0
        raise ShapeError(f"logits {format_shape(logits.shape)} have {logits.shape[1]} class; cross-entropy needs "
                         "at least 2", "for a yes/no target with one output, use bce_with_logits (gd.BCEWithLogits())")
    if target.shape != logits.shape:
        raise ShapeError(
            f"logits {format_shape(logits.shape)} and target {format_shape(target.shape)} differ",
            f"give one row of class probabilities per example, {format_shape(logits.shape)}: one-hot rows "
            "for class labels (fit and evaluate turn integer labels [N] into them)",
        )
    return (), logits.dtype


def matmul_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    a, b = inputs
    dtype = _same_dtype(inputs)
    if a.ndim != 2 or b.ndim != 2:
        raise ShapeError(
            f"{format_shape(a.shape)} @ {format_shape(b.shape)}: matmul takes two matrices (2-d)",
            "reshape the inputs to [rows, cols]",
        )
    if a.shape[1] != b.shape[0]:
        hint = ""
        if a.shape[1] == b.shape[1]:
            hint = f"did you mean to transpose {b.label}?"
        elif a.shape[0] == b.shape[0]:
            hint = f"did you mean to transpose {a.label}?"
        raise ShapeError(
            f"{format_shape(a.shape)} @ {format_shape(b.shape)}: inner dims differ ({a.shape[1]} vs {b.shape[0]})",
            hint,
        )
    return (a.shape[0], b.shape[1]), dtype


def transpose_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    (x,) = inputs
    if x.ndim < 2:
        raise ShapeError(f"transpose needs at least 2 dims, got {format_shape(x.shape)}")
    return (*x.shape[:-2], x.shape[-1], x.shape[-2]), x.dtype


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
    keepdims = _flag("keepdims", attrs["keepdims"])
    if keepdims:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    # None prints as "all axes"
    return shape, x.dtype, {"axis": None if len(axes) == x.ndim else axes, "keepdims": keepdims}


def broadcast_like_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    g, ref = inputs
    dtype = _same_dtype(inputs)
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
    return ref.shape, dtype, {"axis": axes, "mean": _flag("mean", attrs["mean"])}


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


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, int) or value not in (0, 1):  # bool is an int; 0 and 1 are admitted too
        raise ShapeError(f"{name}={value!r} must be True or False")
    return bool(value)


def const_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    if not isinstance(attrs["dtype"], str) or attrs["dtype"] not in DTYPES:
        raise ShapeError(f"unknown dtype {attrs['dtype']!r}", f"use one of {', '.join(DTYPES)}")
    try:
        value = read_float(attrs["value"], "value", DTYPES[attrs["dtype"]])
    except GraphError as e:
        raise ShapeError(str(e)) from None
    return (), DTYPES[attrs["dtype"]], {"value": value}


# -- lowerings that depend on shapes ------------------------------------------------


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


def _count(ref: str, shape: Shape, axes: Sequence[int]) -> str:
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
        src = f"torch.div({src}, {_count(args[1], ref.shape, axes)})"
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


def _const_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    value = attrs["value"]
    literal = repr(value) if math.isfinite(value) else f"float('{value}')"  # repr(inf) is not Python source
    return f"torch.tensor({literal}, dtype={DTYPES[attrs['dtype']]})"


# -- VJP helpers ----------------------------------------------------------------------


def unbroadcast(g: Value, x: Value) -> Value:
    """Sum a cotangent back down to the shape of the input it flows into."""
    return g if g.shape == x.shape else sum_to(g, shape=x.shape)


def _axes(x: Value, axis: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(range(x.ndim)) if axis is None else axis


# -- the ops --------------------------------------------------------------------------

const = defop("const", _const_code, const_rule, lambda g, out: [], arity=0,
              attrs={"value": 0.0, "dtype": "f32"}, doc="A scalar constant (build with Graph.const).")

zeros_like = defop("zeros_like", "torch.zeros_like({0})", unary, lambda g, out, x: [None],
                   fresh=True,
                   doc="Zeros of x's shape and dtype.")

add = defop("add", "torch.add({0}, {1})", elementwise, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g, a), unbroadcast(g, b)],
            fresh=True, inplace={0: "{0}.add_({1})", 1: "{1}.add_({0})"},
            doc="a + b, broadcasting as torch does.")

sub = defop("sub", "torch.sub({0}, {1})", elementwise, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g, a), unbroadcast(neg(g), b)],
            fresh=True, inplace={0: "{0}.sub_({1})"},
            doc="a - b, broadcasting as torch does.")

mul = defop("mul", "torch.mul({0}, {1})", elementwise, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g * b, a), unbroadcast(g * a, b)],
            fresh=True, inplace={0: "{0}.mul_({1})", 1: "{1}.mul_({0})"},
            doc="a * b elementwise, broadcasting as torch does.")

div = defop("div", "torch.div({0}, {1})", elementwise, arity=2, out=True,
            vjp=lambda g, out, a, b: [unbroadcast(g / b, a), unbroadcast(neg(g * out) / b, b)],
            fresh=True, inplace={0: "{0}.div_({1})"},
            doc="a / b elementwise, broadcasting as torch does.")

neg = defop("neg", "torch.neg({0})", unary, lambda g, out, x: [neg(g)], fresh=True, inplace={0: "{0}.neg_()"}, out=True,
            doc="-x.")

exp = defop("exp", "torch.exp({0})", unary, lambda g, out, x: [g * out], fresh=True, inplace={0: "{0}.exp_()"},
            out=True,
            doc="e**x elementwise.")

log = defop("log", "torch.log({0})", unary, lambda g, out, x: [g / x], fresh=True, inplace={0: "{0}.log_()"}, out=True,
            doc="Natural log, elementwise.")

abs = defop("abs", "torch.abs({0})", unary, lambda g, out, x: [g * sign(x)], fresh=True, inplace={0: "{0}.abs_()"},
            out=True,
            doc="|x| elementwise.")

sign = defop("sign", "torch.sign({0})", unary, lambda g, out, x: [None],
             fresh=True,
             doc="-1, 0 or 1 elementwise; its gradient is zero almost everywhere, so none flows.")

greater = defop("greater", "torch.gt({0}, {1}).to({0}.dtype)", elementwise, arity=2,
                vjp=lambda g, out, a, b: [None, None],
                fresh=True,
                doc="1.0 where a > b else 0.0 (a mask in a's dtype); no gradient flows through it.")

relu = defop("relu", "torch.relu({0})", unary, lambda g, out, x: [g * greater(out, 0.0)],
             fresh=True, inplace={0: "{0}.relu_()"},
             doc="max(x, 0) elementwise.")

tanh = defop("tanh", "torch.tanh({0})", unary, lambda g, out, x: [g * (1.0 - out * out)],
             fresh=True, inplace={0: "{0}.tanh_()"}, out=True,
             doc="Hyperbolic tangent, elementwise.")

sigmoid = defop("sigmoid", "torch.sigmoid({0})", unary, lambda g, out, x: [g * (out * (1.0 - out))],
                fresh=True, inplace={0: "{0}.sigmoid_()"}, out=True,
                doc="1 / (1 + e**-x) elementwise.")

_softmax = defop("softmax", "torch.softmax({0}, {axis})", class_axis_rule, attrs={"axis": -1}, fresh=True,
                  vjp=lambda g, out, x, axis: [out * (g - sum(g * out, axis=axis, keepdims=True))],
                  doc="exp(x) / sum(exp(x)) over `axis` (the last by default): rows of probabilities.")

_log_softmax = defop("log_softmax", "torch.log_softmax({0}, {axis})", class_axis_rule, attrs={"axis": -1},
                     fresh=True,
                     vjp=lambda g, out, x, axis: [g - exp(out) * sum(g, axis=axis, keepdims=True)],
                     doc="x - log(sum(exp(x))) over `axis` (the last by default), computed stably.")

matmul = defop("matmul", "torch.mm({0}, {1})", matmul_rule, arity=2, out=True,
               vjp=lambda g, out, a, b: [matmul(g, transpose(b)), matmul(transpose(a), g)],
               fresh=True,
               doc="Matrix product of two 2-d values: [m,k] @ [k,n] -> [m,n].")

transpose = defop("transpose", "torch.transpose({0}, -2, -1)", transpose_rule,
                  lambda g, out, x: [transpose(g)], doc="Swap the last two dims.")

_sum = defop("sum", _reduce_code("sum"), reduce_rule, attrs={"axis": None, "keepdims": False},
             out=_reduce_code("sum", out=True),
             fresh=True,
             vjp=lambda g, out, x, axis, keepdims: [broadcast_like(g, x, axis=axis)])

_mean = defop("mean", _reduce_code("mean"), reduce_rule, attrs={"axis": None, "keepdims": False},
              fresh=True,
              vjp=lambda g, out, x, axis, keepdims: [broadcast_like(g, x, axis=_axes(x, axis), mean=True)])


def _broadcast_like_vjp(g: Value, out: Value, x: Value, ref: Value, axis: tuple | None, mean: bool) -> list:
    if axis is None:
        return [unbroadcast(g, x), None]
    reduce = _mean if mean else _sum
    # x may also have been broadcast along other axes (x [1] against ref [N,4], axis=0).
    return [unbroadcast(reduce(g, axis=axis, keepdims=x.ndim == ref.ndim), x), None]


_broadcast_like = defop(
    "broadcast_like", _broadcast_like_code, broadcast_like_rule, _broadcast_like_vjp, arity=2,
    attrs={"axis": None, "mean": False},
    doc="g expanded to ref's shape. With axis, g is the reduction of ref over those axes "
        "(they are re-inserted first); with mean, g is also divided by their size. The "
        "adjoint of sum and mean.",
)

_sum_to = defop("sum_to", _sum_to_code, sum_to_rule, attrs={"shape": ()},
                vjp=lambda g, out, x, shape: [broadcast_like(g, x)],
                doc="Sum x down to `shape` (the adjoint of broadcasting).")


def _loss_vjp(local: Callable[[Value], Value | None]) -> Callable[..., list]:
    """VJP of a mean-over-elements loss of d = a - b, given d's elementwise derivative."""
    def vjp(g: Value, out: Value, a: Value, b: Value) -> list[Value | None]:
        d = a - b
        gd = broadcast_like(g, d, axis=tuple(range(d.ndim)), mean=True)
        factor = local(d)
        if factor is not None:
            gd = gd * factor
        return [unbroadcast(gd, a), unbroadcast(neg(gd), b)]
    return vjp


mse = defop("mse", "aten.mse_loss.default({0}, {1}, 1)", loss_rule, arity=2,  # 1: reduction="mean"
            vjp=_loss_vjp(lambda d: d * 2.0), fresh=True,
                                              doc="mean((a - b)**2) over every element.")

mae = defop("mae", "torch.mean(torch.abs(torch.sub({0}, {1})))", loss_rule, arity=2,
            vjp=_loss_vjp(sign), fresh=True,
                                 doc="mean(|a - b|) over every element.")

mbe = defop("mbe", "torch.mean(torch.sub({0}, {1}))", loss_rule, arity=2,
            vjp=_loss_vjp(lambda d: None), fresh=True,
                                           doc="mean(a - b) over every element (mean bias error).")


def _bce_with_logits_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    x, y = inputs
    target = args[1] if y.shape == x.shape else f"{args[1]}.expand_as({args[0]})"  # the kernel does not broadcast
    return f"aten.binary_cross_entropy_with_logits.default({args[0]}, {target}, None, None, 1)"


# The two classification losses' VJPs stay primitives, with no fused backward op: fusing
# either chain into one line of torch calls measured 1-2.5 us faster at batch 20 (cross-
# entropy, 3 classes: 18.5 -> 17.2 us median, 14.0 -> 11.6 us best; BCE: 11.0 -> 9.8 us;
# one thread, the variants alternated, 15 x 2000 calls each, on the 2-core machine), about
# 1 % of a ~150 us training step: not worth an op, a fusion pattern and their tests.


def _bce_with_logits_vjp(g: Value, out: Value, x: Value, y: Value) -> list[Value | None]:
    # loss = mean(softplus(x) - x*y): d/dx = sigmoid(x) - y, d/dy = -x, each over the element count.
    spread = broadcast_like(g, x, axis=_all_axes(x), mean=True)
    return [spread * (sigmoid(x) - y), unbroadcast(neg(spread * x), y)]


bce_with_logits = defop(
    "bce_with_logits", _bce_with_logits_code, loss_rule, _bce_with_logits_vjp, arity=2, fresh=True,
    doc="mean(log(1 + e**x) - x*y) over every element: binary cross-entropy of the logits x against "
        "targets y in [0, 1], computed stably for logits of any size (torch's BCEWithLogitsLoss).",
)


def _cross_entropy_vjp(g: Value, out: Value, x: Value, y: Value) -> list[Value | None]:
    # loss = -mean over rows of sum(y * log_softmax(x)): d/dx = softmax(x) * sum(y) - y (softmax - y for
    # rows that sum to 1), d/dy = -log_softmax(x), each over the number of rows. Each row's
    # share g/N is spread over [N, 1], the shape of the row sums of y, and broadcasts from there.
    row_sums = sum(y, axis=-1, keepdims=True)
    per_row = broadcast_like(g, row_sums, axis=_all_axes(row_sums), mean=True)
    return [per_row * (_softmax(x) * row_sums - y), neg(per_row * _log_softmax(x))]


# Per-row losses, then their mean: with reduction=mean torch sums the rows in the model's
# dtype before dividing, which overflows float16 past a sum of 65,504 (100,000 rows at
# loss 1.25 read inf); torch.mean accumulates in float32.
cross_entropy = defop(
    "cross_entropy", "torch.mean(aten.cross_entropy_loss.default({0}, {1}, None, 0, -100, 0.0))", cross_entropy_rule,
    _cross_entropy_vjp, arity=2, fresh=True,
    doc="-mean over rows of sum(y * log_softmax(x)): cross-entropy of logits x [N, C] against one-hot or "
        "probability rows y [N, C] (torch's CrossEntropyLoss with probability targets).",
)


# -- builders whose attrs deserve a real signature -------------------------------------


def sum(x: Value, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Value:
    """Sum over `axis` (all axes by default)."""
    return _sum(x, axis=axis, keepdims=keepdims)


def mean(x: Value, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Value:
    """Mean over `axis` (all axes by default)."""
    return _mean(x, axis=axis, keepdims=keepdims)


def softmax(x: Value, axis: int = -1) -> Value:
    """exp(x) / sum(exp(x)) over `axis` (the last by default)."""
    return _softmax(x, axis=axis)


def log_softmax(x: Value, axis: int = -1) -> Value:
    """log(softmax(x)) over `axis` (the last by default), computed stably."""
    return _log_softmax(x, axis=axis)


def broadcast_like(g: Value, ref: Value, axis: int | Sequence[int] | None = None, mean: bool = False) -> Value:
    """Expand g to ref's shape (see the op's doc)."""
    return _broadcast_like(g, ref, axis=axis, mean=mean)


def sum_to(x: Value, shape: Sequence[Dim]) -> Value:
    """Sum x down to `shape`, undoing broadcasting."""
    return _sum_to(x, shape=shape)


# -- Value's operators ------------------------------------------------------------------
# Installed on Value from here, where the ops are (as torch.fx's proxy.py installs its
# magic methods), so ir.py needs no import of ops. A builder is a plain function, so it
# binds as a method: `a + b` is add(a, b).


def _reflected(op: Callable[..., Value]) -> Callable[[Value, Any], Value]:
    def method(self: Value, other: Any) -> Value:
        return op(other, self)
    method.__name__ = f"r{op.__name__}"
    return method


VALUE_OPERATORS: dict[str, Any] = {
    "__add__": add, "__radd__": _reflected(add),
    "__sub__": sub, "__rsub__": _reflected(sub),
    "__mul__": mul, "__rmul__": _reflected(mul),
    "__truediv__": div, "__rtruediv__": _reflected(div),
    "__matmul__": matmul,
    "__neg__": neg,
    "T": property(transpose, doc="The value with its last two dims swapped."),
}
for _name, _method in VALUE_OPERATORS.items():
    setattr(Value, _name, _method)



# -- fused ops --------------------------------------------------------------------------
#
# Nobody builds these by hand: graphdl.passes.fuse rewrites primitive patterns into them
# so that one torch call replaces several. Each is an ordinary registered op (it prints,
# parses and draws) whose VJP is written with the primitives, so grad of an optimised
# graph still works.


def addmm_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    bias, a, b = inputs
    shape, dtype = matmul_rule([a, b], attrs)
    if broadcast_shapes(bias.shape, shape) != shape:
        raise ShapeError(f"bias {format_shape(bias.shape)} does not broadcast to the product's "
                         f"{format_shape(shape)}")
    return shape, _same_dtype(inputs)


def _transposed_rule(ta: bool, tb: bool) -> Callable[[list[Value], dict], tuple[Shape, torch.dtype]]:
    """matmul's rule for a product whose first (ta) or second (tb) input is read transposed."""
    def rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
        a, b = inputs
        for v in inputs:
            if v.ndim != 2:
                raise ShapeError(f"{format_shape(v.shape)}: takes two matrices (2-d)")
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        k2, n = (b.shape[1], b.shape[0]) if tb else b.shape
        if k != k2:
            product = f"{format_shape(a.shape)}{'^T' if ta else ''} @ {format_shape(b.shape)}{'^T' if tb else ''}"
            raise ShapeError(f"inner dims differ ({k} vs {k2}) for {product}")
        return (m, n), _same_dtype(inputs)
    return rule


def same_shape(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    """Elementwise without broadcasting (what torch's *_backward kernels take)."""
    dtype = _same_dtype(inputs)
    if any(v.shape != inputs[0].shape for v in inputs):
        raise ShapeError("shapes differ (" + ", ".join(format_shape(v.shape) for v in inputs) + ")",
                         "the inputs of a fused backward op must have one shape")
    return inputs[0].shape, dtype


def mse_backward_rule(inputs: list[Value], attrs: dict) -> tuple[Shape, torch.dtype]:
    g, a, b = inputs
    if g.shape != ():
        raise ShapeError(f"the cotangent {format_shape(g.shape)} must be a scalar")
    return same_shape([a, b], attrs)[0], _same_dtype(inputs)


def _all_axes(x: Value) -> tuple[int, ...]:
    return tuple(range(x.ndim))


addmm = defop("addmm", "torch.addmm({0}, {1}, {2})", addmm_rule, arity=3, out=True,
              vjp=lambda g, out, bias, a, b: [unbroadcast(g, bias), matmul(g, transpose(b)), matmul(transpose(a), g)],
              fresh=True,
              doc="bias + a @ b in one call (fused from add(matmul(a, b), bias)).")

matmul_tn = defop("matmul_tn", "torch.mm({0}, {1})", _transposed_rule(True, False), arity=2, transposed=(0,),
                  out=True,
                  vjp=lambda g, out, a, b: [matmul(b, transpose(g)), matmul(a, g)],
                  fresh=True,
                  doc="transpose(a) @ b without a transpose node (fused from matmul(transpose(a), b)).")

matmul_nt = defop("matmul_nt", "torch.mm({0}, {1})", _transposed_rule(False, True), arity=2, transposed=(1,),
                  out=True,
                  vjp=lambda g, out, a, b: [matmul(g, b), matmul(transpose(g), a)],
                  fresh=True,
                  doc="a @ transpose(b) without a transpose node (fused from matmul(a, transpose(b))).")

relu_backward = defop("relu_backward", "aten.threshold_backward.default({0}, {1}, 0.0)", same_shape, arity=2,
                      vjp=lambda gc, out, g, y: [gc * greater(y, 0.0), None],
                      fresh=True, inplace={0: "aten.threshold_backward.grad_input({0}, {1}, 0.0, grad_input={0})"},
                      out="aten.threshold_backward.grad_input({0}, {1}, 0.0, grad_input={out})",
                      doc="g where y > 0 else 0: relu's VJP given its output y (fused from mul(g, greater(y, 0))).")

tanh_backward = defop("tanh_backward", "aten.tanh_backward.default({0}, {1})", same_shape, arity=2,
                      vjp=lambda gc, out, g, y: [gc * (1.0 - y * y), gc * g * y * -2.0],
                      fresh=True, inplace={0: "aten.tanh_backward.grad_input({0}, {1}, grad_input={0})"},
                      out="aten.tanh_backward.grad_input({0}, {1}, grad_input={out})",
                      doc="g * (1 - y*y): tanh's VJP given its output y (fused from mul(g, sub(1, mul(y, y)))).")

sigmoid_backward = defop("sigmoid_backward", "aten.sigmoid_backward.default({0}, {1})", same_shape, arity=2,
                         vjp=lambda gc, out, g, y: [gc * (y * (1.0 - y)), gc * g * (1.0 - y * 2.0)],
                         fresh=True, inplace={0: "aten.sigmoid_backward.grad_input({0}, {1}, grad_input={0})"},
                         out="aten.sigmoid_backward.grad_input({0}, {1}, grad_input={out})",
                         doc="g * y * (1 - y): sigmoid's VJP given its output y "
                             "(fused from mul(g, mul(y, sub(1, y)))).")

mse_backward = defop(
    "mse_backward", "aten.mse_loss_backward.default({0}, {1}, {2}, 1)", mse_backward_rule, arity=3,
    out="aten.mse_loss_backward.grad_input({0}, {1}, {2}, 1, grad_input={out})",
    vjp=lambda gc, out, g, a, b: [
        mean(gc * (a - b)) * 2.0,
        broadcast_like(g, a, axis=_all_axes(a), mean=True) * gc * 2.0,
        broadcast_like(g, b, axis=_all_axes(b), mean=True) * gc * -2.0,
    ],
    fresh=True,
    doc="g * 2 * (a - b) / numel: mse's VJP for a in one call (fused from the chain mse's VJP builds).",
)


# -- collectives --------------------------------------------------------------------------
#
# Data-parallel training sums every gradient over the processes (ranks) with an
# all-reduce. graphdl.passes.allreduce inserts these ops into a gradient graph, packing
# gradients into flat buckets; their code calls torch.distributed through
# graphdl.distributed. Every rank runs the same graph, so all issue the same collectives
# in the same order. They have no VJP: a graph is differentiated before it is reduced.


def _known_size(v: Value) -> int:
    if not all(isinstance(d, int) for d in v.shape):
        raise ShapeError(f"{v.label} has the shape {format_shape(v.shape)}; a bucket packs values of fixed size",
                         "all-reduce the gradients of params, whose shapes are fixed")
    return math.prod(v.shape)


def allreduce_start_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    dtype = _same_dtype(inputs)
    total = 0
    for v in inputs:
        total += _known_size(v)
    return (total,), dtype


def allreduce_wait_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    (pending,) = inputs
    if pending.node is None or pending.node.op.name != "allreduce_start":
        raise ShapeError(f"{pending.label} is not the result of an allreduce_start",
                         "wait on what allreduce_start returns")
    return pending.shape, pending.dtype


def unpack_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (flat,) = inputs
    offset, shape = attrs["offset"], attrs["shape"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ShapeError(f"offset={offset!r} must be a whole number >= 0")
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ShapeError(f"shape {shape!r} must be a tuple of whole numbers >= 0")
    shape = tuple(shape)
    size = _known_size(flat)
    if flat.ndim != 1 or offset + math.prod(shape) > size:
        raise ShapeError(f"elements {offset}..{offset + math.prod(shape)} ({format_shape(shape)}) do not lie "
                         f"inside the flat buffer {format_shape(flat.shape)}",
                         "unpack a 1-d buffer within its length")
    return shape, flat.dtype, {"shape": shape}


def _unpack_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    offset, shape = attrs["offset"], attrs["shape"]
    return f"{args[0]}[{offset}:{offset + math.prod(shape)}].view({shape!r})"


allreduce_start = defop(
    "allreduce_start", lambda args, attrs, inputs: f"collective.allreduce_start({', '.join(args)})",
    allreduce_start_rule, None, arity=VARIADIC, effect=True, read_by="allreduce_wait",
    doc="Pack the inputs into one flat buffer and start summing it over every rank, without "
        "waiting; the result is the operation in flight, which only allreduce_wait reads.",
)

allreduce_wait = defop(
    "allreduce_wait", "{0}.wait()", allreduce_wait_rule, None, effect=True, read_by="unpack",
    doc="Wait for an allreduce_start to finish: the flat buffer summed over every rank.",
)

# A view of the buffer, but a disjoint slice of one that only unpacks read (read_by), so
# writing into it touches nothing else: `fresh` lets compile return it without a copy.
unpack = defop("unpack", _unpack_code, unpack_rule, None, attrs={"offset": 0, "shape": ()}, fresh=True,
               doc="The elements offset.. of a flat buffer, viewed as `shape` (a gradient out of a bucket).")

from . import distributed as _distributed  # noqa: E402 - the runtime the collectives' code calls

CODE_GLOBALS["collective"] = _distributed
