"""Where NaN and inf come from (graphdl/numerics.py): a divergence names the first
non-finite node, its op, layer, line and inputs' ranges, with a hint; the static
interval check flags risky nodes before any run, and its intervals hold the values a
graph really computes."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from messages import names
from strategies import fuzz, programs, random_graph

import graphdl as gd
from graphdl import numerics
from graphdl.numerics import Range, analyse


class Log(gd.Layer):
    def forward(self, build, x):
        return gd.log(x)


class Reciprocal(gd.Layer):
    def forward(self, build, x):
        return gd.div(1.0, x)


class Exp(gd.Layer):
    def forward(self, build, x):
        return gd.exp(x)


def _identity_first(model: gd.Sequential) -> gd.Sequential:
    model.layers[0].weight.copy_(torch.eye(1))
    model.layers[0].bias.zero_()
    return model


# -- a planted NaN, found at its node ------------------------------------------------------


@pytest.mark.parametrize("layer, op, planted, problem, hint", [
    (Log, "log", -1.0, r"log of a value <= 0 \(its input's smallest is -1\)", "keep log's input above 0"),
    (Reciprocal, "div", 0.0, r"division by zero \(the divisor holds 1 zero\)", "keep the divisor away from 0"),
    (Exp, "exp", 100.0, r"exp overflow \(its input reaches 100; exp is inf in f32 above 88\.72\)",
     "bound exp's input"),
])
def test_a_planted_non_finite_value_is_found_at_its_node(layer, op, planted, problem, hint):
    """Row 7 (batch 3 of 3-row batches, unshuffled) holds the bad value; lr=0 keeps the
    params as they are, so nothing else can go wrong first."""
    model = _identity_first(gd.Sequential(gd.Linear(1, 1), layer(), gd.Linear(1, 1)))
    X = torch.linspace(0.5, 2.0, 12).reshape(-1, 1)
    X[7] = planted
    with pytest.raises(gd.DivergedError) as err:
        model.fit(X, torch.zeros(12, 1), optimizer=gd.SGD(lr=0.0), epochs=2, batch_size=3, shuffle=False,
                  verbose=False)
    e = err.value
    step_graph = gd.TrainStep(model, gd.MSE(), gd.SGD()).compiled.graph
    (k,) = [k for k, n in enumerate(step_graph.nodes) if n.op.name == op and not n.backward]
    assert (e.epoch, e.batch) == (1, 3)
    assert (e.node, e.op, e.layer) == (f"%{k}", op, f"1:{layer.__name__}")
    source, first = inspect.getsourcelines(layer.forward)
    assert e.where.endswith(f"test_numerics.py:{first + len(source) - 1}")  # the user's line that built the node
    names(str(e), "in epoch 1/2, batch 3/4", rf"The first non-finite value: %{k}, (nan|inf)",
          f"in layer 1:{layer.__name__}", problem, f"hint: {hint}", "hint: lower the learning rate")
    assert e.source.inputs[-1][1].lo <= planted <= e.source.inputs[-1][1].hi


def test_an_overflowing_update_names_the_gradient_it_came_from():
    model = gd.Sequential(gd.Linear(1, 1))
    model.layers[0].weight.fill_(1e19)
    model.layers[0].bias.zero_()
    with pytest.raises(gd.DivergedError) as err:
        model.fit(torch.ones(4, 1), torch.zeros(4, 1), optimizer=gd.SGD(lr=1e20), epochs=1, batch_size=2,
                  shuffle=False, verbose=False)
    e = err.value
    assert (e.op, e.layer) == ("matmul_tn", "0:Linear")
    names(str(e), "Every value of the step was finite; the gradient %5", r"lies in \[2e\+19, 2e\+19\]",
          r"the update of 0.weight overflowed: lr=1e\+20 times a gradient of up to 2e\+19 is past f32's range")


def test_a_run_that_stays_finite_never_searches(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("searched a run that stayed finite")

    monkeypatch.setattr(numerics, "first_nonfinite", never)
    monkeypatch.setattr(numerics, "lower_probed", never)
    torch.manual_seed(0)
    model = gd.Sequential(gd.Linear(2, 4), gd.Tanh(), gd.Linear(4, 1))
    history = model.fit(torch.rand(20, 2), torch.rand(20, 1), epochs=3, batch_size=5, verbose=False)
    assert len(history["loss"]) == 3


def test_first_nonfinite_on_a_graph_and_its_outputs_when_all_is_finite():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    g.output(gd.sum(gd.log(gd.add(gd.relu(x), 1.0))), gd.sum(x))
    fine, outputs = numerics.first_nonfinite(g, [torch.rand(3, 2)])
    assert fine is None and len(outputs) == 2
    h = gd.Graph("h")
    y = h.input("y", (None, 2))
    h.output(gd.mean(gd.log(y)))
    found, outputs = numerics.first_nonfinite(h, [torch.tensor([[1.0, -2.0]])])
    assert outputs == () and (found.node, found.op, found.became) == (0, "log", "nan")
    assert found.inputs == (("y", Range(-2.0, 1.0)),)


# -- the static check --------------------------------------------------------------------------


def _one(build, dtype=torch.float32, known=None) -> list[numerics.Finding]:
    g = gd.Graph("g")
    x = g.input("x", (None, 3), dtype)
    w = g.param("w", torch.ones(3, 3, dtype=dtype))
    g.output(build(x, w))
    return gd.check_numerics(g, known)


RISKY = [
    (lambda x, w: gd.log(x), "log of a value that can be <= 0"),
    (lambda x, w: gd.log(gd.relu(x)), "log of a value that can be <= 0"),
    (lambda x, w: gd.log(gd.sigmoid(x)), "log of a value that can be <= 0"),
    (lambda x, w: gd.log(gd.exp(x)), "log of a value that can be <= 0"),
    (lambda x, w: gd.div(x, gd.matmul(x, w)), "division by a value that can be 0"),
    (lambda x, w: gd.div(x, gd.abs(x)), "division by a value that can be 0"),
    (lambda x, w: gd.exp(x), "exp of a value that can exceed 88.72"),
    (lambda x, w: gd.exp(gd.matmul(gd.tanh(x), w)), "exp of a value that can exceed 88.72"),  # w is trained
]


@pytest.mark.parametrize("build, problem", RISKY)
def test_risky_nodes_are_flagged(build, problem):
    findings = _one(build)
    assert findings[-1].problem == problem  # the outer node (log of exp(x) has exp's overflow first)
    assert len(findings) == 1 + (build is RISKY[3][0])


@pytest.mark.parametrize("build", [
    lambda x, w: gd.log(gd.add(gd.relu(x), 1.0)),
    lambda x, w: gd.log(gd.sigmoid(gd.tanh(x))),  # tanh in [-1, 1]: sigmoid in [0.27, 0.73]
    lambda x, w: gd.log(gd.add(gd.exp(gd.tanh(x)), 0.0)),
    lambda x, w: gd.div(x, gd.add(gd.abs(x), 0.5)),
    lambda x, w: gd.exp(gd.tanh(x)),
    lambda x, w: gd.exp(gd.log_softmax(x)),
    lambda x, w: gd.exp(gd.neg(gd.relu(x))),
    lambda x, w: gd.div(gd.mean(x), gd.add(gd.mse(x, gd.tanh(x)), 1.0)),
])
def test_safe_nodes_are_not_flagged(build):
    assert _one(build) == []


def test_known_ranges_and_dtypes_decide():
    assert len(_one(lambda x, w: gd.log(x), known={"x": (0.0, 1.0)})) == 1  # 0 is in
    assert _one(lambda x, w: gd.log(gd.add(x, 0.5)), known={"x": (0.0, 1.0)}) == []
    assert _one(lambda x, w: gd.exp(gd.mul(x, 100.0)), known={"x": (0.0, 1.0)})[0].problem == \
        "exp of a value that can exceed 88.72"
    assert _one(lambda x, w: gd.exp(gd.mul(x, 100.0)), torch.float64, known={"x": (0.0, 1.0)}) == []  # 709.8
    # In float32, sigmoid of -200 is exactly 0, and its log is -inf: the intervals are the dtype's.
    assert len(_one(lambda x, w: gd.log(gd.sigmoid(x)), known={"x": (-200.0, 0.0)})) == 1
    assert _one(lambda x, w: gd.log(gd.sigmoid(x)), torch.float64, known={"x": (-200.0, 0.0)}) == []


def test_a_finding_reads_like_an_error():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    with g.scope("2:Log"):
        line = inspect.currentframe().f_lineno + 1
        g.output(gd.log(gd.relu(x)))
    (finding,) = gd.check_numerics(g)
    assert str(finding) == (f"%1 log in layer 2:Log (created at {finding.where}): log of a value that can be <= 0: "
                            "its input %0 lies in [0, inf]\n"
                            "  `%1: f32[N,3] = log %0  # 2:Log`\n"
                            "  hint: keep the input above 0 (e.g. log(x + 1e-7)); for the log of a softmax or sigmoid "
                            "use log_softmax or bce_with_logits, which compute it stably")
    assert finding.where.endswith(f"test_numerics.py:{line}")


def test_a_models_fixed_buffers_bound_it_and_its_trained_params_do_not():
    torch.manual_seed(0)
    X = torch.rand(50, 2) * 3
    model = gd.Sequential(gd.Standardize().adapt(X), gd.Linear(2, 4), gd.Tanh(), gd.Linear(4, 1))
    assert gd.check_numerics(model) == []  # x / std, std the data's: never 0
    raw = gd.Graph("raw")
    x = raw.input("x", (None, 2))
    raw.output(gd.div(x, raw.param("std", torch.ones(2))))
    assert [f.problem for f in gd.check_numerics(raw)] == ["division by a value that can be 0"]
    model.add(Log())
    assert [(f.op, f.layer) for f in gd.check_numerics(model)] == [("log", "4:Log")]


@pytest.mark.parametrize("target, known, error, message", [
    ("graph", None, ValueError, "check_numerics takes a gd.Graph or a model such as gd.Sequential, got str"),
    (None, {"x": 3}, ValueError, r"known\['x'\] must be a pair \(low, high\), got 3"),
    (None, {"x": (1.0, 0.0)}, ValueError, r"known\['x'\] is \(1, 0\): its low end is above its high end"),
    (None, {"x": (0.0, math.nan)}, ValueError, r"known\['x'\] high must be a finite number"),
    (None, {"z": (0.0, 1.0)}, gd.GraphError, "graph g has no input or param 'z'"),
])
def test_bad_arguments_are_named(target, known, error, message):
    g = gd.Graph("g")
    g.output(gd.log(g.input("x", (2,))))
    with pytest.raises(error, match=message):
        gd.check_numerics(g if target is None else target, known)


@pytest.mark.slow
@fuzz(150)
@given(programs(), st.integers(0, 2**16))
def test_the_intervals_hold_every_value_the_graph_computes(program, seed):
    """Soundness: with each input and param known to lie in its data's range, every value
    the compiled graph computes lies in the interval the analysis gave its node."""
    graph, data = random_graph(program, seed, 5)
    known = {name: (float(t.min()), float(t.max())) for name, t in data.items()}
    _, ranges = analyse(graph, known)
    seen: dict[int, tuple[float, float]] = {}

    class Record:
        env = {"_seen": seen}

        def before(self, k, node):
            return []

        def after(self, k, node, out, inputs):
            return [f"_seen[{k}] = (float({out}.min()), float({out}.max())) if {out}.numel() else None"]

    from graphdl.probe import lower_probed
    fn = lower_probed(graph, Record(), reuse=False)
    fn(x=data["x"], y=data["y"])
    for k, (lo, hi) in ((k, v) for k, v in seen.items() if v is not None):
        r = ranges[k]
        slack = 1e-9 * (1 + abs(lo) + abs(hi))
        assert r.lo - slack <= lo and hi <= r.hi + slack, (k, graph.nodes[k], r, lo, hi)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_planted_nan_is_found_on_cuda():
    model = _identity_first(gd.Sequential(gd.Linear(1, 1), Log(), gd.Linear(1, 1))).to("cuda")
    X = torch.linspace(0.5, 2.0, 12).reshape(-1, 1)
    X[7] = -1.0
    with pytest.raises(gd.DivergedError) as err:
        model.fit(X.cuda(), torch.zeros(12, 1, device="cuda"), optimizer=gd.SGD(lr=0.0), epochs=2, batch_size=3,
                  shuffle=False, verbose=False)
    assert (err.value.epoch, err.value.batch, err.value.op, err.value.layer) == (1, 3, "log", "1:Log")


# -- every registered op: a rule that holds, and no crash -------------------------------------


def _recorded(graph: gd.Graph, feeds: dict[str, torch.Tensor]) -> dict[int, tuple[float, float] | None]:
    """Each node's (smallest, largest) value, the graph run node by node on `feeds`."""
    seen: dict[int, tuple[float, float] | None] = {}

    class Record:
        env = {"_seen": seen}

        def before(self, k, node):
            return []

        def after(self, k, node, out, inputs):
            return [f"_seen[{k}] = (float({out}.min()), float({out}.max())) "
                    f"if isinstance({out}, torch.Tensor) and {out}.numel() else None"]

    from graphdl.probe import lower_probed
    lower_probed(graph, Record(), reuse=False)(**feeds)
    return seen


