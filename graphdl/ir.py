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
import itertools
import numbers
from collections.abc import Callable, Iterator, KeysView, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .building import caller_location
from .checks import (
    GraphError,
    Shape,
    ShapeError,
    check_dtype,
    check_param_tensor,
    dtype_name,
    format_type,
    read_float,
    read_int,
    read_shape,
    show_number,
)

if TYPE_CHECKING:
    from .ops.registry import OpDef

class Uses:
    """The nodes that read a value, once per read (mul(y, y) reads y twice), in the order
    they were added. Read it like a list; the Graph's editing functions add and remove
    reads, each in O(1): list.remove scanned every user, so dropping the 40,000 dead
    users of one value took 10 s.
    """

    __slots__ = ("_reads", "_total")

    def __init__(self) -> None:
        self._reads: dict[Node, int] = {}  # node -> how many of its inputs are this value
        self._total = 0

    def append(self, node: Node) -> None:
        self._reads[node] = self._reads.get(node, 0) + 1
        self._total += 1

    def remove(self, node: Node) -> None:
        """Drop one read by `node` (ValueError if it has none, as list.remove)."""
        count = self._reads.pop(node, 0)
        if count == 0:
            raise ValueError(f"{node!r} does not read this value")
        if count > 1:
            self._reads[node] = count - 1
        self._total -= 1

    def clear(self) -> None:
        self._reads.clear()
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[Node]:
        for node, count in self._reads.items():
            yield from itertools.repeat(node, count)

    def __contains__(self, node: object) -> bool:
        return node in self._reads

    def readers(self) -> KeysView[Node]:
        """The distinct nodes that read the value (a set-like view)."""
        return self._reads.keys()

    def __repr__(self) -> str:
        return repr(list(self))


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
    users: Uses = field(default_factory=Uses)

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
        k = self.graph.position(self.node)
        return "%?" if k is None else f"%{k}"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"{self.label}: {format_type(self.dtype, self.shape)}"

    # Operators (+, -, *, /, @, unary -, .T) make VJP rules and user code read like math;
    # each builds one IR node. ops.py installs them (VALUE_OPERATORS), beside the ops.


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
        if not isinstance(name, str) or not is_identifier(name):
            raise GraphError(f"graph name {name!r} must be a str of ASCII letters, digits, '_' and '.' "
                             "(e.g. 'tiny' or 'disk.v2'), so that its text IR parses back")
        self.name = name
        self.inputs: dict[str, Value] = {}
        self.params: dict[str, Value] = {}
        # Every edit and lookup is O(1), so passes stay linear in graph size: with a list
        # (list.remove, list.insert, scans for a node's %k) printing, parsing and compiling
        # a 10,000-node gradient graph took 9.7 s, against 0.6 s now.
        self._order: dict[Node, None] = {}  # the nodes, in order: appends and removals in O(1)
        self._listed: list[Node] | None = []  # `nodes`, rebuilt after a removal
        self._positions: dict[Node, int] | None = None  # node -> k in %k, built when first asked
        self._outputs: list[Value] = []  # read as `outputs`; edited only by output, set_output, replace_all_uses
        self._labels: list[str] = []  # one per output, "" for none; grad labels its outputs "d/dw"
        self._returned: dict[Value, int] = {}  # value -> how many entries of outputs hold it
        self._scope = ""
        self._backward = False
        # Left by the graph's builder: why the graph no longer describes what it was built
        # from (a model whose layers changed since), or None. Copies keep it; compiled
        # functions ask it at each call and refuse to run a stale graph.
        self.stale: Callable[[], str | None] | None = None

    # -- building -------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or not is_identifier(name):
            raise GraphError(
                f"graph {self.name}: name {name!r} is not valid; use dotted parts of ASCII letters, "
                "digits and '_', none of them empty (e.g. 'x', 'fc0.weight' or '0.bias')"
            )
        if name in self.inputs or name in self.params:
            raise GraphError(f"graph {self.name}: {name!r} is already defined; pick another name")

    def input(self, name: str, shape: Sequence[int | str | None], dtype: torch.dtype = torch.float32) -> Value:
        """Declare a graph input. `None` in `shape` is the batch dimension, named "N".
        `dtype` is a floating dtype, or torch.int64 for indices (what `index_select` and
        gd.Embedding read), which take no gradient."""
        self._check_new_name(name)
        check_dtype(f"input {name}", dtype, integer=True)
        try:
            dims = tuple("N" if d is None else d for d in shape)
        except TypeError:
            raise GraphError(f"input {name}: shape must be a sequence such as (None, 2), got {shape!r}") from None
        for i, d in enumerate(dims):
            if not (isinstance(d, str) and d.isidentifier()):
                _check_input_dim(name, shape, i, d)
        value = Value(self, name, read_shape(dims, f"input {name}", dtype), dtype)
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
        from .ops.registry import const
        check_dtype("const", dtype)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy scalars and fractions too
            raise GraphError(f"const: value {value!r} must be a real number such as 2 or 0.5, "
                             f"got {type(value).__name__}"
                             f"\n  created at {caller_location()}"
                             "\n  hint: for a tensor, declare it with Graph.param or Graph.input")
        try:
            value = read_float(value, "const: value", dtype)
        except GraphError as e:
            raise GraphError(f"{e}\n  created at {caller_location()}") from None
        return self.add_node(const, [], {"value": value, "dtype": dtype_name(dtype)})

    def output(self, *values: Value, label: str = "") -> None:
        """Append `values` to the graph's outputs (returned, in order, by the compiled function).

        `label` names a single output in the text IR (`return %9 (d/dw)`) and in drawings:
        letters, digits and `_ . / : - '`, e.g. "d/dw" for the gradient of w.
        """
        if label and (len(values) != 1 or not isinstance(label, str) or not _is_label(label)):
            raise GraphError(f"graph {self.name}: output label {label!r} must name one output and be made of "
                             "letters, digits and _ . / : - ' (e.g. 'd/dw')")
        for v in values:
            if not isinstance(v, Value) or v.graph is not self:
                raise GraphError(f"graph {self.name}: output {v!r} is not a value of this graph")
            self._outputs.append(v)
            self._labels.append(label if isinstance(label, str) else "")
            self._returned[v] = self._returned.get(v, 0) + 1

    def scope(self, name: str, backward: bool | None = None) -> contextlib.AbstractContextManager[None]:
        """Tag the nodes built inside (`with graph.scope(...):`) with a scope (a layer)
        and optionally as backward."""
        if not isinstance(name, str) or "\n" in name or "\r" in name:
            raise GraphError(f"graph {self.name}: scope {name!r} must be a one-line str, such as '0:Linear'")
        return _Scope(self, name, self._backward if backward is None else backward)

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
        return self._append(op, inputs, attrs, shape, dtype, where, self._scope, self._backward)

    def node_error(self, op: str, inputs: Sequence[Any], message: str, hint: str = "",
                   where: str | None = None) -> GraphError:
        """The error for a node that cannot be built: `op %k(inputs): message`, where the
        user created it, the layer it belongs to, and the hint."""
        args = ", ".join(repr(v) if isinstance(v, Value) else type(v).__name__ for v in inputs)
        scope = f" (in layer {self._scope})" if self._scope else ""
        msg = f"{op} %{len(self.nodes)}({args}): {message}\n  created at {where or caller_location()}{scope}"
        return GraphError(msg + (f"\n  hint: {hint}" if hint else ""))

    # -- the node list ---------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """The nodes in order (topological once built). Read it; edit the graph only with
        its editing functions (add_node, remove_node, rewrite, ...), which keep the
        use-lists in sync."""
        if self._listed is None:
            self._listed = list(self._order)
        return self._listed

    def position(self, node: Node) -> int | None:
        """k such that `nodes[k] is node` (its %k), or None if it is not in the graph."""
        if self._positions is None:
            self._positions = {n: k for k, n in enumerate(self.nodes)}
        return self._positions.get(node)

    def is_output(self, value: Value) -> bool:
        """Whether `value` is one of the graph's outputs, in O(1)."""
        return value in self._returned

    @property
    def outputs(self) -> tuple[Value, ...]:
        """What the compiled function returns, in order. Read-only: change it with
        `output`, `set_output` and `replace_all_uses`, which keep the graph's record of
        its outputs in step (`verify` checks it)."""
        return tuple(self._outputs)

    @property
    def output_labels(self) -> tuple[str, ...]:
        """One label per output ("" for none); `grad` labels each gradient "d/d<name>"."""
        return tuple(self._labels)

    # -- editing (the only functions that touch use-lists) ------------------------------

    def _append(self, op: OpDef, inputs: Sequence[Value], attrs: dict[str, Any], shape: Shape, dtype: torch.dtype,
                where: str, scope: str, backward: bool) -> Value:
        """Create a node and its output value at the end of the graph, and record its
        reads in the use-lists: what add_node does once the op's rule has checked it,
        and what copy does with a node already checked."""
        out = Value(self, "", shape, dtype)
        node = Node(op, list(inputs), attrs, out, where, scope, backward)
        out.node = node
        for v in node.inputs:
            v.users.append(node)
        self._order[node] = None
        if self._listed is not None:
            if self._positions is not None:
                self._positions[node] = len(self._listed)
            self._listed.append(node)
        return out

    def remove_node(self, node: Node) -> None:
        """Remove a node whose output is unused."""
        if node not in self._order:
            raise GraphError(f"cannot remove {node!r}: it is not a node of graph {self.name}")
        if node.out.users or self.is_output(node.out):
            raise GraphError(f"cannot remove {node!r}: its value is still used")
        for v in node.inputs:
            v.users.remove(node)
        del self._order[node]
        self._listed = self._positions = None

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every user of `old` (and the outputs) use `new` instead."""
        for user in old.users:
            user.inputs = [new if v is old else v for v in user.inputs]
            new.users.append(user)
        old.users = Uses()
        returned = self._returned.pop(old, 0)
        if returned:
            self._outputs = [new if v is old else v for v in self._outputs]
            self._returned[new] = self._returned.get(new, 0) + returned

    def rewrite(self, node: Node, op: OpDef, inputs: list[Value], attrs: dict[str, Any]) -> None:
        """Make `node` apply `op` to `inputs` instead, in place: it keeps its output value
        (so every use of it), its place, scope and source location. The inputs must be
        defined before `node` and the op must give the same output shape and dtype."""
        try:
            shape, dtype, attrs = op.infer(inputs, attrs)
        except ShapeError as e:
            raise GraphError(f"cannot rewrite {node!r} into {op.name}: {e.message}") from None
        if (shape, dtype) != (node.out.shape, node.out.dtype):
            raise GraphError(f"cannot rewrite {node!r} into {op.name}, which gives {format_type(dtype, shape)}: "
                             "a rewrite keeps the value's shape and dtype")
        for v in node.inputs:
            v.users.remove(node)
        for v in inputs:
            v.users.append(node)
        node.op, node.inputs, node.attrs = op, list(inputs), attrs

    def reorder(self, nodes: Sequence[Node]) -> None:
        """Put the graph's nodes in the order `nodes` gives: every node once, each after
        the nodes whose values it reads (a scheduling pass's result)."""
        if len(nodes) != len(self._order) or len(set(nodes)) != len(nodes) or any(n not in self._order for n in nodes):
            raise GraphError(f"graph {self.name}: reorder takes every node of the graph exactly once")
        placed: set[Node] = set()
        for node in nodes:
            early = next((v for v in node.inputs if v.node is not None and v.node not in placed), None)
            if early is not None:
                raise GraphError(f"graph {self.name}: reorder puts {node!r} before {early.node!r}, "
                                 "whose value it reads")
            placed.add(node)
        self._order = dict.fromkeys(nodes)
        self._listed, self._positions = list(nodes), None

    def set_output(self, index: int, value: Value, label: str | None = None) -> None:
        """Make output `index` return `value` instead, keeping its label (or giving it `label`)."""
        if not isinstance(value, Value) or value.graph is not self:
            raise GraphError(f"graph {self.name}: output {value!r} is not a value of this graph")
        index = self._output_index(index)
        if label is not None:
            self._labels[index] = self._checked_label(label)
        old = self._outputs[index]
        self._outputs[index] = value
        self._returned[old] -= 1
        if not self._returned[old]:
            del self._returned[old]
        self._returned[value] = self._returned.get(value, 0) + 1

    def _output_index(self, index: Any) -> int:
        """`index` if it is one of the outputs' (from the front, or from the back if negative)."""
        count = len(self._outputs)
        try:
            return read_int(index, "output index", -count, count - 1)
        except GraphError:
            raise GraphError(f"graph {self.name}: no output {show_number(index)}; it has {count}") from None

    def _checked_label(self, label: Any) -> str:
        if not isinstance(label, str) or (label and not _is_label(label)):
            raise GraphError(f"graph {self.name}: output label {label!r} must be made of letters, digits and "
                             "_ . / : - ' (e.g. 'd/dw')")
        return label

    # -- algorithms -------------------------------------------------------------------

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
        # Values (hashed by identity) key the sets, and a node's description is written
        # only for an error: verify runs on every compile, once per node.
        defined: set[Value] = {*self.inputs.values(), *self.params.values()}
        uses: dict[Value, int] = {}
        for k, node in enumerate(self.nodes):
            self._verify_reads(k, node, defined, uses)
            self._verify_node(k, node, defined)
            defined.add(node.out)
        self._verify_use_lists(uses)
        self._verify_outputs(defined)

    def _verify_reads(self, k: int, node: Node, defined: set[Value], uses: dict[Value, int]) -> None:
        """Node k reads values of this graph defined before it; count each read in `uses`."""
        for v in node.inputs:
            if v.graph is not self:
                raise GraphError(f"{self._where(k, node)} uses a value of another graph")
            if v not in defined:
                if v.node is not None and v.node not in self._order:
                    raise GraphError(f"{self._where(k, node)} uses the value of a removed node "
                                     f"({v.node.op.name}); build it again or stop using it")
                # So every edge runs from an earlier node to a later one: no cycle can pass
                # this check (a networkx cycle search after it doubled verify's time).
                raise GraphError(f"{self._where(k, node)} uses {v.label} before it is defined "
                                 "(order is not topological)")
            uses[v] = uses.get(v, 0) + 1

    def _verify_node(self, k: int, node: Node, defined: set[Value]) -> None:
        """Node k defines its output, once, of the shape and dtype its op's rule gives."""
        if node.out.node is not node or node.out.graph is not self:
            raise GraphError(f"{self._where(k, node)}: its output does not point back to it")
        if node.out in defined:
            raise GraphError(f"{self._where(k, node)}: its output is defined twice (not SSA)")
        try:
            shape, dtype, _ = node.op.infer(node.inputs, node.attrs)
        except ShapeError as e:
            raise GraphError(f"{self._where(k, node)}: {e.message}") from None
        if shape != node.out.shape or dtype != node.out.dtype:
            raise GraphError(
                f"{self._where(k, node)}: output is {format_type(node.out.dtype, node.out.shape)} "
                f"but the op's rule gives {format_type(dtype, shape)}"
            )

    def _verify_use_lists(self, uses: dict[Value, int]) -> None:
        """Every value's use-list holds exactly the reads `uses` counted, by nodes of the graph."""
        for v in [*self.inputs.values(), *self.params.values(), *(n.out for n in self.nodes)]:
            if len(v.users) != uses.get(v, 0) or not self._order.keys() >= v.users.readers():
                raise GraphError(f"graph {self.name}: the use-list of {v.label} is out of sync")

    def _verify_outputs(self, defined: set[Value]) -> None:
        """The outputs are values of the graph, and its records of them (which values, their labels) agree."""
        returned: dict[Value, int] = {}
        for v in self.outputs:
            if v not in defined:
                raise GraphError(f"graph {self.name}: output {v.label} is not defined in the graph")
            returned[v] = returned.get(v, 0) + 1
        if returned != self._returned:
            raise GraphError(f"graph {self.name}: its record of which values are outputs is out of sync; "
                             "change outputs only with Graph.output and Graph.replace_all_uses")
        if len(self.output_labels) != len(self.outputs):
            raise GraphError(f"graph {self.name}: {len(self.outputs)} outputs but {len(self.output_labels)} output "
                             "labels; add outputs with Graph.output, which keeps them in step")

    def _where(self, k: int, node: Node) -> str:
        return f"graph {self.name}: node %{k} ({node.op.name}, created at {node.where})"

    def copy(self, name: str | None = None) -> tuple[Graph, dict[int, Value]]:
        """A structural copy sharing the params' slots; also returns id(old) -> new value."""
        g = Graph(name or self.name)
        vmap: dict[int, Value] = {}
        for v in self.inputs.values():
            vmap[id(v)] = g.input(v.name, v.shape, v.dtype)
        for v in self.params.values():
            vmap[id(v)] = g.param(v.name, v.slot)
        for n in self.nodes:
            # Not add_node: these nodes passed their op's rule when built (verify re-checks
            # them), and running the rules again would double copy's time (12,012-node
            # gradient graph: copy 207 ms, the rules over every node 195 ms).
            vmap[id(n.out)] = g._append(n.op, [vmap[id(v)] for v in n.inputs], dict(n.attrs), n.out.shape,
                                        n.out.dtype, n.where, n.scope, n.backward)
        g.output(*(vmap[id(v)] for v in self._outputs))
        g._labels = list(self._labels)
        g.stale = self.stale
        return g, vmap

    def __str__(self) -> str:
        from .text import format_graph
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.params)} params, {len(self.nodes)} nodes>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """Jupyter shows the drawing (SVG, when Graphviz's `dot` is installed) and the text IR."""
        from .viz import mimebundle
        return mimebundle(self, str(self))


