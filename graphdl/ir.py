"""The IR: values, nodes and graphs.

A graph is SSA: every `Value` is defined once, by a graph input, a param or a node.
Every value carries a dtype and a shape; a dimension is an int or a symbol such as
``"N"`` (the batch size, bound when the compiled graph is called). Nodes are created
only through `Graph.add_node`, which infers the output shape with the op's rule, so a
mismatch fails while the graph is built and names the node, the op, the shapes and
the line of user code that created it. `Graph.verify()` re-checks every invariant and
is what passes and tests run after touching a graph.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import networkx as nx

    from .ops import OpDef

Dim = int | str
Shape = tuple[Dim, ...]

DTYPES: dict[str, torch.dtype] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class GraphError(ValueError):
    """An invalid graph, shape, feed, IR text or model file.

    The message names what is wrong (node, op, shapes, input) and how to fix it.
    """


class ShapeError(Exception):
    """Raised by an op's shape rule; `Graph.add_node` turns it into a `GraphError`
    that also names the node, its inputs and where it was created."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def format_shape(shape: Shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def format_type(dtype: torch.dtype, shape: Shape) -> str:
    return dtype_name(dtype) + format_shape(shape)


def caller_location() -> str:
    """file:line of the innermost frame outside graphdl, where the user built a node."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return "<graphdl>"
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"


class Slot:
    """A param's live tensor, in one place.

    Every graph built from a param shares its slot: copies, gradient graphs, compile's
    working copy and the layer that owns the param. Assigning a new tensor (to
    `value.data` or to a layer's attribute) is what all of them read at their next call,
    so a model never holds stale snapshots of its own weights.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"Slot({format_type(self.tensor.dtype, tuple(self.tensor.shape))})"


@dataclass(eq=False)
class Value:
    """One SSA value: a graph input, a param (holding its live tensor) or a node's output."""

    graph: Graph
    name: str  # inputs and params: their name; node outputs: "" (printed as %k)
    shape: Shape
    dtype: torch.dtype
    node: Node | None = None
    slot: Slot | None = None  # params only: where the live tensor is
    users: list[Node] = field(default_factory=list)

    @property
    def data(self) -> torch.Tensor | None:
        """A param's live tensor (None for inputs and node outputs)."""
        return None if self.slot is None else self.slot.tensor

    @data.setter
    def data(self, tensor: torch.Tensor) -> None:
        if self.slot is None:
            raise GraphError(f"{self.label} is not a param; only params hold a tensor")
        check_param_tensor(f"param {self.name}", tensor)
        self.slot.tensor = tensor

    @property
    def kind(self) -> str:
        if self.node is not None:
            return "node"
        return "param" if self.slot is not None else "input"

    @property
    def label(self) -> str:
        """How messages and the text IR refer to this value: its name or %k."""
        if self.node is None:
            return self.name
        # By identity: list.index would compare and, on a miss, repr the node, whose repr asks for this label.
        k = next((k for k, n in enumerate(self.graph.nodes) if n is self.node), None)
        return "%?" if k is None else f"%{k}"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"{self.label}: {format_type(self.dtype, self.shape)}"

    # Operators make VJP rules and user code read like math; each builds one IR node.
    def __add__(self, other: Any) -> Value:
        from .ops import add
        return add(self, other)

    def __radd__(self, other: Any) -> Value:
        from .ops import add
        return add(other, self)

    def __sub__(self, other: Any) -> Value:
        from .ops import sub
        return sub(self, other)

    def __rsub__(self, other: Any) -> Value:
        from .ops import sub
        return sub(other, self)

    def __mul__(self, other: Any) -> Value:
        from .ops import mul
        return mul(self, other)

    def __rmul__(self, other: Any) -> Value:
        from .ops import mul
        return mul(other, self)

    def __truediv__(self, other: Any) -> Value:
        from .ops import div
        return div(self, other)

    def __rtruediv__(self, other: Any) -> Value:
        from .ops import div
        return div(other, self)

    def __neg__(self) -> Value:
        from .ops import neg
        return neg(self)

    def __matmul__(self, other: Value) -> Value:
        from .ops import matmul
        return matmul(self, other)

    @property
    def T(self) -> Value:
        from .ops import transpose
        return transpose(self)


@dataclass(eq=False)
class Node:
    """One op applied to input values, defining exactly one output value."""

    op: OpDef
    inputs: list[Value]
    attrs: dict[str, Any]
    out: Value
    where: str = "<graphdl>"  # file:line of the user code that created it
    scope: str = ""  # the layer it belongs to, e.g. "0:Linear"
    backward: bool = False  # emitted by grad()

    def __repr__(self) -> str:
        from .text import format_node
        return format_node(self, {})


class Graph:
    """A computation: named inputs, params with live tensors, nodes and outputs.

    Build it with `input`, `param`, the functional ops (`gd.matmul`, `gd.add`, ...) and
    `output`; print it with `str(graph)`; run it with `gd.compile(graph)`.
    """

    def __init__(self, name: str = "graph") -> None:
        if not isinstance(name, str) or not _is_identifier(name):
            raise GraphError(f"graph name {name!r} must be a str of ASCII letters, digits, '_' and '.' "
                             "(e.g. 'tiny' or 'disk.v2'), so that its text IR parses back")
        self.name = name
        self.inputs: dict[str, Value] = {}
        self.params: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._scope = ""
        self._backward = False

    # -- building -------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or not _is_identifier(name):
            raise GraphError(
                f"graph {self.name}: name {name!r} is not valid; use letters, digits, "
                "'_' and '.', not starting with a digit-only part (e.g. 'x' or 'fc0.weight')"
            )
        if name in self.inputs or name in self.params:
            raise GraphError(f"graph {self.name}: {name!r} is already defined; pick another name")

    def input(self, name: str, shape: Sequence[int | str | None], dtype: torch.dtype = torch.float32) -> Value:
        """Declare a graph input. `None` in `shape` is the batch dimension, named "N"."""
        self._check_new_name(name)
        _check_dtype(f"input {name}", dtype)
        try:
            dims = tuple("N" if d is None else d for d in shape)
        except TypeError:
            raise GraphError(f"input {name}: shape must be a sequence such as (None, 2), got {shape!r}") from None
        for d in dims:
            valid_int = isinstance(d, int) and not isinstance(d, bool) and d >= 0
            if not valid_int and not (isinstance(d, str) and d.isidentifier()):
                raise GraphError(
                    f"input {name}: dimension {d!r} in shape {shape!r} must be a non-negative int, "
                    "None (the batch dimension) or a symbol name such as 'N'"
                )
        value = Value(self, name, dims, dtype)
        self.inputs[name] = value
        return value

    def param(self, name: str, data: torch.Tensor | Slot) -> Value:
        """Declare a param holding `data`, its live tensor (updated in place by training).

        Pass a `Slot` instead to share the param with another graph or a layer: then a
        tensor assigned to either is what both read."""
        self._check_new_name(name)
        slot = data if isinstance(data, Slot) else Slot(data)
        check_param_tensor(f"param {name}", slot.tensor)
        value = Value(self, name, tuple(slot.tensor.shape), slot.tensor.dtype, slot=slot)
        self.params[name] = value
        return value

    def const(self, value: float, dtype: torch.dtype = torch.float32) -> Value:
        """A scalar constant, as a `const` node."""
        from .ops import OPS
        _check_dtype("const", dtype)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise GraphError(f"const: value {value!r} must be a Python int or float, got {type(value).__name__}"
                             f"\n  created at {caller_location()}"
                             "\n  hint: for a tensor, declare it with Graph.param or Graph.input")
        try:
            value = float(value)
        except OverflowError:
            raise GraphError(f"const: value {str(value)[:12]}... is too large for a float"
                             f"\n  created at {caller_location()}") from None
        return self.add_node(OPS["const"], [], {"value": value, "dtype": dtype_name(dtype)})

    def output(self, *values: Value) -> None:
        """Append `values` to the graph's outputs (returned, in order, by the compiled function)."""
        for v in values:
            if not isinstance(v, Value) or v.graph is not self:
                raise GraphError(f"graph {self.name}: output {v!r} is not a value of this graph")
            self.outputs.append(v)

    @contextlib.contextmanager
    def scope(self, name: str, backward: bool | None = None) -> Iterator[None]:
        """Tag the nodes built inside with a scope (a layer) and optionally as backward."""
        if not isinstance(name, str) or "\n" in name or "\r" in name:
            raise GraphError(f"graph {self.name}: scope {name!r} must be a one-line str, such as '0:Linear'")
        saved = self._scope, self._backward
        self._scope = name
        if backward is not None:
            self._backward = backward
        try:
            yield
        finally:
            self._scope, self._backward = saved

    def add_node(self, op: OpDef, inputs: list[Value], attrs: dict[str, Any], where: str | None = None) -> Value:
        """Append a node; infer its output's shape and dtype with the op's rule."""
        where = where or caller_location()
        for v in inputs:
            if v.graph is not self:
                raise self.node_error(op.name, inputs, f"input {v.label} belongs to graph {v.graph.name!r}, "
                                      f"not {self.name!r}", "build each graph from its own inputs and params", where)
        try:
            shape, dtype, attrs = op.infer(inputs, attrs)
        except ShapeError as e:
            raise self.node_error(op.name, inputs, e.message, e.hint, where) from None
        out = Value(self, "", shape, dtype)
        node = Node(op, list(inputs), attrs, out, where, self._scope, self._backward)
        out.node = node
        for v in inputs:
            v.users.append(node)
        self.nodes.append(node)
        return out

    def node_error(self, op: str, inputs: Sequence[Any], message: str, hint: str = "",
                   where: str | None = None) -> GraphError:
        """The error for a node that cannot be built: `op %k(inputs): message`, where the
        user created it, the layer it belongs to, and the hint."""
        args = ", ".join(repr(v) if isinstance(v, Value) else type(v).__name__ for v in inputs)
        scope = f" (in layer {self._scope})" if self._scope else ""
        msg = f"{op} %{len(self.nodes)}({args}): {message}\n  created at {where or caller_location()}{scope}"
        return GraphError(msg + (f"\n  hint: {hint}" if hint else ""))

    # -- editing (the only functions that touch use-lists) ------------------------------

    def remove_node(self, node: Node) -> None:
        """Remove a node whose output is unused."""
        if node.out.users or any(o is node.out for o in self.outputs):
            raise GraphError(f"cannot remove {node!r}: its value is still used")
        for v in node.inputs:
            v.users.remove(node)
        self.nodes.remove(node)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every user of `old` (and the outputs) use `new` instead."""
        for user in old.users:
            user.inputs = [new if v is old else v for v in user.inputs]
            new.users.append(user)
        old.users = []
        self.outputs = [new if v is old else v for v in self.outputs]

    def set_inputs(self, node: Node, inputs: list[Value]) -> None:
        for v in node.inputs:
            v.users.remove(node)
        node.inputs = list(inputs)
        for v in inputs:
            v.users.append(node)

    def move_before(self, node: Node, anchor: Node) -> None:
        """Reorder `node` to sit just before `anchor`. A pass that builds a replacement
        for `anchor` from values defined before it keeps the order topological this way,
        without a full toposort."""
        self.nodes.remove(node)
        self.nodes.insert(self.nodes.index(anchor), node)

    # -- algorithms -------------------------------------------------------------------

    def to_networkx(self) -> nx.DiGraph:
        """Nodes and their data dependencies (an edge producer -> user)."""
        import networkx as nx  # imported on first use: it is most of `import graphdl`'s own time

        g = nx.DiGraph()
        g.add_nodes_from(range(len(self.nodes)))
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v.node is not None and id(v.node) in index:
                    g.add_edge(index[id(v.node)], i)
        return g

    def toposort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is free."""
        import networkx as nx

        dag = self.to_networkx()
        try:
            order = list(nx.lexicographical_topological_sort(dag))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(dag)
            raise GraphError(
                f"graph {self.name} has a cycle through nodes {[u for u, _ in cycle]}; "
                "a value cannot depend on itself"
            ) from None
        self.nodes = [self.nodes[i] for i in order]

    def value(self, name: str) -> Value:
        """The input or param called `name`."""
        if not isinstance(name, str):
            raise GraphError(f"graph {self.name}: value names are str, got {type(name).__name__}")
        if name in self.inputs:
            return self.inputs[name]
        if name in self.params:
            return self.params[name]
        known = ", ".join([*self.inputs, *self.params]) or "none"
        raise GraphError(f"graph {self.name} has no input or param {name!r}; it has: {known}")

    def verify(self) -> None:
        """Check every invariant; raise `GraphError` naming the first that fails."""
        defined: set[int] = {id(v) for v in (*self.inputs.values(), *self.params.values())}
        uses: dict[int, int] = {}
        for k, node in enumerate(self.nodes):
            where = f"graph {self.name}: node %{k} ({node.op.name}, created at {node.where})"
            for v in node.inputs:
                if v.graph is not self:
                    raise GraphError(f"{where} uses a value of another graph")
                if id(v) not in defined:
                    if v.node is not None and not any(n is v.node for n in self.nodes):
                        raise GraphError(f"{where} uses the value of a removed node ({v.node.op.name}); "
                                         "build it again or stop using it")
                    raise GraphError(f"{where} uses {v.label} before it is defined (order is not topological)")
                uses[id(v)] = uses.get(id(v), 0) + 1
            if node.out.node is not node or node.out.graph is not self:
                raise GraphError(f"{where}: its output does not point back to it")
            if id(node.out) in defined:
                raise GraphError(f"{where}: its output is defined twice (not SSA)")
            try:
                shape, dtype, _ = node.op.infer(node.inputs, dict(node.attrs))
            except ShapeError as e:
                raise GraphError(f"{where}: {e.message}") from None
            if shape != node.out.shape or dtype != node.out.dtype:
                raise GraphError(
                    f"{where}: output is {format_type(node.out.dtype, node.out.shape)} "
                    f"but the op's rule gives {format_type(dtype, shape)}"
                )
            defined.add(id(node.out))
        for v in [*self.inputs.values(), *self.params.values(), *(n.out for n in self.nodes)]:
            if len(v.users) != uses.get(id(v), 0) or any(u not in self.nodes for u in v.users):
                raise GraphError(f"graph {self.name}: the use-list of {v.label} is out of sync")
        for v in self.outputs:
            if id(v) not in defined:
                raise GraphError(f"graph {self.name}: output {v.label} is not defined in the graph")
        # No cycle check is needed: every input was defined by an earlier node (checked
        # above), so every edge points forward. (networkx's check cost a fresh process
        # 0.3 s, importing networkx, at its first compile.)

    def copy(self, name: str | None = None) -> tuple[Graph, dict[int, Value]]:
        """A structural copy sharing the params' slots; also returns id(old) -> new value."""
        g = Graph(name or self.name)
        vmap: dict[int, Value] = {}
        for v in self.inputs.values():
            vmap[id(v)] = g.input(v.name, v.shape, v.dtype)
        for v in self.params.values():
            vmap[id(v)] = g.param(v.name, v.slot)
        for n in self.nodes:
            out = Value(g, "", n.out.shape, n.out.dtype)
            node = Node(n.op, [vmap[id(v)] for v in n.inputs], dict(n.attrs), out, n.where, n.scope, n.backward)
            out.node = node
            for v in node.inputs:
                v.users.append(node)
            g.nodes.append(node)
            vmap[id(n.out)] = out
        g.outputs = [vmap[id(v)] for v in self.outputs]
        return g, vmap

    def __str__(self) -> str:
        from .text import format_graph
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.params)} params, {len(self.nodes)} nodes>"