def _op_cases():
    from test_ops import CASES, _feeds, _graph, _id, _inputs, _wrt
    return [pytest.param(case, _feeds, _graph, _inputs, _wrt, id=_id(case)) for case in CASES]


@pytest.mark.parametrize("case, feeds_of, graph_of, inputs_of, wrt_of", _op_cases())
def test_every_ops_interval_holds_the_values_it_computes(case, feeds_of, graph_of, inputs_of, wrt_of):
    """tests/test_ops.py's case of every op (conv, pooling, normalisation, dropout,
    shapes, indexing, the activations...), forward and differentiated: with the params
    known to lie in their values' ranges, each node's values lie in its interval."""
    tensors = inputs_of(case)
    forward, _ = graph_of(case, tensors)
    graphs = [forward]
    if case.differentiable:
        graphs.append(gd.grad(forward, wrt_of(case)))
    for graph in graphs:
        known = {name: (float(v.slot.tensor.min()), float(v.slot.tensor.max()))
                 for name, v in graph.params.items() if v.slot.tensor.numel()}
        known.update({f"a{i}": (0.0, float(n - 1)) for i, n in case.ints.items()})
        findings, ranges = analyse(graph, known)
        assert all(isinstance(f, numerics.Finding) for f in findings)
        for k, span in _recorded(graph, feeds_of(case, tensors)).items():
            if span is None:
                continue
            lo, hi = span
            r = ranges[k]
            slack = 1e-6 * (1 + abs(lo) + abs(hi))
            assert r.lo - slack <= lo and hi <= r.hi + slack, (case.op, graph.nodes[k], r, lo, hi)