def _check_input_dim(name: str, shape: Any, i: int, d: Any) -> None:
    """Dim i of input `name`, not a symbol, must be a whole number in int64's range (read_int's
    check: not a bool, a float, a str of digits or a numpy int); the message says what else it may be."""
    try:
        read_int(d, f"input {name}: dimension {i}")
    except GraphError as e:
        raise GraphError(f"{e}; each dim in shape {shape!r} must be a non-negative int, None (the batch "
                         "dimension) or a symbol name such as 'N'") from None


class _Scope:
    """Graph.scope's context. A class: with @contextlib.contextmanager's generator each
    `with` took 3x as long (1.8 µs), and parse enters one per node."""

    __slots__ = ("graph", "tag", "saved")

    def __init__(self, graph: Graph, name: str, backward: bool) -> None:
        self.graph, self.tag = graph, (name, backward)

    def __enter__(self) -> None:
        self.saved = self.graph._scope, self.graph._backward
        self.graph._scope, self.graph._backward = self.tag

    def __exit__(self, *exc: object) -> None:
        self.graph._scope, self.graph._backward = self.saved


def is_identifier(name: str) -> bool:
    """Names such as x, fc0.weight or 0.bias: dotted parts of letters, digits and '_'."""
    return all(part and part.replace("_", "a").isalnum() and part.isascii() for part in name.split("."))


def _is_label(text: str) -> bool:
    """Output labels such as d/dw or d/d0.weight: they print inside `( )` on the return line."""
    return bool(text) and text.isascii() and all(c.isalnum() or c in "_./:-'" for c in text)