def tensor_problem(t: torch.Tensor) -> str | None:
    """What makes `t` unusable as graphdl data (None if nothing): graphdl computes on
    dense (strided) tensors of any layout, not sparse, nested or quantized ones."""
    if t.layout != torch.strided:
        return f"is a {str(t.layout).removeprefix('torch.')} tensor; convert it with .to_dense()"
    if t.is_nested:
        return "is a nested tensor; pad it to a dense tensor first"
    if t.is_quantized:
        return "is a quantized tensor; convert it with .dequantize()"
    return None


def check_param_tensor(what: str, t: Any) -> None:
    """A param's tensor must be a dense tensor of a dtype the IR has."""
    if not isinstance(t, torch.Tensor):
        raise GraphError(f"{what}: its value must be a torch.Tensor, got {type(t).__name__}")
    problem = tensor_problem(t)
    if problem:
        raise GraphError(f"{what} {problem}")
    if t.dtype not in DTYPE_NAMES:
        supported = ", ".join(str(d) for d in DTYPES.values())
        raise GraphError(f"{what}: dtype {t.dtype} is not supported; use a floating dtype: one of {supported}")


def _is_identifier(name: str) -> bool:
    """Names such as x, fc0.weight or 0.bias: dotted parts of letters, digits and '_'."""
    return all(part and part.replace("_", "a").isalnum() and part.isascii() for part in name.split("."))


def _check_dtype(what: str, dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPE_NAMES:
        hint = f"; did you mean {DTYPES[dtype]}?" if isinstance(dtype, str) and dtype in DTYPES else ""
        supported = ", ".join(str(d) for d in DTYPES.values())
        raise GraphError(f"{what}: dtype {dtype!r} is not supported; use one of {supported}{hint}")
