"""Where NaN and inf come from: found after the fact, and foreseen.

After a divergence, `fit` replays the batch that went wrong through `first_nonfinite`:
the step's graph lowered with a check after every node (graphdl.probe), which names the
first node whose result is not finite, its op, layer and the line that built it, with
the range of each of its inputs and what that range suggests ("log of a value <= 0",
"division by zero", "exp overflow"). It runs only then: a run that stays finite never
compiles it.

Before any run, `check_numerics(graph)` reads the graph alone: an interval for every
value (inputs and trained params unbounded, constants known, relu >= 0, tanh in
[-1, 1], sigmoid and softmax in [0, 1], exp >= 0, mse >= 0, ...; each computed in the
value's dtype, so that exp and sigmoid of a very negative value are 0, as they are in
float32), and a finding for each log or division of a value that can be <= 0 (or 0)
and each exp of a value that can overflow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .checks import all_finite, dtype_name, real
from .ir import Graph, Node
from .probe import lower_probed
from .text import format_node

# -- intervals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The values a tensor may hold: every element in [lo, hi] (either end may be infinite)."""

    lo: float
    hi: float

    def __str__(self) -> str:
        return f"[{_number(self.lo)}, {_number(self.hi)}]"


ANY = Range(-math.inf, math.inf)


def _number(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.3g}"


def _times(x: float, y: float) -> float:
    """x * y, with 0 * inf = 0: an end at exactly 0 bounds the product there."""
    return 0.0 if x == 0 or y == 0 else x * y


