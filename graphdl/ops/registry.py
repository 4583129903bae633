"""The op registry: `OpDef`, `defop` and `OPS`, and the shape-rule helpers every family shares.

An op is a name, a shape rule (input shapes and attrs -> output shape and dtype), a
lowering (the torch expression the compiler emits for it) and a VJP rule. A VJP rule
receives the cotangent `g`, the op's output `out` and the op's inputs, and returns one
cotangent per input (`None` where an input gets no gradient). It builds those with the
same functional ops users call, so the backward pass is IR like any other graph, and
`grad` of a gradient graph works.

An `OpDef` is also the op's builder: `add(a, b)` adds a node applying `add`, and passes
match nodes by identity (`node.op is add`), never by the op's name. The families of
ops live beside this module (elementwise, reductions, linalg, losses, fused,
collectives); the IR, the text reader and the drawing need only this module.

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

from ..building import caller_location
from ..checks import FLOAT_DTYPES, Dim, GraphError, Shape, ShapeError, dtype_name, read_float
from ..ir import Value

Lowering = Callable[[list[str], dict[str, Any], list[Value]], str]
# A shape rule reads the inputs and the attrs (a read-only view, defaults filled in) and
# returns the output's shape and dtype, and, if it normalises any attrs (axis=1 becomes
# (1,), a const's value a float), a dict of those: it never edits the attrs it is given.
Rule = Callable[[list[Value], Mapping[str, Any]],
                tuple[Shape, torch.dtype] | tuple[Shape, torch.dtype, dict[str, Any]]]
VARIADIC = -1  # the arity of an op that takes one or more inputs


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
# nothing through that module). The collectives add the runtime they call.
CODE_GLOBALS: dict[str, Any] = {"torch": torch, "math": math, "aten": _Kernels()}


@dataclass(frozen=True)
class Memory:
    """What the memory planner (passes/memory.py) and fit's arena may do with an op.

    new_storage: the result is new storage, never a view of an input, so it may be
    written over once it is dead. inplace: input index -> code that writes the result
    into that input instead. out: code (or a lowering) that writes the result into a
    preallocated buffer `{out}`. transposed: inputs the kernel reads transposed; the
    code names them by an expression for that transpose (see `OpDef.operands`).
    """

    new_storage: bool = False
    inplace: Mapping[int, str] = field(default_factory=dict)
    out: str | Lowering | None = None
    transposed: tuple[int, ...] = ()


@dataclass(frozen=True)
class Collective:
    """An op that talks to the other processes (graphdl.distributed). They must issue the
    same collectives in the same order, so passes never drop, merge, fold or reorder it
    and compile never runs it ahead of time. read_by: the one op that may read its result
    (an operation in flight is no tensor to compute with)."""

    read_by: str


NO_MEMORY_TRAITS = Memory()


@dataclass(frozen=True, eq=False)
class OpDef:
    """An op: its name, shape rule, lowering to torch, VJP rule and attribute defaults.

    Calling it adds a node: `add(a, b)` (see `apply`). Ops compare by identity.
    """

    name: str
    arity: int
    rule: Rule
    kernel: Lowering  # the torch expression, given the operands' expressions (see `lower`)
    vjp: Callable[..., list[Value | None]] | None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    memory: Memory = NO_MEMORY_TRAITS
    collective: Collective | None = None
    # Dtypes: every input is floating, but those in `indices` (integer indices: i64) and,
    # with `any_dtype`, the others may be integers too (ops that only move elements).
    indices: tuple[int, ...] = ()
    any_dtype: bool = False
    # A matrix product's kernel: the name of the graphdl.ops.products kernel a node's
    # code calls (given its inputs; None: the op's own code). fit's arena calls the way
    # picked for its shapes instead (`code(kernel=...)`).
    chosen: Callable[[Sequence[Value]], str | None] | None = None

    def __call__(self, *args: Any, **attrs: Any) -> Value:
        """Add a node applying this op: its inputs, then (optionally) its attrs in the
        order the op declares them (`mean(x, 1)` is `mean(x, axis=1)`)."""
        if self.arity == VARIADIC or len(args) <= self.arity:
            return apply(self, *args, **attrs)
        inputs, extra = args[:self.arity], args[self.arity:]
        if len(extra) > len(self.attrs):  # too many inputs: apply names the arity
            return apply(self, *args, **attrs)
        for name, value in zip(self.attrs, extra):
            if name in attrs:
                raise GraphError(f"{self.name}: {name} is given twice, by position and by name")
            attrs[name] = value
        return apply(self, *inputs, **attrs)

    def __repr__(self) -> str:
        return f"<op {self.name}>"

    @property
    def __name__(self) -> str:  # a builder's name, as a function has one
        return self.name

    def infer(self, inputs: Sequence[Value], attrs: dict[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
        """Output shape and dtype, and the attrs completed with defaults and normalised."""
        self._check_arity(inputs)
        self._check_readers(inputs)
        self._check_dtypes(inputs)
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            takes = ", ".join(self.attrs) or "no attributes"
            raise ShapeError(f"unknown attribute(s) {', '.join(unknown)}", f"{self.name} takes {takes}")
        full = {**self.attrs, **attrs}
        shape, dtype, *normalised = self.rule(list(inputs), MappingProxyType(full))
        return shape, dtype, {**full, **normalised[0]} if normalised else full

    def _check_arity(self, inputs: Sequence[Value]) -> None:
        if self.arity == VARIADIC and not inputs:
            raise ShapeError("takes one or more inputs, got none")
        if self.arity != VARIADIC and len(inputs) != self.arity:
            raise ShapeError(f"takes {self.arity} input(s), got {len(inputs)}")

    def _check_dtypes(self, inputs: Sequence[Value]) -> None:
        """Indices are integers; everything else is floating unless the op only moves elements."""
        for i, v in enumerate(inputs):
            integer = not v.dtype.is_floating_point
            if i in self.indices and not integer:
                raise ShapeError(f"input {i}, {v.label}, holds indices, so it must be i64, not {dtype_name(v.dtype)}",
                                 "declare it with dtype=torch.int64, e.g. g.input('i', (None,), torch.int64)")
            if integer and i not in self.indices and not self.any_dtype:
                raise ShapeError(f"{v.label} is {dtype_name(v.dtype)}, integer indices, but {self.name} computes on "
                                 "floating-point values", "integers are only read as indices (index_select, "
                                 "gd.Embedding) or moved (reshape, concat, slice); feed floats here")

    def _check_readers(self, inputs: Sequence[Value]) -> None:
        """A collective's result in flight may be read only by the op it names."""
        for v in inputs:
            made_by = v.node.op if v.node is not None else None
            if made_by is not None and made_by.collective and made_by.collective.read_by != self.name:
                read_by = made_by.collective.read_by
                raise ShapeError(f"{v.label} is the result of {made_by.name}, which only {read_by} may read",
                                 f"apply {read_by} to it first")

    def operands(self, names: list[str], transposes: dict[int, str] | None = None) -> list[str]:
        """The expressions the code takes for inputs named `names`: an input the kernel
        reads transposed becomes a prepared transpose from `transposes` (by input index),
        or `name.mT`, a view made at each call (~0.7 µs on CPU)."""
        transposes = transposes or {}
        return [transposes.get(i, f"{n}.mT") if i in self.memory.transposed else n for i, n in enumerate(names)]

    def lower(self, names: list[str], attrs: dict[str, Any], inputs: Sequence[Value]) -> str:
        """The torch expression for a node of this op on inputs named `names`."""
        return self.code(names, attrs, inputs)

    def code(self, names: list[str], attrs: dict[str, Any], inputs: Sequence[Value], out: str | None = None,
             transposes: dict[int, str] | None = None, kernel: str | None = None) -> str:
        """`lower`, with the choices of fit's arena: with `out`, the expression that writes
        into the buffer named `out` (the op must have an `out` code); `transposes` names
        prepared transposes of inputs the kernel reads transposed; `kernel` names the
        function to call instead of the `chosen` products kernel."""
        args = self.operands(names, transposes)
        if kernel is not None:
            return f"{kernel}({', '.join(args)}{'' if out is None else f', out={out}'})"
        if out is None:
            return self.kernel(args, attrs, list(inputs))
        write = self.memory.out
        assert write is not None, f"{self.name} has no out= code"
        if isinstance(write, str):
            return write.format(*args, out=out)
        return write(args, {**attrs, "out": out}, list(inputs))