def test_check_numerics_reads_every_registered_op():
    """Every op of gd.OPS, met in some graph check_numerics reads: the cases' graphs and
    their gradients, a data-parallel step (the collectives) and a CNN's training step."""
    from test_ops import CASES, _graph, _inputs, _wrt

    from graphdl.step import step_graph
    seen: set[str] = set()
    for case in CASES:
        forward, _ = _graph(case, _inputs(case))
        for graph in [forward, *([gd.grad(forward, _wrt(case))] if case.differentiable else [])]:
            gd.check_numerics(graph)
            seen.update(n.op.name for n in graph.nodes)
    model = gd.Sequential(gd.Conv2d(1, 4, 3, padding=1), gd.BatchNorm2d(4), gd.ReLU(), gd.MaxPool2d(2),
                          gd.Dropout(0.25), gd.Flatten(), gd.Linear(16, 3), input_shape=(1, 4, 4))
    gd.check_numerics(model)
    parallel = step_graph(model.graph(gd.CrossEntropy(), training=True), list(model.parameters()))
    gd.check_numerics(parallel)
    for graph in (parallel, gd.TrainStep(model, gd.CrossEntropy(), gd.SGD()).compiled.graph):
        seen.update(n.op.name for n in graph.nodes)
    assert seen | {"const"} >= set(gd.OPS), set(gd.OPS) - seen
    assert set(numerics.RULES) >= set(gd.OPS.values()), "an op without a rule reads as any value: give it one"