def _mul(a: Range, b: Range) -> Range:
    products = [_times(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Range(min(products), max(products))


def _add(a: Range, b: Range) -> Range:
    return Range(a.lo + b.lo, a.hi + b.hi)


def _neg(a: Range) -> Range:
    return Range(-a.hi, -a.lo)


def _div(a: Range, b: Range) -> Range:
    if b.lo <= 0 <= b.hi:
        return ANY
    return _mul(a, Range(1 / b.hi, 1 / b.lo))


def _square(a: Range) -> Range:
    ends = (a.lo * a.lo, a.hi * a.hi)
    return Range(0.0 if a.lo <= 0 <= a.hi else min(ends), max(ends))


def _abs(a: Range) -> Range:
    if a.lo >= 0:
        return a
    if a.hi <= 0:
        return _neg(a)
    return Range(0.0, max(-a.lo, a.hi))


def _hull(a: Range, b: Range) -> Range:
    return Range(min(a.lo, b.lo), max(a.hi, b.hi))


ZERO = Range(0.0, 0.0)


def _monotone(fn: Callable[[torch.Tensor], torch.Tensor], a: Range, dtype: torch.dtype) -> Range:
    """An increasing function's range, computed in the value's dtype (exp(-200) is 0 in float32)."""
    lo, hi = fn(torch.tensor([a.lo, a.hi], dtype=dtype)).tolist()
    return Range(lo if not math.isnan(lo) else -math.inf, hi if not math.isnan(hi) else math.inf)


def _sum(a: Range, count: int | None) -> Range:
    """The range of a sum of `count` elements of range `a` (None: some number >= 1 unknown
    until the graph runs, such as the batch size)."""
    if count is not None:
        return Range(_times(a.lo, count), _times(a.hi, count))
    return Range(a.lo if a.lo >= 0 else -math.inf, a.hi if a.hi <= 0 else math.inf)


def _count(shape: Sequence[Any]) -> int | None:
    return math.prod(shape) if all(isinstance(d, int) for d in shape) else None


def _reduced(node: Node) -> int | None:
    """How many elements of the input each element of a reduction's result adds up."""
    x = node.inputs[0]
    if node.op is ops.sum_to:
        total, out = _count(x.shape), _count(node.out.shape)
        return None if total is None or out is None else total // max(out, 1)
    axis = node.attrs.get("axis")
    axes = range(x.ndim) if axis is None else axis
    return _count([x.shape[a] for a in axes])


def _product(a: Range, b: Range, inner: Any) -> Range:
    return _sum(_mul(a, b), inner if isinstance(inner, int) else None)


Rule = Callable[[Node, list[Range]], Range]

RULES: dict[Any, Rule] = {
    ops.const: lambda n, r: Range(n.attrs["value"], n.attrs["value"]),
    ops.add: lambda n, r: _add(*r),
    ops.sub: lambda n, r: _add(r[0], _neg(r[1])),
    ops.mul: lambda n, r: _mul(*r),
    ops.div: lambda n, r: _div(*r),
    ops.neg: lambda n, r: _neg(r[0]),
    ops.exp: lambda n, r: _monotone(torch.exp, r[0], n.out.dtype),
    ops.log: lambda n, r: _monotone(torch.log, Range(max(r[0].lo, 0.0), max(r[0].hi, 0.0)), n.out.dtype),
    ops.absolute: lambda n, r: _abs(r[0]),
    ops.sign: lambda n, r: Range(float(math.copysign(1, r[0].lo)) if r[0].lo else 0.0,
                                 float(math.copysign(1, r[0].hi)) if r[0].hi else 0.0),
    ops.greater: lambda n, r: Range(0.0, 1.0),
    ops.relu: lambda n, r: Range(max(r[0].lo, 0.0), max(r[0].hi, 0.0)),
    ops.tanh: lambda n, r: _monotone(torch.tanh, r[0], n.out.dtype),
    ops.sigmoid: lambda n, r: _monotone(torch.sigmoid, r[0], n.out.dtype),
    ops.softmax: lambda n, r: Range(0.0, 1.0),
    ops.log_softmax: lambda n, r: Range(-math.inf, 0.0),
    ops.zeros_like: lambda n, r: ZERO,
    ops.matmul: lambda n, r: _product(r[0], r[1], n.inputs[0].shape[-1]),
    ops.matmul_tn: lambda n, r: _product(r[0], r[1], n.inputs[0].shape[-2]),
    ops.matmul_nt: lambda n, r: _product(r[0], r[1], n.inputs[0].shape[-1]),
    ops.addmm: lambda n, r: _add(r[0], _product(r[1], r[2], n.inputs[1].shape[-1])),
    ops.addmm_tanh: lambda n, r: _monotone(torch.tanh, _add(r[0], _product(r[1], r[2], n.inputs[1].shape[-1])),
                                           n.out.dtype),
    ops.transpose: lambda n, r: r[0],
    ops.unpack: lambda n, r: r[0],
    ops.reduce_sum: lambda n, r: _sum(r[0], _reduced(n)),
    ops.sum_to: lambda n, r: _sum(r[0], _reduced(n)),
    ops.reduce_mean: lambda n, r: r[0],
    ops.broadcast_like: lambda n, r: _hull(r[0], ZERO) if n.attrs.get("mean") else r[0],
    ops.mse: lambda n, r: _square(_add(r[0], _neg(r[1]))),
    ops.mae: lambda n, r: _abs(_add(r[0], _neg(r[1]))),
    ops.mbe: lambda n, r: _add(r[0], _neg(r[1])),
    # >= 0 for targets that are probabilities (in [0, 1]; cross-entropy's rows of them >= 0)
    ops.bce_with_logits: lambda n, r: Range(0.0, math.inf) if 0 <= r[1].lo and r[1].hi <= 1 else ANY,
    ops.cross_entropy: lambda n, r: Range(0.0, math.inf) if r[1].lo >= 0 else ANY,
    ops.relu_backward: lambda n, r: _hull(r[0], ZERO),
    ops.tanh_backward: lambda n, r: _mul(r[0], _add(Range(1.0, 1.0), _neg(_square(r[1])))),
    ops.sigmoid_backward: lambda n, r: _mul(r[0], _mul(r[1], _add(Range(1.0, 1.0), _neg(r[1])))),
    ops.mse_backward: lambda n, r: _hull(_mul(_mul(r[0], _add(r[1], _neg(r[2]))), Range(2.0, 2.0)), ZERO),
}


# -- the rules of the ops beyond the elementwise core: activations, convolution and
# pooling, normalisation, dropout, shapes and indexing. Each is sound (every value the op
# can give lies in its range) and, where a tight one would be long to derive, simply
# loose: `ANY` is always a correct answer.


def _ints(value: Any, d: int) -> tuple[int, ...]:
    return (value,) * d if isinstance(value, int) else tuple(value)


def _static(shape: Sequence[Any]) -> int | None:
    return math.prod(shape) if all(isinstance(d, int) for d in shape) else None


def _dipping(fn: Callable[[torch.Tensor], torch.Tensor], a: Range, dtype: torch.dtype, lowest: float) -> Range:
    """The range of an activation that is 0 at -inf, dips to its minimum at x = `lowest` and
    then rises without bound (gelu, silu), computed in the value's dtype."""
    def at(x: float) -> float:
        if x == -math.inf:
            return 0.0  # the limit, approached from below
        if x == math.inf:
            return math.inf
        return float(fn(torch.tensor(x, dtype=dtype if dtype.is_floating_point else torch.float64)))
    ends = [at(a.lo), at(a.hi)]
    lo = min(min(ends), at(lowest)) if a.lo <= lowest <= a.hi else min(ends)
    return Range(lo, max(ends))


def _leaky(n: Node, r: list[Range]) -> Range:
    slope = float(n.attrs["negative_slope"])
    f = lambda x: x if x > 0 else _times(slope, x)  # noqa: E731
    values = [f(r[0].lo), f(r[0].hi), *([0.0] if r[0].lo <= 0 <= r[0].hi else [])]
    return Range(min(values), max(values))


def _rsqrt(a: Range, dtype: torch.dtype) -> Range:
    """1/sqrt(x), decreasing on x > 0 (inf at 0, NaN below, which no range holds: unbounded)."""
    if a.hi <= 0:
        return ANY
    hi = math.inf if a.lo <= 0 else float(torch.rsqrt(torch.tensor(a.lo, dtype=dtype)))
    return Range(float(torch.rsqrt(torch.tensor(a.hi, dtype=dtype))), hi)


def _conv(n: Node, r: list[Range]) -> Range:
    """A convolution: each result a sum of C/groups·kernel products of an input and a weight
    element (or of zero padding), plus the bias."""
    w = n.inputs[1]
    inner = _static(w.shape)
    total = _sum(_hull(_mul(r[0], r[1]), ZERO), None if inner is None else inner // max(w.shape[0], 1))
    return _add(total, r[2]) if len(r) > 2 else total


def _conv_backward_input(n: Node, r: list[Range]) -> Range:
    """The input's gradient: each element a sum of at most out/groups·kernel products g·w."""
    w = n.inputs[2]
    count = _static(w.shape)
    groups = int(n.attrs.get("groups", 1))
    terms = None if count is None else count // max(w.shape[1], 1) // max(groups, 1) or 1
    return _sum(_hull(_mul(r[0], r[2]), ZERO), terms)


def _conv_backward_weight(n: Node, r: list[Range]) -> Range:
    """The weight's gradient: each element a sum over the examples and output positions of g·x."""
    g = n.inputs[0]
    count = _static(g.shape)
    return _sum(_hull(_mul(r[0], r[1]), ZERO), None if count is None else count // max(g.shape[1], 1))


def _window(n: Node) -> int:
    return math.prod(_ints(n.attrs["kernel_size"], 2))


def _padded(n: Node) -> bool:
    return any(_ints(n.attrs.get("padding", 0), 2))


def _var(n: Node, r: list[Range]) -> Range:
    a = r[0]
    if n.attrs.get("correction", 0) == 0 and math.isfinite(a.lo) and math.isfinite(a.hi):
        return Range(0.0, (a.hi - a.lo) ** 2 / 4)  # Popoviciu's bound
    return Range(0.0, math.inf)


def _correct_var(n: Node, r: list[Range]) -> Range:
    """v scaled by count / (count - correction): from 1 (a large count) up to its value at
    the fewest elements the axes can hold (each symbolic dim at least 1); any value if
    that is not more than the correction (v * inf: inf, -inf or nan)."""
    x, correction = n.inputs[1], n.attrs["correction"]
    axes = range(x.ndim) if n.attrs["axis"] is None else n.attrs["axis"]
    least = math.prod(x.shape[a] for a in axes if isinstance(x.shape[a], int))
    if least <= correction:
        return ANY
    return _mul(r[0], Range(1.0, least / (least - correction)))


def _batch_norm(n: Node, r: list[Range]) -> Range:
    x, mean, var_, weight, bias = r
    scale = _rsqrt(_add(var_, Range(n.attrs["eps"], n.attrs["eps"])), n.out.dtype)
    return _add(_mul(_mul(_add(x, _neg(mean)), scale), weight), bias)


def _batch_norm_backward(n: Node, r: list[Range]) -> Range:
    """w r (g - mean(g)) - w r^3 d mean(g d), d = x - mean: each mean within its
    elements' range."""
    g, x, mean, var_, weight = r
    rate = _rsqrt(_add(var_, Range(n.attrs["eps"], n.attrs["eps"])), n.out.dtype)
    d = _add(x, _neg(mean))
    direct = _mul(_mul(weight, rate), _add(g, _neg(g)))
    through = _mul(_mul(_mul(weight, _mul(rate, _mul(rate, rate))), d), _mul(g, d))
    return _add(direct, _neg(through))


def _layer_norm(n: Node, r: list[Range]) -> Range:
    """Normalised over k elements, each value is within sqrt(k - 1) of 0; then the affine."""
    k = _static(n.inputs[1].shape) or 1
    bound = math.sqrt(max(k - 1, 0))
    return _add(_mul(Range(-bound, bound), r[1]), r[2])


def _dropout_mask(n: Node, r: list[Range]) -> Range:
    p = float(n.attrs["p"])
    return ZERO if p >= 1 else Range(0.0, 1.0 / (1.0 - p))


def _gelu_slope(n: Node, r: list[Range]) -> Range:
    """g · gelu'(x): gelu' lies in about [-0.13, 1.13] (the tanh form's too); widened a little."""
    return _mul(r[0], Range(-0.2, 1.2))


RULES.update({
    ops.gelu: lambda n, r: _dipping(lambda t: torch.ops.aten.gelu(t, approximate=n.attrs["approximate"]),
                                    r[0], n.out.dtype, -0.7517916),
    ops.gelu_backward: _gelu_slope,
    ops.silu: lambda n, r: _dipping(torch.ops.aten.silu, r[0], n.out.dtype, -1.2784645),
    ops.leaky_relu: _leaky,
    ops.rsqrt: lambda n, r: _rsqrt(r[0], n.out.dtype),
    ops.var: _var,
    ops.correct_var: _correct_var,
    ops.batch_norm: _batch_norm,
    ops.batch_norm_backward: _batch_norm_backward,
    ops.layer_norm: _layer_norm,
    ops.dropout_mask: _dropout_mask,
    ops.conv1d: _conv,
    ops.conv2d: _conv,
    ops.conv_backward_input: _conv_backward_input,
    ops.conv_backward_weight: _conv_backward_weight,
    ops.max_pool2d: lambda n, r: r[0],  # one of the window's elements (padding never wins)
    ops.max_pool2d_select: lambda n, r: _hull(r[0], ZERO),
    # Each position of x is in at most kernel_size windows (fewer with a wider stride).
    ops.max_pool2d_backward: lambda n, r: _sum(_hull(r[0], ZERO), _window(n)),
    ops.avg_pool2d: lambda n, r: _hull(r[0], ZERO) if _padded(n) else r[0],
    ops.avg_pool2d_backward: lambda n, r: _sum(_hull(r[0], ZERO), _window(n)),
    ops.reshape: lambda n, r: r[0],
    ops.flatten: lambda n, r: r[0],
    ops.permute: lambda n, r: r[0],
    ops.slice_: lambda n, r: r[0],
    ops.unslice: lambda n, r: _hull(r[0], ZERO),
    ops.concat: lambda n, r: functools.reduce(_hull, r),
    ops.index_select: lambda n, r: r[0],
    ops.index_add: lambda n, r: _add(r[0], _sum(_hull(r[2], ZERO), None)),  # any number of repeats
    ops.allreduce_start: lambda n, r: ANY,  # the operation in flight, not a value
    ops.allreduce_wait: lambda n, r: ANY,  # a sum over the ranks of a flat buffer of everything
})

# Values that are positive in exact arithmetic but round to 0 for inputs far below zero.
_UNDERFLOW = {ops.exp, ops.sigmoid, ops.softmax}


# -- the static check ----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A node that can make a NaN or inf: which, why, and what to do."""

    node: int  # its k in %k
    op: str
    layer: str  # its scope ("" for none)
    where: str  # the line of user code that built it
    text: str  # its IR line
    problem: str  # "log of a value that can be <= 0", ...
    detail: str  # the range that makes it so
    hint: str

    def __str__(self) -> str:
        layer = f" in layer {self.layer}" if self.layer else ""
        return (f"%{self.node} {self.op}{layer} (created at {self.where}): {self.problem}: {self.detail}\n"
                f"  `{self.text}`\n  hint: {self.hint}")


def check_numerics(target: Any, known: Mapping[str, tuple[float, float]] | None = None) -> list[Finding]:
    """Flag the nodes of a graph that can make a NaN or inf, before anything runs.

    An interval analysis over the IR: each value gets the range its elements may take
    (inputs and trained params: any real number, unless `known` says otherwise; a
    model's fixed buffers, such as Standardize's std: the range of their values now;
    those training updates, such as BatchNorm's running statistics: any),
    and each log or division of a value that can be <= 0 (or 0), and each exp of a value
    that can exceed the dtype's range, is a finding.

    Args:
        target: a `gd.Graph`, or a model (its training graph, in training mode, with its
            loss, MSE by default).
        known: ranges of inputs or params by name, e.g. {"x": (0.0, 1.0)}.

    Returns:
        The findings, in the graph's order (an empty list: nothing can overflow or divide
        by zero, as far as intervals can tell).
    """
    return analyse(target, known)[0]


def analyse(target: Any, known: Mapping[str, tuple[float, float]] | None = None) -> tuple[list[Finding],
                                                                                            list[Range]]:
    """`check_numerics`'s findings, and the range of every node's result (by k)."""
    graph, ranges = _graph_and_ranges(target)
    for name, pair in (known or {}).items():
        value = graph.value(name)  # a GraphError naming the graph's inputs and params
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"known[{name!r}] must be a pair (low, high), got {pair!r}")
        lo, hi = real(f"known[{name!r}] low", pair[0]), real(f"known[{name!r}] high", pair[1])
        if lo > hi:
            raise ValueError(f"known[{name!r}] is ({lo:g}, {hi:g}): its low end is above its high end")
        ranges[id(value)] = Range(lo, hi)
    names = _ir_names(graph)
    findings, results = [], []
    for k, node in enumerate(graph.nodes):
        inputs = [ranges.get(id(v), ANY) for v in node.inputs]
        finding = _risk(k, node, inputs, names)
        if finding is not None:
            findings.append(finding)
        rule = RULES.get(node.op)
        ranges[id(node.out)] = rule(node, inputs) if rule is not None else ANY
        results.append(ranges[id(node.out)])
    return findings, results


def _graph_and_ranges(target: Any) -> tuple[Graph, dict[int, Range]]:
    if isinstance(target, Graph):
        return target, {}
    if not all(hasattr(target, m) for m in ("graph", "parameters", "state")):
        raise ValueError(f"check_numerics takes a gd.Graph or a model such as gd.Sequential, got "
                         f"{type(target).__name__}")
    from .losses import MSE  # the model's default loss, as fit's
    from .step import state_updates
    graph = target.graph(getattr(target, "loss", None) or MSE(), training=True)  # what fit trains
    trained, updated = target.parameters(), set(state_updates(graph))
    ranges = {}
    for name, t in target.state().items():  # fixed buffers (Standardize's std) stay as they are: their values
        # bound them; those training updates (BatchNorm's running statistics, Dropout's key) do not
        if name not in trained and name not in updated and name in graph.params and t.numel() and not t.is_meta:
            ranges[id(graph.params[name])] = Range(float(t.min()), float(t.max()))
    return graph, ranges


def _risk(k: int, node: Node, inputs: list[Range], names: dict[int, str]) -> Finding | None:
    """The finding for node k, if its inputs' ranges make it risky."""
    def finding(problem: str, detail: str, hint: str) -> Finding:
        return Finding(k, node.op.name, node.scope, node.where, format_node(node, names), problem, detail, hint)

    if node.op is ops.log and inputs[0].lo <= 0:
        x = node.inputs[0]
        rounds = x.node is not None and x.node.op in _UNDERFLOW
        return finding("log of a value that can be <= 0",
                       f"its input {names[id(x)]} lies in {inputs[0]}"
                       + (f" ({x.node.op.name} rounds to 0 for inputs far below zero)" if rounds else ""),
                       "keep the input above 0 (e.g. log(x + 1e-7)); for the log of a softmax or sigmoid use "
                       "log_softmax or bce_with_logits, which compute it stably")
    if node.op is ops.div and inputs[1].lo <= 0 <= inputs[1].hi:
        return finding("division by a value that can be 0",
                       f"the divisor {names[id(node.inputs[1])]} lies in {inputs[1]}",
                       "keep the divisor away from 0 (e.g. divide by abs(d) + 1e-7)")
    if node.op is ops.rsqrt and inputs[0].lo <= 0:
        return finding("rsqrt of a value that can be <= 0",
                       f"its input {names[id(node.inputs[0])]} lies in {inputs[0]} (rsqrt is inf at 0, NaN below)",
                       "add a small positive number first, as BatchNorm and LayerNorm add eps to the variance")
    limit = _exp_limit(node.out.dtype)
    if node.op is ops.exp and inputs[0].hi > limit:
        return finding(f"exp of a value that can exceed {limit:.4g}",
                       f"its input {names[id(node.inputs[0])]} lies in {inputs[0]}, and exp is inf in "
                       f"{dtype_name(node.out.dtype)} above {limit:.4g}",
                       "bound the input first (subtract its maximum, as softmax does, or squash it with tanh)")
    return None


def _exp_limit(dtype: torch.dtype) -> float:
    """The largest x whose exp is finite in `dtype` (inf for an integer dtype, which exp never makes)."""
    return math.log(torch.finfo(dtype).max) if dtype.is_floating_point else math.inf


def _ir_names(graph: Graph) -> dict[int, str]:
    names = {id(v): v.name for v in (*graph.inputs.values(), *graph.params.values())}
    names.update({id(n.out): f"%{k}" for k, n in enumerate(graph.nodes)})
    return names


# -- after a divergence: the first non-finite value ------------------------------------------


@dataclass(frozen=True)
class NonFinite:
    """The first node whose result was NaN or inf, when a batch was replayed node by node;
    or, for an update that overflowed with finite gradients, the gradient's node."""

    node: int  # its k in %k of the step's graph
    op: str
    layer: str
    where: str
    text: str  # its IR line
    became: str  # "inf", "-inf", "nan" (or several); "" for an update that overflowed
    inputs: tuple[tuple[str, Range], ...]  # each input's name and its values' range
    problem: str  # what the inputs' ranges say: "log of a value <= 0", ... or "overflow"
    hint: str  # "" where the general advice (lower the learning rate) is the hint

    def describe(self) -> str:
        layer = f" in layer {self.layer}" if self.layer else ""
        at = f"`{self.text.split('  # ')[0]}`{layer} (created at {self.where})"
        if not self.became:  # an update that overflowed: `inputs` holds the gradient
            (name, gradient), = self.inputs
            return (f"Every value of the step was finite; the gradient {name}, at {at}, lies in {gradient}: "
                    f"{self.problem}")
        ranges = " and ".join(f"{name} in {r}" for name, r in self.inputs)
        return f"The first non-finite value: %{self.node}, {self.became}, at {at}, from {ranges or 'no inputs'}: " \
               f"{self.problem}"


class _Found(Exception):  # noqa: N818 - not an error: the search stops at the first non-finite node
    def __init__(self, k: int, out: torch.Tensor, inputs: tuple[Any, ...]) -> None:
        self.k, self.out, self.inputs = k, out, inputs


class _Check:
    """The probe: after each node, stop at the first result that is not finite."""

    env: dict[str, Any]

    def __init__(self) -> None:
        def check(k: int, out: torch.Tensor, inputs: tuple[Any, ...]) -> None:
            # (an allreduce in flight is no tensor; an integer tensor is always finite)
            if isinstance(out, torch.Tensor) and out.dtype.is_floating_point and not all_finite(out):
                raise _Found(k, out, inputs)
        self.env = {"_check": check}

    def before(self, k: int, node: Node) -> list[str]:
        return []

    def after(self, k: int, node: Node, out: str, inputs: list[str]) -> list[str]:
        return [f"_check({k}, {out}, ({''.join(name + ', ' for name in inputs)}))"]


def first_nonfinite(graph: Graph, feed: Sequence[torch.Tensor]) -> tuple[NonFinite | None, tuple]:
    """Run `graph` (already optimised: the step's own graph) on `feed` with a check after
    every node. Returns (the first non-finite value, None if all stayed finite; the
    outputs, empty if it stopped). Every value is kept whole (no in-place reuse), so the
    failing node's inputs are still there to measure."""
    checked = lower_probed(graph, _Check(), reuse=False)
    try:
        with torch.inference_mode():
            return None, checked.fn(*feed)
    except _Found as found:
        node = graph.nodes[found.k]
        names = _ir_names(graph)
        inputs = tuple((names[id(v)], _range(t)) for v, t in zip(node.inputs, found.inputs))
        problem, hint = _why(node, [t for t in found.inputs])
        return NonFinite(found.k, node.op.name, node.scope, node.where, format_node(node, names),
                         _became(found.out), inputs, problem, hint), ()


def overflowed_update(graph: Graph, outputs: Sequence[torch.Tensor], param: str, lr: float,
                      optimizer: str = "SGD", accumulate: int = 1) -> NonFinite:
    """For an update that made `param` non-finite although every gradient was finite:
    the node that made its gradient, and the gradient's range (with accumulation, the
    batch's own, one of those the group's update averaged)."""
    index = next(i for i, label in enumerate(graph.output_labels) if label == f"d/d{param}")
    value = graph.outputs[index]
    names = _ir_names(graph)
    node = value.node
    position = graph.position(node) if node is not None else -1
    gradient = _range(outputs[index])
    dtype = dtype_name(value.dtype)
    return NonFinite(position if position is not None else -1, node.op.name if node else "param",
                     node.scope if node else "", node.where if node else "", format_node(node, names) if node else "",
                     "", ((names[id(value)], gradient),),
                     _overflow(param, lr, _number(max(-gradient.lo, gradient.hi)), dtype, optimizer, accumulate), "")


def _overflow(param: str, lr: float, largest: str, dtype: str, optimizer: str, accumulate: int) -> str:
    if optimizer == "SGD" and accumulate == 1:
        return (f"the update of {param} overflowed: lr={lr:g} times a gradient of up to {largest} is past "
                f"{dtype}'s range")
    group = f", averaging the gradients of up to {accumulate} batches" if accumulate > 1 else ""
    return (f"the update of {param} overflowed ({optimizer} at lr={lr:g}{group}): from this batch's gradient of up "
            f"to {largest}, it went past {dtype}'s range")


def _range(t: Any) -> Range:
    if not isinstance(t, torch.Tensor) or not t.numel():
        return Range(float(t), float(t)) if isinstance(t, (int, float)) else ANY
    t = t.detach()
    return Range(float(t.min()), float(t.max()))


def _became(out: torch.Tensor) -> str:
    kinds = [name for name, mask in (("nan", torch.isnan(out)), ("inf", torch.isposinf(out)),
                                     ("-inf", torch.isneginf(out))) if bool(mask.any())]
    return " and ".join(kinds)


def _why(node: Node, inputs: list[Any]) -> tuple[str, str]:
    """What the inputs of the first non-finite node say about why: a problem and a hint
    ("" where it is the values growing past the dtype's range: the learning rate)."""
    if node.op is ops.log and _range(inputs[0]).lo <= 0:
        return (f"log of a value <= 0 (its input's smallest is {_number(_range(inputs[0]).lo)})",
                "keep log's input above 0 (e.g. log(x + 1e-7)); for the log of a softmax or sigmoid use "
                "log_softmax or bce_with_logits")
    if node.op is ops.div and isinstance(inputs[1], torch.Tensor) and bool((inputs[1] == 0).any()):
        zeros = int((inputs[1] == 0).sum())
        return (f"division by zero (the divisor holds {zeros} zero{'s' if zeros != 1 else ''})",
                "keep the divisor away from 0 (e.g. divide by abs(d) + 1e-7)")
    if node.op is ops.rsqrt and _range(inputs[0]).lo <= 0:
        return (f"rsqrt of a value <= 0 (its input's smallest is {_number(_range(inputs[0]).lo)})",
                "add a small positive number first, as BatchNorm and LayerNorm add eps to the variance")
    limit = _exp_limit(node.out.dtype)
    if node.op is ops.exp and _range(inputs[0]).hi > limit:
        return (f"exp overflow (its input reaches {_number(_range(inputs[0]).hi)}; exp is inf in "
                f"{dtype_name(node.out.dtype)} above {limit:.4g})",
                "bound exp's input (subtract its maximum, as softmax does), or lower the learning rate")
    return f"the values outgrew {dtype_name(node.out.dtype)}'s range", ""


__all__ = ["ANY", "RULES", "Finding", "NonFinite", "Range", "analyse", "check_numerics", "first_nonfinite",
           "overflowed_update"]