OPS: dict[str, OpDef] = {}  # every op by name: what the text reader and model files look up


def defop(name: str, code: str | Lowering, rule: Rule, vjp: Callable | None, arity: int = 1,
          attrs: dict[str, Any] | None = None, doc: str = "", new_storage: bool = False,
          inplace: dict[int, str] | None = None, out: bool | str | Lowering | None = None,
          transposed: tuple[int, ...] = (), collective: Collective | None = None,
          indices: tuple[int, ...] = (), any_dtype: bool = False,
          chosen: str | Callable[[Sequence[Value]], str | None] | None = None) -> OpDef:
    """Register an op and return it; calling it builds a node, `op(*inputs, **attrs) -> Value`.

    `code` is a torch expression with `{0}`, `{1}` for the inputs and `{attr}` for the
    attrs' reprs, or a function `(args, attrs, inputs) -> str` for ops whose code depends
    on shapes. `new_storage`, `inplace`, `out` (True: the code's own call with `out=`) and
    `transposed` are the op's `Memory` traits; `collective` marks an op that talks to the
    other ranks. `indices` lists the inputs that hold integer indices (i64); with
    `any_dtype` the others may be integers too (an op that only moves elements, such as
    reshape); otherwise every input must be floating. `chosen` names the
    graphdl.ops.products kernel of a matrix product (or gives it from the inputs):
    `code` is then `products.<kernel>(...)` unless given.
    """
    assert name not in OPS, f"op {name!r} is defined twice"
    if isinstance(chosen, str):
        kernel_name = chosen
        chosen = lambda inputs: kernel_name  # noqa: E731
        code = f"products.{kernel_name}(" + ", ".join(f"{{{i}}}" for i in range(arity)) + ")"
    if isinstance(code, str):
        template = code

        def lower(args: list[str], attrs: dict[str, Any], inputs: list[Value]) -> str:
            return template.format(*args, **{k: repr(v) for k, v in attrs.items()})
    else:
        lower = code
    if out is True:  # the code's call with the buffer as its out= argument
        assert isinstance(code, str) and code.endswith(")"), f"{name}: out=True needs code that ends in a call"
        out = code[:-1] + ", out={out})"
    memory = Memory(new_storage, MappingProxyType(dict(inplace or {})), out or None, transposed)
    op = OpDef(name, arity, rule, lower, vjp, MappingProxyType(dict(attrs or {})), doc, memory, collective,
               tuple(indices), any_dtype, chosen)
    OPS[name] = op
    return op


