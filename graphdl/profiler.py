"""A profiler on the IR: the time of every node of a compiled graph or training step.

`gd.profile(model, X, Y)` times fit's own training step (forward, loss, backward in the
arena form fit runs, then the optimizer's update) on the first batch of X, Y;
`gd.profile(graph_or_compiled, x=..., ...)` times a compiled graph's calls. The code
timed is the code that runs: graphdl.probe lowers the same graph with a timer read
before and after each node's line (`time.perf_counter_ns`; on CUDA after a
synchronize), and checks that without those lines it is the very source the step runs.

The timed runs alternate with plain ones. Each node's time is its median over the
timed runs, less what a timer read costs inside the interval it measures (measured once
per process); the update is timed as its own row; and what no node accounts for in a
timed step (calling the generated function, unpacking its bindings, freeing values),
less the timers' cost outside their intervals, is the "python" row: the dispatch
overhead graphdl adds around the kernels. The rows add up to `Profile.seconds`; the
plain runs' median, `Profile.measured`, is what that should be, within noise.

Each node also gets its FLOPs and bytes (from its op and its shapes at this batch size)
and the rate they were done at, against the machine's measured GEMM and copy rates
(`machine_rates`, measured once per device, dtype and thread count). The report
(`Profile`) prints as a table, gives its rows as data (`rows`, `by_layer`, `by_op`),
finds the critical path, and draws as a heat-coloured picture:
`gd.to_dot(report.graph, profile=report)`.

Nothing here runs, or is even imported, unless a profile is asked for.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .checks import GraphError, dtype_name, format_shape, whole
from .compile import ArenaCompiled, Compiled, _hoistable, compile
from .ir import Graph, Node, Value
from .ops import products
from .optim import SGD, checked_optimizer
from .probe import lower_probed, strip
from .settings import check_data, class_targets, model_loss
from .step import Model, TrainStep, _Arena
from .text import format_node
from .train import threads_for

# -- the machine's rates ------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """What one device does at best, measured: a square matrix product's FLOP/s and a
    large copy's bytes/s (read and written)."""

    device: str
    dtype: torch.dtype
    threads: int
    gemm_flops: float  # FLOP/s
    copy_bytes: float  # bytes/s

    def __str__(self) -> str:
        return (f"GEMM {_rate(self.gemm_flops, 'FLOP/s')}, copy {_rate(self.copy_bytes, 'B/s')} "
                f"({dtype_name(self.dtype)}, {self.device}, {self.threads} thread{'s' if self.threads > 1 else ''})")


_RATES: dict[tuple[str, torch.dtype, int], Rates] = {}