def test_rsqrt_of_a_value_that_can_be_zero_is_flagged_and_a_batch_norms_is_not():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    g.output(gd.rsqrt(gd.var(x, axis=0)), gd.rsqrt(gd.var(x, axis=0) + 1e-5))
    (finding,) = gd.check_numerics(g)
    assert finding.problem == "rsqrt of a value that can be <= 0" and "lies in [0, inf]" in finding.detail
    model = gd.Sequential(gd.Linear(3, 4), gd.BatchNorm1d(4), gd.GELU(), gd.LayerNorm(4), gd.Linear(4, 1))
    assert gd.check_numerics(model) == []


# -- with main's layers and training features -----------------------------------------------------


class Sqrt(gd.Layer):
    """rsqrt's reciprocal: sqrt(x) as x * rsqrt(x), NaN for x < 0."""

    def forward(self, build, x):
        return gd.mul(x, gd.rsqrt(x))


def _cnn_with(layer: gd.Layer) -> gd.Sequential:
    torch.manual_seed(0)
    return gd.Sequential(layer, gd.Conv2d(1, 2, 3, padding=1), gd.BatchNorm2d(2), gd.ReLU(), gd.Dropout(0.5),
                         gd.Flatten(), gd.Linear(2 * 4 * 4, 1), input_shape=(1, 4, 4))