def apply(op: OpDef, *inputs: Value | float, **attrs: Any) -> Value:
    """Add a node applying `op`; Python numbers become scalar constants of the other
    inputs' dtype."""
    values = [v for v in inputs if isinstance(v, Value)]
    if not values:
        raise _no_graph_value(op, inputs)
    graph = values[0].graph
    for i, v in enumerate(inputs):
        if not isinstance(v, (Value, numbers.Real)) or isinstance(v, bool):
            hint = "wrap tensors with Graph.param or Graph.input" if isinstance(v, torch.Tensor) else ""
            raise graph.node_error(op.name, inputs, f"input {i} is a {type(v).__name__}; inputs must be graph "
                                   "values or Python numbers", hint)
    if len(values) < len(inputs) and not values[0].dtype.is_floating_point:
        raise graph.node_error(op.name, inputs, f"{values[0].label} is {dtype_name(values[0].dtype)}, integer "
                               "indices; a Python number only combines with floating values")
    consts = [graph.const(v, values[0].dtype) for v in inputs if not isinstance(v, Value)]
    it = iter(consts)
    args = [v if isinstance(v, Value) else next(it) for v in inputs]
    try:
        return graph.add_node(op, args, attrs)
    except GraphError:
        for c in reversed(consts):  # a failed call leaves the graph as it was
            graph.remove_node(c.node)
        raise


def _no_graph_value(op: OpDef, inputs: Sequence[object]) -> GraphError:
    if op.arity == 0:
        return GraphError(f"{op.name}: build it with Graph.const(...)")
    return GraphError(
        f"{op.name}: at least one input must be a graph value (from Graph.input, Graph.param "
        f"or another op), got {', '.join(type(v).__name__ for v in inputs) or 'no inputs'}"
        f"\n  created at {caller_location()}"
    )


# -- shape rules every family uses ------------------------------------------------------


def same_dtype(inputs: list[Value]) -> torch.dtype:
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


def unary(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    return inputs[0].shape, inputs[0].dtype


def bool_attr(name: str, value: Any) -> bool:
    if not isinstance(value, int) or value not in (0, 1):  # bool is an int; 0 and 1 are admitted too
        raise ShapeError(f"{name}={value!r} must be True or False")
    return bool(value)


def all_axes(x: Value) -> tuple[int, ...]:
    return tuple(range(x.ndim))


# -- the constant: the one op the IR itself builds (Graph.const) ---------------------------


def _const_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    if not isinstance(attrs["dtype"], str) or attrs["dtype"] not in FLOAT_DTYPES:
        raise ShapeError(f"unknown dtype {attrs['dtype']!r}", f"use one of {', '.join(FLOAT_DTYPES)}")
    try:
        value = read_float(attrs["value"], "value", FLOAT_DTYPES[attrs["dtype"]])
    except GraphError as e:
        raise ShapeError(str(e)) from None
    return (), FLOAT_DTYPES[attrs["dtype"]], {"value": value}


def _const_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    value = attrs["value"]
    literal = repr(value) if math.isfinite(value) else f"float('{value}')"  # repr(inf) is not Python source
    return f"torch.tensor({literal}, dtype={FLOAT_DTYPES[attrs['dtype']]})"


const = defop("const", _const_code, _const_rule, lambda g, out: [], arity=0,
              attrs={"value": 0.0, "dtype": "f32"}, doc="A scalar constant (build with Graph.const).")
