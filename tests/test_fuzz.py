"""Property tests and fuzzing, bounded: fixed example counts, no deadlines.

- Mutated IR text (characters, lines, tokens, dims, op names, attrs, numbers) either raises
  `gd.GraphError` or parses to a graph that verifies, compiles, and prints text that parses
  back to the same text. Nothing else may escape.
- Feeds of the wrong type, rank, shape or dtype raise `gd.GraphError`; valid ones run.
- Random graphs over div, log, abs, sum/mean with axes, [N,1]/[1,4] broadcasting and
  matmul chains: gradients agree with torch.autograd.

The whole file runs in well under a minute on two cores (see the `settings` below).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import TORCH_LIB, build_program, fuzz, programs, random_graph
from test_contract import tiny  # the contract's graph

import graphdl as gd


def _scoped() -> gd.Graph:
    g = gd.Graph("scoped.v2")
    x = g.input("x", (None, 4))
    c = g.param("c", torch.ones(1, 4))
    with g.scope("0:Norm"):
        m = gd.mean(x, axis=1, keepdims=True)
        s = gd.sum(gd.abs(gd.sub(x, m)), axis=(0,))
    with g.scope("1:Out"):
        out = gd.div(gd.log(gd.add(gd.mul(s, c), 2.0)), float("inf"))
    g.output(gd.sum(out), gd.mean(gd.exp(gd.neg(x)), axis=-1))
    return g


BASES = [str(tiny()), str(gd.grad(tiny(), ["w", "b", "x"])), str(_scoped()), str(gd.grad(_scoped(), ["c"], of=0))]
TOKEN = re.compile(r"%\d+|\d+\.\d+|\d+|[A-Za-z_][A-Za-z_0-9.]*|\S")
VOCAB = [*gd.OPS, *gd.DTYPES, "N", "M", "x", "y", "w", "b", "%0", "%1", "%99", "graph", "return", "axis", "keepdims",
         "mean", "shape", "value", "dtype", "True", "False", "None", "(", ")", "[", "]", "{", "}", ",", ";", ":",
         "=", "#", "grad", "-1", "0", "1", "2", "3", "25", "1e999", "nan", "inf", "-inf", "99999999999", "1.5",
         "(0,)", "(0, 1)", "()", "'a'", "[]", "²", "ñ", "\t", "\\", "\"", "'"]


def _mutate(data: st.DataObject, text: str) -> str:
    """One random edit at the level of characters, lines or tokens."""
    kind = data.draw(st.sampled_from(["char", "line", "token", "number", "vocab"]))
    if kind == "char":
        chars = list(text)
        i = data.draw(st.integers(0, len(chars) - 1))
        how = data.draw(st.sampled_from(["delete", "duplicate", "swap", "replace"]))
        if how == "delete":
            del chars[i]
        elif how == "duplicate":
            chars.insert(i, chars[i])
        elif how == "swap" and i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:
            chars[i] = data.draw(st.sampled_from(list("%:=,;[](){}#.-_ \nN0123456789aefxz'\"")))
        return "".join(chars)
    if kind == "line":
        lines = text.split("\n")
        i, j = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
        how = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
        if how == "delete":
            del lines[i]
        elif how == "duplicate":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    spans = [m.span() for m in TOKEN.finditer(text)]
    body = text.find("\n")
    if body > 0 and data.draw(st.booleans()):  # half the token edits hit node lines, where the semantics are
        spans = [s for s in spans if s[0] > body] or spans
    if kind == "number":
        spans = [s for s in spans if re.fullmatch(r"%?\d+(\.\d+)?", text[s[0]:s[1]])] or spans
    a, b = data.draw(st.sampled_from(spans))
    token = text[a:b]
    if kind == "number":
        new = data.draw(st.sampled_from(["0", "1", "2", "3", "7", "-1", "2.5", "1e999", "10000000000", "0.0"]))
        new = "%" + new.lstrip("-") if token.startswith("%") else new
    elif kind == "vocab":
        new = data.draw(st.sampled_from(VOCAB))
    else:
        how = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
        if how == "delete":
            new = ""
        elif how == "duplicate":
            new = token + " " + token
        else:
            c, d = data.draw(st.sampled_from(spans))
            if (c, d) <= (a, b):
                return text
            return text[:a] + text[c:d] + text[b:c] + token + text[d:]
    return text[:a] + new + text[b:]


def _exercise(text: str) -> None:
    """Parse; if that works the graph must verify, round-trip, compile and differentiate,
    each step either succeeding or raising GraphError."""
    try:
        g = gd.parse(text)
    except gd.GraphError:
        return
    g.verify()
    printed = str(g)
    assert str(gd.parse(printed)) == printed
    try:
        fn = gd.compile(g)
    except gd.GraphError:
        return
    assert fn.graph.outputs
    scalar = [i for i, o in enumerate(g.outputs) if o.shape == ()]
    if scalar and (g.inputs or g.params):
        gg = gd.grad(g, [*g.inputs, *g.params][:2], of=scalar[0])
        gg.verify()
        assert str(gd.parse(str(gg))) == str(gg)


@pytest.mark.slow
@fuzz(1200)
@given(st.data())
def test_mutated_ir_text_raises_graph_error_or_round_trips(data):
    text = data.draw(st.sampled_from(BASES))
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one edit: more texts get past the parser
        text = _mutate(data, text)
    _exercise(text)


@pytest.mark.parametrize("text", [
    "", "\n\n", "}", "{", "graph", "graph g(", "graph g() {", "graph g() {\n}", "graph g() {\n  return\n}",
    "graph g(x: f32[N,2]) {\n  return x, x, x\n}", "graph g(x: f32[N,2]) {\n  %0: f32[N,2] = relu x, \n  return %0\n}",
    "graph g(x: f32[N,2]) {\n  %0: f32[] = const[value=1.0, value=2.0]\n  return %0\n}",
    "graph g(x: f32[N,2]) {\n  %0: f32[] = const[value=1.0]  # grad # grad\n  return %0\n}",
    "graph g(x: f32[,,]) {\n  return x\n}", "graph g(x: f32[N,2];) {\n  return x\n}",
    "graph g(x: f32[N,2]) {\n  %0: f32[N,2] = relu[] x\n  return %0\n}",
    "graph g(x: f32[N,2]) {\n  %0: f32[N,2] = relu[axis=lambda: 0] x\n  return %0\n}",
    "graph g(x: f32[N,2]) {\n  %0: f32[N,2] = relu[" + "(" * 200 + "] x\n  return %0\n}",
    "graph g(x: f32[N,2]) {\n  %0: f32[N] = sum[axis=" + "9" * 5000 + "] x\n  return %0\n}",
    "graph g(x: f32[N,2]) {\n" + "  %0: f32[N,2] = relu x\n" * 3 + "  return %0\n}",
    "\x00graph g(x: f32[N,2]) {\n  return x\n}", "graph g(x: f32[N,2]) {\r\n  return x\r\n}",
])
def test_odd_ir_text(text):
    _exercise(text)


# -- wrong types anywhere in the public API --------------------------------------------------


def _junk(g: gd.Graph) -> list:
    """Arguments of every wrong kind: Python and numpy scalars, containers, tensors of other
    dtypes, dtypes, names, values of this graph and of another, graphs, functions."""
    other = gd.Graph("other").input("z", (3,))
    x = g.inputs["x"]
    return [None, 0, -1, 1.5, float("nan"), 10**30, True, "x", "", "%0", b"x", [1], (None, 2), (2.0,), {"a": 1},
            object(), torch.zeros(2), torch.zeros(()), torch.zeros(2, 2, dtype=torch.int64), np.zeros(2),
            np.float32(1), np.int64(2), x, [x], other, g.outputs[0], g, torch.float32, torch.int8, "f32", len]


def _api_graph() -> gd.Graph:
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    g.output(gd.sum(gd.matmul(x, g.param("w", torch.ones(2, 2)))))
    return g


API = {
    "Graph": lambda g, a: gd.Graph(a),
    "Graph.input name": lambda g, a: g.input(a, (2,)),
    "Graph.input shape": lambda g, a: g.input("a", a),
    "Graph.input dtype": lambda g, a: g.input("a", (2,), a),
    "Graph.param name": lambda g, a: g.param(a, torch.ones(2)),
    "Graph.param data": lambda g, a: g.param("p", a),
    "Graph.const value": lambda g, a: g.const(a),
    "Graph.const dtype": lambda g, a: g.const(1.0, a),
    "Graph.output": lambda g, a: g.output(a),
    "Graph.scope": lambda g, a: g.scope(a).__enter__(),
    "Graph.value": lambda g, a: g.value(a),
    "add": lambda g, a: gd.add(g.inputs["x"], a),
    "sub (reflected)": lambda g, a: a - g.inputs["x"],
    "matmul": lambda g, a: g.inputs["x"] @ a,
    "relu": lambda g, a: gd.relu(a),
    "transpose": lambda g, a: gd.transpose(a),
    "sum axis": lambda g, a: gd.sum(g.inputs["x"], axis=a),
    "mean keepdims": lambda g, a: gd.mean(g.inputs["x"], 0, keepdims=a),
    "sum_to shape": lambda g, a: gd.sum_to(g.inputs["x"], a),
    "broadcast_like axis": lambda g, a: gd.broadcast_like(g.outputs[0], g.inputs["x"], axis=a),
    "broadcast_like ref": lambda g, a: gd.broadcast_like(g.outputs[0], a),
    "mse target": lambda g, a: gd.mse(g.inputs["x"], a),
    "grad graph": lambda g, a: gd.grad(a, ["w"]),
    "grad wrt": lambda g, a: gd.grad(g, a),
    "grad wrt item": lambda g, a: gd.grad(g, [a]),
    "grad of": lambda g, a: gd.grad(g, ["w"], of=a),
    "compile": lambda g, a: gd.compile(a),
    "compile optimize": lambda g, a: gd.compile(g, optimize=a),
    "parse": lambda g, a: gd.parse(a),
    "parse params": lambda g, a: gd.parse("graph g(; w: f32[2]) {\n  return w\n}", params=a),
    "call by name": lambda g, a: gd.compile(g)(x=a),
    "call by position": lambda g, a: gd.compile(g)(a),
}


@pytest.mark.parametrize("call", API)
def test_wrong_types_anywhere_raise_graph_error_or_work(call):
    """Every argument of the public API, given every wrong kind of value: either it is a
    valid value after all (a str name, a number where numbers are fine) or GraphError."""
    for junk in _junk(_api_graph()):
        try:
            API[call](_api_graph(), junk)
        except gd.GraphError:
            pass


def _train_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(10, 2, generator=gen), torch.rand(10, 1, generator=gen)


def _net() -> gd.Sequential:
    torch.manual_seed(0)
    return gd.Sequential(gd.Linear(2, 3), gd.Tanh(), gd.Linear(3, 1))


def _fit_with(**kwargs):
    X, Y = _train_data()
    return _net().fit(X, Y, **{"verbose": False, "epochs": 1, **kwargs})


TRAINING_API = {
    **{f"fit {k}": (lambda k: lambda a: _fit_with(**{k: a}))(k)
       for k in ("loss", "optimizer", "schedule", "batch_size", "shuffle", "validation_data", "seed", "verbose")},
    "fit epochs": lambda a: _fit_with(epochs=a) if not (isinstance(a, int) and a > 100) else None,
    "fit X": lambda a: _net().fit(a, _train_data()[1], verbose=False),
    "fit Y": lambda a: _net().fit(_train_data()[0], a, verbose=False),
    "predict": lambda a: _net().predict(a),
    "evaluate X": lambda a: _net().evaluate(a, _train_data()[1]),
    "evaluate loss": lambda a: _net().evaluate(*_train_data(), loss=a),
    "SGD lr": lambda a: gd.SGD(lr=a),
    "SGD momentum": lambda a: gd.SGD(momentum=a),
    "SGD nesterov": lambda a: gd.SGD(momentum=0.5, nesterov=a),
    "SGD weight_decay": lambda a: gd.SGD(weight_decay=a),
    "StepDecay every": lambda a: gd.StepDecay(every=a, factor=0.5),
    "StepDecay factor": lambda a: gd.StepDecay(every=1, factor=a),
    "ExponentialDecay": lambda a: gd.ExponentialDecay(a),
    "CosineDecay": lambda a: gd.CosineDecay(a),
    "Linear in": lambda a: gd.Linear(a, 2),
    "Linear out": lambda a: gd.Linear(2, a),
    "Linear dtype": lambda a: gd.Linear(2, 2, dtype=a),
    "Linear generator": lambda a: gd.Linear(2, 2, generator=a),
    "Sequential": lambda a: gd.Sequential(a),
    "Sequential.add": lambda a: _net().add(a),
    "Sequential.graph loss": lambda a: _net().graph(a),
    "Sequential.graph name": lambda a: _net().graph(name=a),
    "Sequential.to": lambda a: _net().to(a),
}


@pytest.mark.parametrize("call", TRAINING_API)
def test_wrong_types_in_training_raise_value_error_or_work(call):
    """The training API's bad settings are ValueErrors naming the argument (GraphError is one)."""
    X, Y = _train_data()
    junk = [*_junk(_api_graph()), float("inf"), gd.MSE, gd.SGD, gd.SGD(), gd.MSE(), gd.StepDecay(1, 0.5),
            (X, Y, Y), (X,), torch.rand(10, 3), torch.rand(3, 2), X.numpy()]
    for value in junk:
        try:
            TRAINING_API[call](value)
        except ValueError:
            pass


