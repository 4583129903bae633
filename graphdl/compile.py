"""Lowering: a graph becomes the Python source of one function of torch calls.

The function is generated once and called many times. Each IR node is one line that
calls torch directly (no interpretation at run time); nodes whose inputs are all
constants are computed once, at compile time; a value is released right after its last
use. The source is kept on the compiled object (`fn.source`), and an error while
running names the IR line that failed.
"""

from __future__ import annotations

import builtins
import itertools
import keyword
import linecache
import math
from collections.abc import Callable
from typing import Any

import torch

from .building import pauses_gc
from .checks import GraphError, Shape, format_type, tensor_problem
from .ir import Graph, Node, Value
from .ops import products
from .ops.registry import CODE_GLOBALS
from .passes import pipeline
from .passes.memory import last_uses, plan_arena, plan_inplace
from .text import format_node

_counter = itertools.count()


class Compiled:
    """A compiled graph: call it with the inputs (by name or in declaration order); it
    returns a tuple of the graph's outputs."""

    def __init__(self, graph: Graph, source: str, fn: Callable[..., tuple], filename: str,
                 line_text: dict[int, tuple[str, Node]], device: torch.device | None,
                 const_device: torch.device | None = None,
                 relower: Callable[[torch.device], Compiled] | None = None) -> None:
        self.graph = graph
        self.source = source
        self.fn = fn  # the generated function: positional inputs, no checks
        self._filename = filename
        self._line_text = line_text  # generated line -> (its IR line, its node)
        self.device = device  # the params' device, which feeds must match; None without params
        self._const_device = const_device or torch.device("cpu")  # where fn's constants live
        self._relower = relower  # set for a graph with constants and no params
        self._variants: dict[torch.device, Compiled] = {}
        self.input_names = list(graph.inputs)
        self._specs = [(v.name, v.shape, v.dtype) for v in graph.inputs.values()]

    def __call__(self, *args: torch.Tensor, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check_params()  # first: feeds converted along with a model would be named as the wrong ones
        ordered = self.check_feeds(args, feeds)
        target = self._on_device_of(ordered)
        try:
            with torch.no_grad():  # graphdl differentiates itself; feeds that require grad must not start a tape
                return target.fn(*ordered)
        except Exception as e:  # name the IR line that failed, keep torch's error as the cause
            raise target._explain(e) from e

    def _check_params(self) -> None:
        """The graph still describes what it was built from, and each param's tensor has the
        shape, dtype and device it was compiled for: a tensor of another dtype or device
        would compute in it silently (torch computes cpu-with-meta on meta), one of another
        shape fail inside torch."""
        stale = self.graph.stale() if self.graph.stale is not None else None
        if stale:
            raise GraphError(f"graph {self.graph.name}: {stale}")
        changed = [_change(v, self.device) for v in self.graph.params.values()
                   if (v.data.shape, v.data.dtype, v.data.device) != (v.shape, v.dtype, self.device)]
        if changed:
            raise GraphError(f"graph {self.graph.name}: a param changed after compile ({'; '.join(changed)}); "
                             "compile the graph again (a model does so itself), or give the param a tensor of the "
                             "declared shape, dtype and device")

    def _on_device_of(self, feeds: list[torch.Tensor]) -> Compiled:
        """This compiled function, or, for a graph without params whose feeds are on
        another device than its constants, a copy lowered with the constants there."""
        if self._relower is None or not feeds or feeds[0].device == self._const_device:
            return self
        device = feeds[0].device
        if device not in self._variants:
            self._variants[device] = self._relower(device)
        return self._variants[device]

    def check_feeds(self, args: tuple, feeds: dict[str, Any]) -> list[torch.Tensor]:
        """The feeds in declaration order, after checking names, types, shapes, dtypes,
        devices and that every symbolic dim (the batch size) is bound consistently."""
        feeds = self._by_name(args, feeds)
        bound: dict[str, tuple[int, str]] = {}  # symbol -> (its size, where it was first seen)
        for n, shape, dtype in self._specs:
            self._check_feed(n, feeds[n], shape, dtype, bound)
        return [feeds[n] for n in self.input_names]

    def _by_name(self, args: tuple, feeds: dict[str, Any]) -> dict[str, Any]:
        """Positional feeds joined to the named ones; every input given once, no other."""
        name = self.graph.name
        declared = ", ".join(f"{n}: {format_type(d, s)}" for n, s, d in self._specs) or "none"
        if len(args) > len(self._specs):
            raise GraphError(f"graph {name} takes {len(self._specs)} inputs ({declared}), got {len(args)} positional")
        for n, value in zip(self.input_names, args):
            if n in feeds:
                raise GraphError(f"graph {name}: input {n} given both by position and by name")
            feeds[n] = value
        unknown = [n for n in feeds if n not in self.graph.inputs]
        if unknown:
            raise GraphError(f"graph {name} has no input {unknown[0]!r}; its inputs are {declared}")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise GraphError(f"graph {name}: missing input {missing[0]!r}; its inputs are {declared}")
        return feeds

    def _check_feed(self, n: str, t: Any, shape: Shape, dtype: torch.dtype, bound: dict[str, tuple[int, str]]) -> None:
        """One feed against its declaration: a tensor of the declared dtype, rank, sizes and
        device, its symbolic dims agreeing with the other feeds' (`bound`)."""
        name = self.graph.name
        want = format_type(dtype, shape)
        if not isinstance(t, torch.Tensor):
            raise GraphError(f"graph {name}: input {n} must be a torch.Tensor ({want}), got {type(t).__name__}; "
                             f"convert it with torch.as_tensor({n}, dtype={dtype})")
        problem = tensor_problem(t)
        if problem:
            raise GraphError(f"graph {name}: input {n} {problem}")
        got = format_type(t.dtype, tuple(t.shape))
        if t.dtype != dtype:
            raise GraphError(f"graph {name}: input {n} is {got} but the graph declares {want}; "
                             f"convert it with .to({dtype})")
        if t.dim() != len(shape):
            raise GraphError(f"graph {name}: input {n} has rank {t.dim()} ({got}) but the graph declares "
                             f"rank {len(shape)} ({want})")
        for axis, (d, actual) in enumerate(zip(shape, t.shape)):
            if isinstance(d, int) and d != actual:
                raise GraphError(f"graph {name}: input {n} is {got} but the graph declares {want} "
                                 f"(dim {axis} is {actual}, expected {d})")
            first = bound.setdefault(d, (actual, f"{n} dim {axis}")) if isinstance(d, str) else (actual, "")
            if first[0] != actual:
                raise GraphError(f"graph {name}: inputs disagree on {d}: {first[1]} is {first[0]} but "
                                 f"{n} dim {axis} is {actual}; feed batches of the same size")
        if self.device is not None and t.device != self.device:
            raise GraphError(f"graph {name}: input {n} is on {t.device} but the params are on "
                             f"{self.device}; move it with .to({str(self.device)!r})")

    def _explain(self, error: Exception) -> Exception:
        tb = error.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self._filename:
                line = tb.tb_lineno
            tb = tb.tb_next
        if line is None or line not in self._line_text:
            return error
        ir_line, node = self._line_text[line]
        where = f"\n  created at {node.where}" + (f" (in layer {node.scope})" if node.scope else "")
        return GraphError(f"graph {self.graph.name}: running `{ir_line}` failed: "
                          f"{type(error).__name__}: {error}{where}")

    def __repr__(self) -> str:
        return f"<Compiled {self.graph.name}: {len(self.graph.nodes)} nodes>\n{self.source}"


class _ArenaLayout:
    """Where the arena form of a graph keeps things: the buffers `plan_arena` gives its
    nodes, the transposed views the code reads prepared rather than made per call
    (`.mT` costs ~0.7 µs; the disk net's step reads 7): of params, re-made when a
    slot's tensor changes, and of buffers, made with them; and the kernel each matrix
    product calls, picked for the buffers' shapes when they are made (graphdl.ops.products:
    looking it up at each call instead cost ~2 µs a product, 11 a step of the disk net)."""

    def __init__(self, graph: Graph, hoisted: set[int], inplace: dict[int, int], last_use: dict[int, int]) -> None:
        self.writes, self.lives_in, self.buffers = plan_arena(graph, hoisted, inplace, last_use)
        self.params = [v for v in graph.params.values() if v.users or graph.is_output(v)]
        index = {id(v): i for i, v in enumerate(self.params)}
        self.param_transposes: list[int] = []  # indices into self.params
        self.buffer_transposes: list[int] = []
        self._prepared: dict[int, str] = {}  # id(value) -> name of its prepared transpose
        for k, node in enumerate(graph.nodes):
            if id(node.out) in hoisted or k in inplace:
                continue
            for i in node.op.memory.transposed:
                v = node.inputs[i]
                if id(v) in index and id(v) not in self._prepared:
                    self._prepared[id(v)] = f"pt{index[id(v)]}"
                    self.param_transposes.append(index[id(v)])
                elif id(v) in self.lives_in and id(v) not in self._prepared:
                    b = self.lives_in[id(v)]
                    self._prepared[id(v)] = f"bt{b}"
                    if b not in self.buffer_transposes:
                        self.buffer_transposes.append(b)
        # The buffer each output is returned in (None: a tensor made at the call).
        self.output_buffers = _output_buffers(graph, self.lives_in, hoisted)
        # The products: (node index, node, the graphdl.ops.products kernel it calls).
        self.products = [(k, node, kernel) for k, node in enumerate(graph.nodes)
                         if id(node.out) not in hoisted and k not in inplace and node.op.chosen is not None
                         and (kernel := node.op.chosen(node.inputs)) is not None]
        self._kernel_names = {k: f"k{j}" for j, (k, _, _) in enumerate(self.products)}

    def kernel(self, k: int) -> str | None:
        """The name node k calls its product's kernel by (None: not a product)."""
        return self._kernel_names.get(k)

    def out(self, k: int) -> str | None:
        return f"b{self.writes[k]}" if k in self.writes else None

    def transposes(self, node: Node) -> dict[int, str]:
        prepared = ((i, self._prepared.get(id(node.inputs[i]))) for i in node.op.memory.transposed)
        return {i: name for i, name in prepared if name is not None}

    def names(self, names: dict[int, str]) -> list[str]:
        """The names the bindings tuple unpacks into, in `ArenaCompiled.bind`'s order."""
        return ([names[id(v)] for v in self.params] + [f"pt{i}" for i in self.param_transposes]
                + [f"b{j}" for j in range(len(self.buffers))] + [f"bt{j}" for j in self.buffer_transposes]
                + list(self._kernel_names.values()))


class ArenaCompiled(Compiled):
    """A graph compiled to the arena form fit's training step runs: `fn(*inputs, A)`, where
    A (from `bind`) holds the params, preallocated buffers and prepared transposes, and
    the kernels of its matrix products.

    Outputs that live in the arena are overwritten by the next call with the same
    bindings; calling the object itself binds, runs and returns outputs of their own,
    like `Compiled`.
    """

    def __init__(self, *args: Any, layout: _ArenaLayout) -> None:
        super().__init__(*args)
        self.layout = layout
        self._arenas: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def bind_params(self) -> tuple[torch.Tensor, ...]:
        """The params' tensors now, then their prepared transposes: the start of A. Bind
        again after a param's slot gets a new tensor (views follow in-place updates)."""
        tensors = [v.data for v in self.layout.params]
        return (*tensors, *(tensors[i].mT for i in self.layout.param_transposes))

    def buffers(self, sizes: dict[str, int]) -> tuple[Any, ...]:
        """New buffers for symbolic dims bound to `sizes` (e.g. {"N": 5}), then their
        prepared transposes and the products' kernels: the rest of A."""
        device = self.device or self._const_device
        shapes = [[sizes[d] if isinstance(d, str) else d for d in v.shape] for v in self.layout.buffers]
        try:
            made = [torch.empty(shape, dtype=v.dtype, device=device) for shape, v in zip(shapes, self.layout.buffers)]
        except RuntimeError as e:  # out of memory (torch.OutOfMemoryError is one): name it, not the allocator
            need = sum(math.prod(shape) * v.dtype.itemsize for shape, v in zip(shapes, self.layout.buffers))
            raise GraphError(f"graph {self.graph.name}: its buffers for {sizes} need {need / 2**20:,.0f} MiB, "
                             f"which {device} cannot allocate ({str(e).splitlines()[0]}); use a smaller "
                             "batch_size") from None
        return (*made, *(made[j].mT for j in self.layout.buffer_transposes), *self._kernels(sizes, made, device))

    def _kernels(self, sizes: dict[str, int], made: list[torch.Tensor], device: torch.device | str) -> list[Any]:
        """Each product's kernel, picked (graphdl.ops.products) for operands of the shapes
        its inputs have at `sizes`, contiguous (transposed where the kernel reads an
        input transposed), writing into its own buffer; timed on random such operands the
        first time (making them on every bind instead cost ~25 ms an epoch at width 256)."""
        picked = []
        on = torch.device(device)
        for k, node, kernel in self.layout.products:
            chooser = getattr(products, kernel)
            if on.type != "cpu":  # (only CPU kernels are chosen)
                picked.append(chooser.ways[0])
                continue
            shapes = [[sizes[d] if isinstance(d, str) else d for d in v.shape] for v in node.inputs]
            transposed = node.op.memory.transposed
            out = made[self.layout.writes[k]] if k in self.layout.writes else None

            def operands(shapes: list[list[int]] = shapes, node: Node = node, out: Any = out) -> tuple[tuple, dict]:
                values = torch.Generator(on).manual_seed(0)  # (the global generator is the user's)
                made_ = [torch.randn(shape, dtype=v.dtype, device=on, generator=values)
                         for shape, v in zip(shapes, node.inputs)]
                return tuple(t.mT if i in transposed else t for i, t in enumerate(made_)), {"out": out}
            signature = [(torch.Size(shape[::-1]) if i in transposed else torch.Size(shape),
                          _contiguous_strides(shape)[::-1] if i in transposed else _contiguous_strides(shape),
                          v.dtype, on) for i, (shape, v) in enumerate(zip(shapes, node.inputs))]
            picked.append(chooser.pick(signature, operands))
        return picked

    def bind(self, sizes: dict[str, int]) -> tuple[Any, ...]:
        """A, the bindings `fn` takes after its inputs: params, buffers, transposes, kernels."""
        return self.bind_params() + self.buffers(sizes)

    @property
    def symbols(self) -> set[str]:
        """The symbolic dims of the inputs (the batch dim "N")."""
        return {d for _, shape, _ in self._specs for d in shape if isinstance(d, str)}

    def sizes(self, feeds: list[torch.Tensor]) -> dict[str, int]:
        """The symbolic dims' sizes in these feeds (in declaration order)."""
        return {d: t.shape[axis] for (_, shape, _), t in zip(self._specs, feeds)
                for axis, d in enumerate(shape) if isinstance(d, str)}

    def __call__(self, *args: torch.Tensor, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._check_params()
        ordered = self.check_feeds(args, feeds)
        target = self._on_device_of(ordered)
        sizes = target.sizes(ordered)
        key = tuple(sorted(sizes.items()))
        if key not in target._arenas:
            target._arenas[key] = target.buffers(sizes)
        try:
            with torch.no_grad():
                outs = target.fn(*ordered, target.bind_params() + target._arenas[key])
        except Exception as e:
            raise target._explain(e) from e
        held = target.layout.output_buffers
        return tuple(o if held[i] is None else o.clone() for i, o in enumerate(outs))


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _change(param: Value, device: torch.device | None) -> str:
    """How a param's tensor differs from what the compiled function was built for."""
    t = param.data
    now, declared = format_type(t.dtype, tuple(t.shape)), format_type(param.dtype, param.shape)
    if t.device != device:
        now, declared = f"{now} on {t.device}", f"{declared} on {device}"
    return f"{param.name} is now {now}, declared {declared}"


def _param_device(graph: Graph) -> torch.device | None:
    devices = {v.data.device for v in graph.params.values()}
    if len(devices) > 1:
        raise GraphError(f"graph {graph.name}: params are on several devices ({sorted(map(str, devices))}); "
                         "move them to one device first")
    return devices.pop() if devices else None


@pauses_gc
def compile(graph: Graph, optimize: bool = True, trace: Callable[[str], object] | None = None,
            reuse: bool = True) -> Compiled:
    """Compile a graph once into a function of torch calls.

    Args:
        graph: the graph to compile; it is not modified (passes run on a copy).
        optimize: run the pass pipeline first; False keeps the graph as written.
        trace: called with the IR text before and after each pass and finally with the
            generated source, e.g. `trace=print`.
        reuse: let a node overwrite an input that dies there (in-place ops), see
            graphdl.passes.memory; False always allocates.

    Returns:
        A `Compiled` callable: `fn(x=..., y=...)` returns the outputs as a tuple.
    """
    if not isinstance(graph, Graph):
        raise GraphError(f"compile takes a gd.Graph, got {type(graph).__name__}")
    if not isinstance(optimize, bool):
        raise GraphError(f"compile: optimize must be True or False, got {type(optimize).__name__}")
    graph.verify()
    if not graph.outputs:
        raise GraphError(f"graph {graph.name} has no outputs; add one with graph.output(value)")
    work, _ = graph.copy()
    if optimize:
        work = pipeline(work, log=trace)
    compiled = lower(work, reuse=reuse)
    if trace is not None:
        trace(f"// source\n{compiled.source}")
    return compiled


def lower(graph: Graph, device: torch.device | None = None, reuse: bool = True,
          arena: bool = False, emitter: Callable[..., _Emitter] | None = None) -> Compiled:
    """Generate, compile and wrap the Python function for `graph` as it stands.

    Args:
        graph: the graph, already optimised or not.
        device: where constants live; by default the params' device (CPU if none).
        reuse: plan in-place ops on dying temporaries (graphdl.passes.memory).
        arena: generate the form fit's training step runs (an `ArenaCompiled`): every
            result an op can write into a given buffer goes into buffers planned by
            liveness (`plan_arena`), made once per batch size and reused at every call.
        emitter: what writes the code, called as `emitter(graph, device, reuse)` in place
            of the form `arena` picks: an instrumented variant (graphdl.probe's, for the
            profiler and the search for a non-finite value) writes the same lines with its
            own between them.

    Each call reads every param's tensor from its slot, which the graph shares with the
    graph it was copied from and the layer that owns the param: a tensor assigned to
    any of them after compiling is what the next call computes with. (The arena form
    takes them, with their transposes, in its bindings: see `ArenaCompiled.bind`.)
    """
    params_on = _param_device(graph)
    writer = (emitter or (_ArenaEmitter if arena else _Emitter))(graph, device or params_on, reuse)
    args, body = writer.function()
    fn, source, filename = _define(graph.name, args, body, writer.env)
    relower = None
    if params_on is None and writer.hoisted:  # constants, but no params to say where they belong
        relower = lambda on: lower(graph, on, reuse, arena, emitter)  # noqa: E731
    return writer.wrap(source, fn, filename, params_on, relower)


class _Emitter:
    """Writes the function for one graph: a name for every value, one line per node (each
    carrying its IR line), `del` after each value's last use; nodes whose inputs are all
    constants are computed now, into the function's globals (`env`).

    This is the plain form (`Compiled`): results are new tensors, params are read from
    their slots at every call. `_ArenaEmitter` is the form fit's step runs.
    """

    header_lines = 2  # the def line, then the body: body[i] is source line i + 2

    def __init__(self, graph: Graph, device: torch.device | None, reuse: bool) -> None:
        self.graph = graph
        self.device = device  # where constants live
        self.env: dict[str, Any] = dict(CODE_GLOBALS)
        self.hoisted = _hoistable(graph)
        self.last_use = last_uses(graph)
        self.inplace = plan_inplace(graph, self.hoisted, self.last_use) if reuse else {}
        self.args: list[str] = []  # the function's arguments: the inputs
        self.body: list[str] = []
        self.names: dict[int, str] = {}  # id(value) -> its Python name
        self.ir_names: dict[int, str] = {}  # id(value) -> its IR name (x, fc0.weight, %3)
        self.line_text: dict[int, tuple[str, Node]] = {}  # generated line -> (IR line, node)

    def function(self) -> tuple[list[str], list[str]]:
        """The function's arguments and body."""
        self._name_values()
        returned = {id(v) for v in self.graph.outputs}
        for k, node in enumerate(self.graph.nodes):
            self._emit(k, node, returned)
        self.body.append(f"return ({', '.join(_owned_outputs(self.graph.outputs, self.names, self.hoisted))},)")
        return self.args, self.body

    def wrap(self, source: str, fn: Callable[..., tuple], filename: str, params_on: torch.device | None,
             relower: Callable[[torch.device], Compiled] | None) -> Compiled:
        return Compiled(self.graph, source, fn, filename, self.line_text, params_on, self.device, relower)

    def _name_values(self) -> None:
        """Python names for the inputs (the function's arguments) and params, IR names for
        every value; each param's slot goes into `env`, and `_read_param` says how the body
        gets its tensor."""
        graph = self.graph
        for i, v in enumerate(graph.inputs.values()):
            self.ir_names[id(v)] = v.name
            self.names[id(v)] = f"i{i}_{_py(v.name)}"
            self.args.append(self.names[id(v)])
        for i, v in enumerate(graph.params.values()):
            self.ir_names[id(v)] = v.name
            self.names[id(v)] = f"p{i}_{_py(v.name)}"
            self.env[f"P{i}"] = v.slot
            if v.users or graph.is_output(v):
                self._read_param(i, v)
        for k, node in enumerate(graph.nodes):
            self.ir_names[id(node.out)] = f"%{k}"

    def _read_param(self, i: int, v: Value) -> None:
        """Read the param's tensor from its slot at every call: a new one may have been assigned."""
        self.body.append(f"{self.names[id(v)]} = P{i}.tensor")

    def _emit(self, k: int, node: Node, returned: set[int]) -> None:
        arg_names = [self.names[id(v)] for v in node.inputs]
        ir_line = format_node(node, self.ir_names)
        if id(node.out) in self.hoisted:
            self.names[id(node.out)] = f"c{k}"
            value = eval(node.op.lower(arg_names, node.attrs, node.inputs), self.env)  # noqa: S307 - registry code
            self.env[f"c{k}"] = value.to(self.device) if self.device is not None else value
            self.body.append(f"# c{k} = {ir_line}")
            return
        code = (node.op.memory.inplace[self.inplace[k]].format(*arg_names) if k in self.inplace
                else self._code(k, node, arg_names))
        self.names[id(node.out)] = f"v{k}"
        self.line_text[self.header_lines + len(self.body)] = ir_line, node
        self.body.append(f"v{k} = {code}  # {ir_line}")
        dead = [self.names[id(v)] for v in dict.fromkeys(node.inputs)
                if self.last_use.get(id(v)) == k and v.node is not None and id(v) not in returned
                and id(v) not in self.hoisted]
        if dead:
            self.body.append("del " + ", ".join(dead))

    def _code(self, k: int, node: Node, arg_names: list[str]) -> str:
        """The expression for node k (not in place): a new tensor."""
        return node.op.lower(arg_names, node.attrs, node.inputs)


class _ArenaEmitter(_Emitter):
    """The arena form (`ArenaCompiled`): `fn(*inputs, A)`, whose first line unpacks A into
    the params, the buffers `plan_arena` gave, and the prepared transposes; each result
    an op can write into a buffer (`out=`) is written there."""

    header_lines = 3  # the def line, A's unpacking, then the body

    def __init__(self, graph: Graph, device: torch.device | None, reuse: bool) -> None:
        super().__init__(graph, device, reuse)
        self.layout = _ArenaLayout(graph, self.hoisted, self.inplace, self.last_use)

    def function(self) -> tuple[list[str], list[str]]:
        args, body = super().function()
        # the params, buffers and their transposes arrive in one tuple
        return [*args, "A"], [f"{', '.join(self.layout.names(self.names))}, = A", *body]

    def wrap(self, source: str, fn: Callable[..., tuple], filename: str, params_on: torch.device | None,
             relower: Callable[[torch.device], Compiled] | None) -> Compiled:
        return ArenaCompiled(self.graph, source, fn, filename, self.line_text, params_on, self.device, relower,
                             layout=self.layout)

    def _read_param(self, i: int, v: Value) -> None:
        pass  # the params arrive in A, bound by ArenaCompiled.bind_params

    def _code(self, k: int, node: Node, arg_names: list[str]) -> str:
        return node.op.code(arg_names, node.attrs, node.inputs, self.layout.out(k), self.layout.transposes(node),
                            self.layout.kernel(k))


def _hoistable(graph: Graph) -> set[int]:
    """Ids of the values whose inputs are all constants: compile computes them once, up
    front. Scalar constants stay 0-d tensors on the device rather than Python literals:
    torch wraps a literal into a new tensor at every call, which measured about 4 µs per
    op slower on CPU. Collectives run at every call, whatever their inputs."""
    hoisted: set[int] = set()
    for node in graph.nodes:
        if not node.op.collective and all(id(v) in hoisted for v in node.inputs):
            hoisted.add(id(node.out))
    return hoisted


def _define(name: str, args: list[str], body: list[str], env: dict[str, Any]) -> tuple[Callable[..., tuple], str, str]:
    """Compile the source of `def name(args): body` and return (the function, its source,
    its filename, under which linecache keeps the source for tracebacks)."""
    filename = f"<graphdl {name} #{next(_counter)}>"
    source = f"def {_py(name)}({', '.join(args)}):\n" + "".join(f"    {ln}\n" for ln in body)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # The function lands in its own namespace: a graph called torch, c0 or P0 must not
    # overwrite the module or the constants the function reads from env.
    namespace: dict[str, Any] = {}
    exec(builtins.compile(source, filename, "exec"), env, namespace)  # noqa: S102
    return namespace[_py(name)], source, filename


def _output_buffers(graph: Graph, lives_in: dict[int, int], hoisted: set[int]) -> list[int | None]:
    """The arena buffer each output is returned in: a value in the arena returned as it
    is (by `_owned_outputs`: its first return, a node result in new storage), else None."""
    names = {id(v): str(lives_in.get(id(v))) for v in graph.outputs}
    exprs = _owned_outputs(graph.outputs, names, hoisted)
    return [lives_in[id(v)] if id(v) in lives_in and e == names[id(v)] else None
            for v, e in zip(graph.outputs, exprs)]


def _owned_outputs(outputs: list[Value], names: dict[int, str], hoisted: set[int]) -> list[str]:
    """The expression returning each output so that every returned tensor owns its memory.

    A node's result in new storage is returned as it is, the first time. A param, input, constant
    or view (transpose, expand) is a dense copy, never aliasing graphdl's storage; so is
    a value returned twice (`output(a, a)`, or two gradients that CSE found equal), so
    that updating one output in place never moves another.
    """
    exprs, returned = [], set()
    for v in outputs:
        owned = v.node is not None and id(v) not in hoisted and v.node.op.memory.new_storage and id(v) not in returned
        exprs.append(names[id(v)] if owned else f"{names[id(v)]}.clone(memory_format=torch.contiguous_format)")
        returned.add(id(v))
    return exprs


def _py(name: str) -> str:
    """A Python identifier for an IR name such as fc0.weight."""
    py = name.replace(".", "_") if not name[0].isdigit() else "_" + name.replace(".", "_")
    return py + "_" if keyword.iskeyword(py) else py