def machine_rates(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Rates:
    """The device's GEMM and copy rates, measured on first use (the best of 15 runs each,
    the GEMM by the faster of the products' kernels; about 0.3 s on a CPU) and cached
    for the process, per device, dtype and torch's thread count. Measured on a busy
    machine they come out low, and a node's share of them can then read above 100 %."""
    device = torch.device(device)
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _RATES:
        cuda = device.type == "cuda"
        n, elements = (4096, 64 << 20) if cuda else (512, 4 << 20)
        gen = torch.Generator().manual_seed(0)  # its own: a profile leaves torch's global RNG as it was
        a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        src, dst = torch.ones(elements, device=device, dtype=dtype), torch.empty(elements, device=device, dtype=dtype)
        # the faster of the kernels graphdl's products choose between (graphdl.ops.products)
        gemm = min(_best(lambda w=w: w(a, b, out=out), device) for w in products.mm.candidates(a, b, out=out))
        copying = _best(lambda: dst.copy_(src), device)
        _RATES[key] = Rates(str(device), dtype, key[2], 2 * n**3 / gemm, 2 * src.nbytes / copying)
    return _RATES[key]


def _best(run: Callable[[], Any], device: torch.device, repeats: int = 15) -> float:
    """The shortest of `repeats` timed runs, in seconds, after one to warm up."""
    sync = _synchronizer(device)
    run()
    sync()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def _synchronizer(device: torch.device | None) -> Callable[[], None]:
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# -- each node's work ---------------------------------------------------------------------

# held against the GEMM rate, the rest against copying
_PRODUCTS = {ops.matmul, ops.matmul_tn, ops.matmul_nt, ops.addmm, ops.addmm_tanh}
# Convolutions, held against the GEMM rate too: (the input of output shape, the weight's position).
_CONVS = {ops.conv1d: (None, 1), ops.conv2d: (None, 1), ops.conv_backward_input: (0, 2),
          ops.conv_backward_weight: (0, 2)}
# No work of their own (nor broadcast_like without mean); a reshape of a value whose layout
# asks for a copy does one, counted as none.
_VIEWS = {ops.transpose, ops.unpack, ops.const, ops.reshape, ops.flatten, ops.permute}
# FLOPs per output element of the elementwise ops; per input element of the reductions and losses.
_PER_ELEMENT = {op: 1 for op in (ops.add, ops.sub, ops.mul, ops.div, ops.neg, ops.exp, ops.log, ops.absolute,
                                 ops.sign, ops.greater, ops.relu, ops.tanh, ops.sigmoid, ops.relu_backward,
                                 ops.tanh_backward, ops.sigmoid_backward)}
_PER_ELEMENT.update({ops.zeros_like: 0, ops.softmax: 5, ops.log_softmax: 5, ops.mse_backward: 3})
_PER_INPUT = {ops.reduce_sum: 1, ops.reduce_mean: 1, ops.sum_to: 1, ops.mse: 3, ops.mae: 3, ops.mbe: 2,
              ops.bce_with_logits: 6, ops.cross_entropy: 6, ops.allreduce_start: 0, ops.allreduce_wait: 0}


def node_work(node: Node, sizes: Mapping[str, int]) -> tuple[int, int]:
    """(FLOPs, bytes read and written) of one node with its symbolic dims bound to
    `sizes`: 2mkn for a matrix product (times its batch; plus mn for addmm's bias); for a
    convolution or either of its backward ops, two per output element and weight element
    of one output channel (2·N·out·spatial·C/groups·k); one FLOP per element for
    elementwise ops (five for softmax), per input element for reductions; nothing for
    views. An op not listed counts as elementwise."""
    op = node.op
    if op in _VIEWS or (op is ops.broadcast_like and not node.attrs.get("mean")):
        return 0, 0
    ins = [_numel(v, sizes) for v in node.inputs]
    out = _numel(node.out, sizes)
    moved = (sum(ins) + out) * node.out.dtype.itemsize
    if op in _PRODUCTS:
        a, b = node.inputs[-2:]
        (m, k), n = _dims(a, sizes, transposed=op is ops.matmul_tn), _dims(b, sizes, transposed=op is ops.matmul_nt)[1]
        batch = out // (m * n) if m * n else 0  # a batched matmul's leading dims
        return batch * (2 * m * k * n + (m * n if op in (ops.addmm, ops.addmm_tanh) else 0)), moved
    if op in _CONVS:
        shaped, weight = _CONVS[op]
        w = node.inputs[weight]
        per_output = _numel(w, sizes) // max(_size(w.shape[0], sizes), 1)  # C/groups · kernel
        return 2 * (out if shaped is None else ins[shaped]) * per_output, moved
    if op in _PER_INPUT:
        return _PER_INPUT[op] * ins[0], moved
    return _PER_ELEMENT.get(op, 1) * out, moved


def _numel(v: Value, sizes: Mapping[str, int]) -> int:
    return math.prod(_size(d, sizes) for d in v.shape)


def _size(d: int | str, sizes: Mapping[str, int]) -> int:
    return sizes.get(d, 1) if isinstance(d, str) else d


def _dims(v: Value, sizes: Mapping[str, int], transposed: bool) -> tuple[int, int]:
    rows, cols = (sizes.get(d, 1) if isinstance(d, str) else d for d in v.shape[-2:])
    return (cols, rows) if transposed else (rows, cols)


# -- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of a profile: a node (`node` is its k in `%k` of the profiled graph), the
    optimizer's update, or the python dispatch around them. Times in seconds."""

    node: int | None
    text: str  # the IR line, or what the line is
    op: str
    layer: str  # the node's scope ("2:Linear", "loss"), "optimizer", or "(python)"
    phase: str  # "forward", "backward", "update" or "python"
    seconds: float
    flops: int
    bytes: int
    bound: str  # the machine rate it is held against: "gemm" or "copy" ("" for none)
    peak: float | None  # the rate achieved, as a fraction of that machine rate

    @property
    def flop_rate(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else 0.0

    @property
    def byte_rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Group:
    """The rows of one layer, op or phase, added up."""

    name: str
    seconds: float
    share: float  # of the step's time
    flops: int
    bytes: int
    rows: int


class Profile:
    """A profile's result: per-node rows and their roll-ups.

    Attributes:
        graph: the graph that was timed (compile's optimised copy; node %k of its text is
            row k), which `gd.to_dot(report.graph, profile=report)` draws heat-coloured.
        rows: one `Row` per node, then the update (training steps), then "python".
        seconds: what the rows add up to: one step (or call) as measured with the timers
            in, less what the timers themselves cost.
        measured: the median time of one step (or call) run as it is, without timers, in
            runs alternated with the timed ones: what `seconds` should be, within noise.
        timer: what one node's timer pair costs (inside the time it measures, outside).
        rates: the machine's rates the nodes are held against.
        what: what was timed, in words; steps: how many steps each median is of.
    """

    def __init__(self, graph: Graph, rows: list[Row], measured: float, timer: tuple[float, float], rates: Rates,
                 what: str, steps: int) -> None:
        self.graph, self.rows, self.measured, self.timer = graph, rows, measured, timer
        self.rates, self.what, self.steps = rates, what, steps
        self.seconds = sum(r.seconds for r in rows)
        self._by_node = {graph.nodes[r.node]: r for r in rows if r.node is not None}

    def by_layer(self) -> list[Group]:
        """The time per layer (forward and backward nodes together), the slowest first."""
        return self._groups(lambda r: r.layer)

    def by_op(self) -> list[Group]:
        """The time per op ("update" and "python" as their own), the slowest first."""
        return self._groups(lambda r: r.op)

    def by_phase(self) -> list[Group]:
        """forward, backward, update and python."""
        return self._groups(lambda r: r.phase)

    def _groups(self, key: Callable[[Row], str]) -> list[Group]:
        groups: dict[str, list[Row]] = {}
        for r in self.rows:
            groups.setdefault(key(r), []).append(r)
        total = self.seconds or 1.0
        out = [Group(name, sum(r.seconds for r in rs), sum(r.seconds for r in rs) / total,
                     sum(r.flops for r in rs), sum(r.bytes for r in rs), len(rs)) for name, rs in groups.items()]
        return sorted(out, key=lambda g: -g.seconds)

    def row(self, node: Node) -> Row | None:
        """The row of `node` (a node of `graph`), or None where it was not timed (a
        constant, computed once at compile time)."""
        return self._by_node.get(node)

    def critical_path(self) -> tuple[list[int], float]:
        """The chain of nodes (by k) whose times add up to the most: how long the step
        would take if everything off that chain ran alongside it."""
        return critical_path(self.graph, {r.node: r.seconds for r in self.rows if r.node is not None})

    def table(self, top: int = 8, by: Sequence[str] = ("layer", "op")) -> str:
        """The report as text: the totals, the time by layer, op or phase (`by`), the `top`
        slowest nodes and the critical path."""
        if isinstance(by, str) or not set(by) <= {"layer", "op", "phase"}:
            raise ValueError(f"by must name roll-ups from 'layer', 'op', 'phase', e.g. by=('layer',), got {by!r}")
        whole("top", top, 0)
        inside, outside = self.timer
        lines = [f"profile of {self.what}",
                 f"step: {_time(self.seconds)} from the timed runs, {_time(self.measured)} measured without timers "
                 f"(medians of {self.steps} steps, alternated; each timer costs {_time(inside + outside)}, taken off)",
                 f"machine: {self.rates}", ""]
        rollups = {"layer": self.by_layer, "op": self.by_op, "phase": self.by_phase}
        for title, groups in ((name, rollups[name]()) for name in by):
            lines.append(f"{'by ' + title:<22}{'time':>11}{'share':>8}{'FLOP':>10}{'bytes':>10}")
            lines += [f"  {g.name:<20}{_time(g.seconds):>11}{g.share:>8.1%}{_count(g.flops):>10}"
                      f"{_count(g.bytes):>10}" for g in groups]
            lines.append(f"  {'total':<20}{_time(sum(g.seconds for g in groups)):>11}"
                         f"{sum(g.share for g in groups):>8.1%}")
            lines.append("")
        slowest = sorted((r for r in self.rows if r.node is not None), key=lambda r: -r.seconds)[:top]
        if slowest:
            lines.append(f"{'slowest nodes':<22}{'time':>11}{'share':>8}{'rate':>14}{'of peak':>9}  IR")
        for r in slowest:
            rate = _rate(r.flop_rate, "FLOP/s") if r.bound == "gemm" else _rate(r.byte_rate, "B/s")
            peak = f"{r.peak:.1%}" if r.peak is not None else ""
            lines.append(f"  {'%' + str(r.node) + ' ' + r.op:<20}{_time(r.seconds):>11}"
                         f"{r.seconds / (self.seconds or 1.0):>8.1%}{rate:>14}{peak:>9}  {r.text}")
        path, length = self.critical_path()
        lines += ["", f"critical path: {_time(length)} over {len(path)} nodes "
                      f"({length / (self.seconds or 1.0):.0%} of the step)"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<Profile of {self.what}: {_time(self.seconds)} a step, {len(self.rows)} rows>"


def critical_path(graph: Graph, seconds: Mapping[int, float]) -> tuple[list[int], float]:
    """The heaviest chain of data dependencies through `graph`'s nodes, each node weighing
    `seconds[k]` (0 where absent): (its nodes' k in order, their total). One walk in the
    graph's order, which is topological."""
    made_by = {id(n.out): k for k, n in enumerate(graph.nodes)}
    best: list[tuple[float, int | None]] = []  # per node: (the heaviest chain ending there, the node before it)
    for k, node in enumerate(graph.nodes):
        before = [(best[made_by[id(v)]][0], made_by[id(v)]) for v in node.inputs if id(v) in made_by]
        heaviest = max(before, default=(0.0, None), key=lambda t: t[0])
        best.append((heaviest[0] + seconds.get(k, 0.0), heaviest[1]))
    if not best:
        return [], 0.0
    end = max(range(len(best)), key=lambda k: best[k][0])
    path: list[int] = []
    at: int | None = end
    while at is not None:
        path.append(at)
        at = best[at][1]
    return path[::-1], best[end][0]


# -- timing -------------------------------------------------------------------------------------


class _Timer:
    """The probe: a timer read before each node's line, and its time kept after it."""

    def __init__(self, nodes: int, device: torch.device | None) -> None:
        self.times = [0] * nodes
        cuda = device is not None and device.type == "cuda"
        self.sync = ["_sync()"] if cuda else []
        self.env = {"_ns": time.perf_counter_ns, "_T": self.times, "_sync": _synchronizer(device)}

    def before(self, k: int, node: Node) -> list[str]:
        return [*self.sync, "_t0 = _ns()"]

    def after(self, k: int, node: Node, out: str, inputs: list[str]) -> list[str]:
        return [*self.sync, f"_T[{k}] = _ns() - _t0"]


_TIMER_COST: dict[str, tuple[float, float]] = {}


def _timer_cost(device: torch.device | None) -> tuple[float, float]:
    """What a node's timer pair costs, in seconds: (inside the interval it measures, which
    each node's time is over by; outside it, which the step is over by)."""
    key = str(device)
    if key not in _TIMER_COST:
        pairs = 64
        timer = _Timer(pairs, device)
        body = "".join(f"    {line}\n" for k in range(pairs)
                       for line in (*timer.before(k, None), *timer.after(k, None, "", [])))  # type: ignore[arg-type]
        namespace: dict[str, Any] = {}
        exec(f"def empty():\n{body}", dict(timer.env), namespace)  # noqa: S102 - our own code
        inside, whole_pairs = [], []
        for _ in range(100):
            started = time.perf_counter_ns()
            namespace["empty"]()
            whole_pairs.append((time.perf_counter_ns() - started) / pairs)
            inside.append(statistics.median(timer.times))
        within = statistics.median(inside) * 1e-9
        _TIMER_COST[key] = within, max(statistics.median(whole_pairs) * 1e-9 - within, 0.0)
    return _TIMER_COST[key]


@dataclass
class _Runs:
    """What the timed runs measured, in ns: each step's node intervals, its update, its
    whole time; and the plain runs' whole times."""

    nodes: list[list[int]]
    updates: list[int]
    totals: list[int]
    plain: list[int]

    def rows(self, graph: Graph, sizes: Mapping[str, int], device: torch.device | None, rates: Rates,
             python: str) -> list[Row]:
        """A row per timed node (its median less the timer's cost inside it, its work and
        rate), the update's (if any) and python's: per step, the time outside every node
        and the update, less the timers' cost there."""
        inside, outside = _timer_cost(device)
        hoisted = _hoistable(graph)
        timed = [k for k, n in enumerate(graph.nodes) if id(n.out) not in hoisted]
        rows = []
        names = _ir_names(graph)
        for k in timed:
            node = graph.nodes[k]
            seconds = max(statistics.median(s[k] for s in self.nodes) * 1e-9 - inside, 0.0)
            flops, moved = node_work(node, sizes)
            bound = "gemm" if node.op in _PRODUCTS or node.op in _CONVS else "copy" if moved else ""
            rate = flops / seconds if bound == "gemm" else moved / seconds if bound else 0.0
            peak = None if not bound or seconds <= 0 else \
                rate / (rates.gemm_flops if bound == "gemm" else rates.copy_bytes)
            rows.append(Row(k, format_node(node, names), node.op.name, node.scope or "(no layer)",
                            "backward" if node.backward else "forward", seconds, flops, moved, bound, peak))
        rest = [total - sum(s[k] for k in timed) - update for s, total, update in zip(self.nodes, self.totals,
                                                                                       self.updates)]
        rows.append(Row(None, python, "python", "(python)", "python",
                        statistics.median(rest) * 1e-9 - len(timed) * outside, 0, 0, "", None))
        return rows


def _ir_names(graph: Graph) -> dict[int, str]:
    names = {id(v): v.name for v in (*graph.inputs.values(), *graph.params.values())}
    names.update({id(n.out): f"%{k}" for k, n in enumerate(graph.nodes)})
    return names


# -- what is profiled -----------------------------------------------------------------------------


def profile(target: Any, *feeds: torch.Tensor, loss: Any = None, optimizer: Any = None, steps: int = 20,
            batch_size: int = 32, threads: int | None = None, clip_norm: float | None = None,
            clip_value: float | None = None, accumulate: int = 1, **named: torch.Tensor) -> Profile:
    """Time every IR node of a model's training step or of a compiled graph.

    Args:
        target: a model (`gd.Sequential`) or a `gd.TrainStep`: its training step as fit
            runs it (in training mode, its buffers' next values written with the update),
            on the first `batch_size` rows of the feeds X, Y; or a `gd.Graph` (compiled
            first) or `gd.Compiled`, called with the feeds as inputs.
        feeds: X, Y for a model; a graph's inputs by position (or by name, `named`).
        loss, optimizer: a model's loss (default its own, else MSE) and optimizer
            (default `SGD()`; a copy is used, so the one given keeps its state).
        steps: how many steps (or calls) are timed with the timers, and as many without.
        batch_size: the rows of X, Y a training step is timed on (at most len(X)).
        threads: torch CPU threads, as for `fit` (by default the thread count fit uses).
        clip_norm, clip_value: a model's step clips as fit's would (timed in the update's
            row); a TrainStep's own settings are used for it.
        accumulate: 1 only: a step of an accumulating run adds its gradients up and
            updates once a group, so no one step is what a step costs (a ValueError).

    Returns:
        A `Profile`. The model's params, buffers (BatchNorm's running statistics,
        Dropout's key) and the optimizer's state are put back as they were: profiling
        does not train.

    Raises:
        ValueError: a bad argument, named, or a step that cannot be timed as one step
            (accumulate > 1, a data-parallel TrainStep); GraphError: feeds that do not
            fit the graph.
    """
    steps = whole("steps", steps, 1)
    if isinstance(target, Graph):
        return _profile_calls(compile(target), feeds, named, steps)
    if isinstance(target, Compiled):
        return _profile_calls(target, feeds, named, steps)
    if isinstance(target, (TrainStep, Model)):
        if named or len(feeds) != 2:
            raise ValueError(f"profile of a model takes the data as profile(model, X, Y), got {len(feeds)} "
                             f"positional feed(s){' and ' + ', '.join(named) if named else ''}")
        if isinstance(target, TrainStep):
            if target.distributed:
                raise ValueError("profile of a data-parallel TrainStep (distributed=True) is not available: its "
                                 "all-reduces wait on the other ranks; profile the model in one process")
            clip_norm = target.clip_norm if clip_norm is None else clip_norm
            clip_value = target.clip_value if clip_value is None else clip_value
            accumulate = target.accumulate if accumulate == 1 else accumulate
        if whole("accumulate", accumulate, 1) > 1:
            raise ValueError(f"profile with accumulate={accumulate} is not available: an accumulating step adds "
                             "its gradients into the group's and updates once every accumulate steps, so no single "
                             "step's time is the step's cost; profile with accumulate=1 (the forward and backward "
                             "are the same)")
        return _profile_training(target, *feeds, loss, optimizer, steps, whole("batch_size", batch_size, 1), threads,
                                 clip_norm, clip_value)
    raise ValueError(f"profile takes a model (gd.Sequential), a gd.TrainStep, a gd.Graph or a compiled graph, "
                     f"got {type(target).__name__}")


def _profile_training(target: Any, X: torch.Tensor, Y: torch.Tensor, loss: Any, optimizer: Any, steps: int,
                      batch_size: int, threads: int | None, clip_norm: float | None,
                      clip_value: float | None) -> Profile:
    model = target.model if isinstance(target, TrainStep) else target
    loss = target.loss if isinstance(target, TrainStep) and loss is None else model_loss(model, loss)
    if optimizer is None:
        optimizer = target.optimizer if isinstance(target, TrainStep) else SGD()
    optimizer = copy.deepcopy(checked_optimizer(optimizer))
    Y = class_targets(model, Y)
    check_data(model, X, Y)
    batch = min(batch_size, len(X))
    feed = (X[:batch], Y[:batch])
    lr = optimizer.lr
    with threads_for(model, batch, threads), torch.inference_mode():
        step = TrainStep(model, loss, optimizer, capture=False, clip_norm=clip_norm, clip_value=clip_value)
        step.steps([], lr)  # bound to the model as it is now
        state = [*step.params, *step.state]  # the optimizer is a copy: its state may go
        saved = [t.clone() for t in state]
        clipping = "".join(f", {name}={v:g}" for name, v in (("clip_norm", clip_norm), ("clip_value", clip_value))
                           if v is not None)
        try:
            return _time_training(step, feed, lr, steps, f"the training step of {step.compiled.graph.name} "
                                  f"({type(loss).__name__}, {type(optimizer).__name__} lr={lr:g}{clipping}) "
                                  f"at batch {batch}")
        finally:
            if state:
                torch._foreach_copy_(state, saved)


def _time_training(step: TrainStep, feed: tuple[torch.Tensor, torch.Tensor], lr: float, steps: int,
                   what: str) -> Profile:
    graph, device = step.compiled.graph, step.arena_fn.device or feed[0].device
    timer = _Timer(len(graph.nodes), device)
    timed_fn = lower_probed(graph, timer, arena=True)
    assert strip(timed_fn.source) == step.arena_fn.source, "the timed step is not the step fit runs"
    batch, optimizer = len(feed[0]), step.optimizer
    plain, timed = (_Arena(fn, batch, optimizer, step.params, step._control, step._first_grad)
                    for fn in (step.arena_fn, timed_fn))
    sync = _synchronizer(device)
    optimizer.set_lr(lr)  # once, as fit's loop sets it for an epoch

    def run(arena: _Arena) -> int:
        """One step as fit's loop runs it (`TrainStep._plain_steps`: the buffers' next values
        written, the gradients made at the call copied into the arena, then the update
        planned on it, clipping first); returns when its update began."""
        out = arena(feed)
        updating = time.perf_counter_ns()
        step.write_state(out)
        if arena.take is not None:
            arena.take(out)
        arena.update()
        sync()
        return updating

    for arena in (plain, timed, plain, timed):  # warm up both
        run(arena)
    runs = _Runs([], [], [], [])
    for _ in range(steps):  # alternated, so that a change in the machine's load falls on both
        started = time.perf_counter_ns()
        run(plain)
        runs.plain.append(time.perf_counter_ns() - started)
        started = time.perf_counter_ns()
        updating = run(timed)
        ended = time.perf_counter_ns()
        runs.nodes.append(list(timer.times))
        runs.updates.append(ended - updating)
        runs.totals.append(ended - started)
    rates = machine_rates(device, feed[0].dtype)
    rows = runs.rows(graph, {d: batch for d in step.arena_fn.symbols}, device, rates,
                     "calling the generated function: its bindings unpacked, values freed, outputs returned")
    update_s = statistics.median(runs.updates) * 1e-9
    # The update reads each param and gradient and writes the param, and reads and writes
    # the optimizer's state; the buffers' next values are copied; clipping reads the
    # gradients again (and clip_value writes them): a count of bytes, not of every pass.
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params = nbytes(step.params)
    moved = 3 * params + 2 * nbytes(optimizer.state_tensors()) + 2 * nbytes(step.state) \
        + params * (2 * (step.clip_value is not None) + 2 * (step.clip_norm is not None))
    parts = ["the optimizer's update of", f"{len(step.params)} params"]
    if step.state:
        parts.insert(0, f"{len(step.state)} buffers written,")
    if step.clip_norm is not None or step.clip_value is not None:
        parts.insert(0, "gradients clipped,")
    rows.insert(-1, Row(None, " ".join(parts), "update", "optimizer", "update", update_s, 0, moved, "copy",
                        moved / update_s / rates.copy_bytes if update_s > 0 else None))
    return Profile(graph, rows, statistics.median(runs.plain) * 1e-9, _timer_cost(device), rates, what, steps)


def _profile_calls(compiled: Compiled, args: Sequence[torch.Tensor], named: dict[str, torch.Tensor],
                   steps: int) -> Profile:
    ordered = compiled.check_feeds(tuple(args), dict(named))
    graph = compiled.graph
    device = compiled.device or (ordered[0].device if ordered else None)
    timer = _Timer(len(graph.nodes), device)
    timed = _matching(graph, timer, device, isinstance(compiled, ArenaCompiled), compiled.source)
    sizes = {d: t.shape[axis] for v, t in zip(graph.inputs.values(), ordered)
             for axis, d in enumerate(v.shape) if isinstance(d, str)}
    sync = _synchronizer(device)
    compiled(*ordered)
    timed(*ordered)
    runs = _Runs([], [], [], [])
    for _ in range(steps):  # alternated, so that a change in the machine's load falls on both
        started = time.perf_counter_ns()
        compiled(*ordered)
        sync()
        runs.plain.append(time.perf_counter_ns() - started)
        started = time.perf_counter_ns()
        timed(*ordered)
        sync()
        runs.totals.append(time.perf_counter_ns() - started)
        runs.nodes.append(list(timer.times))
        runs.updates.append(0)
    dtype = next((v.dtype for v in graph.inputs.values()), torch.float32)
    rates = machine_rates(device or "cpu", dtype)
    rows = runs.rows(graph, sizes, device, rates,
                     "the call: feeds and params checked, the generated function called, outputs returned")
    feeds = ", ".join(f"{n}: {format_shape(tuple(t.shape))}" for n, t in zip(graph.inputs, ordered))
    return Profile(graph, rows, statistics.median(runs.plain) * 1e-9, _timer_cost(device), rates,
                   f"graph {graph.name} called on {feeds or 'no inputs'}", steps)


def _matching(graph: Graph, timer: _Timer, device: torch.device | None, arena: bool, source: str) -> Compiled:
    """The timed code of the compiled function whose source is `source` (compiled with
    in-place reuse, the default, or without)."""
    for reuse in (True, False):
        timed = lower_probed(graph, timer, device, reuse=reuse, arena=arena)
        if strip(timed.source) == source:
            return timed
    raise GraphError(f"graph {graph.name}: cannot rebuild the compiled function's code to time it; "
                     "profile the graph itself (gd.profile(graph, ...)) instead")


# -- numbers as the table shows them ---------------------------------------------------------------


def _time(seconds: float) -> str:
    magnitude = abs(seconds)
    if magnitude >= 1:
        return f"{seconds:.2f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}" if n else "-"


def _rate(per_second: float, unit: str) -> str:
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if per_second >= size:
            return f"{per_second / size:.3g} {prefix}{unit}"
    return f"{per_second:.3g} {unit}"