@pytest.mark.parametrize("accumulate, clip_norm", [(1, None), (2, 1.0)])
def test_a_planted_nan_in_a_conv_net_with_batch_norm_and_dropout_is_found(accumulate, clip_norm):
    """The step trains in training mode and writes BatchNorm's statistics and Dropout's key
    with each update: the replay starts from the epoch's buffers as well as its params, so
    the batch found is the one that failed, and the model keeps the buffers of the batches
    before it (those a run of only those batches ends with)."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(12, 1, 4, 4, generator=gen) + 0.1, torch.rand(12, 1, generator=gen)
    X[7, 0, 2, 1] = -1.0  # batch 3 of 3-row batches
    model = _cnn_with(Sqrt())
    settings = dict(optimizer=gd.SGD(lr=0.01), batch_size=3, shuffle=False, verbose=False, accumulate=accumulate,
                    clip_norm=clip_norm)
    with pytest.raises(gd.DivergedError) as err:
        model.fit(X, Y, epochs=2, **settings)
    e = err.value
    assert (e.epoch, e.batch, e.op, e.layer) == (1, 3, "rsqrt", "0:Sqrt")
    names(str(e), r"The first non-finite value: %\d+, (nan|inf)",
          r"rsqrt of a value <= 0 \(its input's smallest is -1\)", "hint: add a small positive number first")
    clean = _cnn_with(Sqrt())
    clean.fit(X[:6], Y[:6], epochs=1, **settings)  # the two batches before it
    for name, value in clean.state().items():
        torch.testing.assert_close(model.state()[name], value, msg=name)


def test_a_functional_models_diagnostics():
    """gd.Model trains through the same step: check_numerics reads its training graph,
    a divergence names its node, and gd.profile times its step."""
    torch.manual_seed(0)
    g = gd.Graph("branch")
    x = g.input("x", (None, 1))
    model = gd.Model(x, gd.Linear(1, 1)(Log()(gd.Linear(1, 1)(x)) + gd.tanh(x)))
    assert [(f.op, f.layer) for f in gd.check_numerics(model)] == [("log", "1:Log")]
    _identity_first(model)
    X = torch.linspace(0.5, 2.0, 12).reshape(-1, 1)
    X[4] = -1.0
    with pytest.raises(gd.DivergedError) as err:
        model.fit(X, torch.zeros(12, 1), loss=gd.MSE(), optimizer=gd.SGD(lr=0.0), batch_size=3, shuffle=False,
                  verbose=False)
    assert (err.value.batch, err.value.op, err.value.layer) == (2, "log", "1:Log")
    report = gd.profile(model, X[:3].abs(), torch.zeros(3, 1), loss=gd.MSE(), steps=2)
    assert any(r.op == "log" and r.layer == "1:Log" for r in report.rows)


def test_correct_var_below_its_correction_reads_as_any_value():
    """n / (n - correction) is inf (and v * inf inf or nan) where x holds no more elements
    than the correction: the rule may not bound it."""
    from graphdl.ops import correct_var
    g = gd.Graph("g")
    x = g.input("x", (2, 3))
    g.output(correct_var(gd.var(x, axis=0), x, axis=0, correction=3))
    ranges = numerics.analyse(g, {"x": (-1.0, 1.0)})[1]
    last = ranges[-1]
    assert last.lo == -math.inf and last.hi == math.inf
    g = gd.Graph("g")
    x = g.input("x", ("N", 3))
    g.output(correct_var(gd.var(x, axis=0), x, axis=0))
    assert numerics.analyse(g, {"x": (-1.0, 1.0)})[1][-1].hi == math.inf  # N may be 1: n - 1 = 0