# -- feeds --------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64]


@st.composite
def feeds(draw) -> object:
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "numpy", "list", "scalar", "none", "str"]))
    if kind in ("scalar", "none", "str"):
        return {"scalar": 1.0, "none": None, "str": "x"}[kind]
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    if kind == "numpy":
        return np.zeros(shape, np.float32)
    if kind == "list":
        return np.zeros(shape).tolist()
    t = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    if t.dim() == 2 and draw(st.booleans()):
        t = torch.zeros(shape[::-1], dtype=t.dtype).t()  # same shape, not contiguous
    return t


def _valid(x: object, y: object) -> bool:
    return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype == torch.float32
            and x.dim() == y.dim() == 2 and x.shape[1] == 2 and y.shape[1] == 1 and x.shape[0] == y.shape[0])


TINY_FN = gd.compile(tiny())


@pytest.mark.slow
@fuzz(400)
@given(feeds(), feeds(), st.booleans())
def test_random_feeds_run_or_raise_graph_error(x, y, positional):
    try:
        (loss,) = TINY_FN(x, y) if positional else TINY_FN(x=x, y=y)
    except gd.GraphError:
        assert not _valid(x, y)
        return
    assert _valid(x, y) and loss.shape == ()


# -- random graphs: gradients against torch.autograd ------------------------------------------


@pytest.mark.slow
@fuzz(150)
@given(programs(), st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_random_graph_gradients_match_autograd(program, seed, batch):
    steps, loss = program
    g, data = random_graph(program, seed, batch)
    wrt = ["x", "y", "c", "b", "W", "V"]
    gg = gd.grad(g, wrt)
    gg.verify()
    assert str(gd.parse(str(gg))) == str(gg)
    got = gd.compile(gg)(x=data["x"], y=data["y"])

    leaves = {k: t.clone().requires_grad_() for k, t in data.items()}
    ref = build_program(steps, loss, leaves, TORCH_LIB)
    expected = torch.autograd.grad(ref, [leaves[k] for k in wrt], allow_unused=True)
    torch.testing.assert_close(got[0], ref.detach())
    for name, value, want in zip(wrt, got[1:], expected, strict=True):
        torch.testing.assert_close(value, torch.zeros_like(data[name]) if want is None else want, msg=name)
