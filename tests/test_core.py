"""The IR, printer/parser, grad and compile: the functional half of the contract."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphdl as gd

TINY = """\
graph tiny(x: f32[N,2], y: f32[N,1]; w: f32[2,1], b: f32[1]) {
  %0: f32[N,1] = matmul x, w
  %1: f32[N,1] = add %0, b
  %2: f32[N,1] = tanh %1
  %3: f32[] = mse %2, y
  return %3
}"""


def tiny() -> gd.Graph:
    g = gd.Graph("tiny")
    x = g.input("x", (None, 2))
    y = g.input("y", (None, 1))
    w = g.param("w", torch.randn(2, 1))
    b = g.param("b", torch.zeros(1))
    out = gd.tanh(gd.add(gd.matmul(x, w), b))
    g.output(gd.mse(out, y))
    return g


def test_contract_snippet_runs_as_written():
    g = tiny()
    text = str(g)
    assert text == TINY
    assert str(gd.parse(text)) == text
    X, Y = torch.rand(8, 2), torch.rand(8, 1)
    (loss,) = gd.compile(g)(x=X, y=Y)
    gg = gd.grad(g, wrt=["w", "b"])
    loss2, dw, db = gd.compile(gg)(x=X, y=Y)
    w, b = (g.params[n].data.clone().requires_grad_() for n in ("w", "b"))
    ref = ((torch.tanh(X @ w + b) - Y) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(loss2, ref.detach())
    torch.testing.assert_close(dw, w.grad)
    torch.testing.assert_close(db, b.grad)


def test_gradient_graph_prints_exactly():
    g = gd.Graph("lin")
    x = g.input("x", (None, 3))
    w = g.param("w", torch.ones(3, 2))
    g.output(gd.sum(gd.relu(gd.matmul(x, w))))
    assert str(gd.grad(g, ["w"])) == """\
graph lin(x: f32[N,3]; w: f32[3,2]) {
  %0: f32[N,2] = matmul x, w
  %1: f32[N,2] = relu %0
  %2: f32[] = sum %1
  %3: f32[] = const[value=1.0]  # grad
  %4: f32[N,2] = broadcast_like %3, %1  # grad
  %5: f32[] = const[value=0.0]  # grad
  %6: f32[N,2] = greater %1, %5  # grad
  %7: f32[N,2] = mul %4, %6  # grad
  %8: f32[3,N] = transpose x  # grad
  %9: f32[3,2] = matmul %8, %7  # grad
  return %2, %9 (d/dw)
}"""


def test_scopes_and_attrs_round_trip():
    g = gd.Graph("scoped")
    x = g.input("x", (None, 4))
    with g.scope("0:Linear"):
        h = gd.mean(x, axis=1, keepdims=True)
    g.output(gd.sum(h))
    text = str(g)
    assert "%0: f32[N,1] = mean[axis=(1,), keepdims=True] x  # 0:Linear" in text
    gg = gd.grad(g, ["x"])
    assert "# grad 0:Linear" in str(gg)
    assert str(gd.parse(str(gg))) == str(gg)


def test_params_share_live_tensors_with_compiled_functions():
    g = tiny()
    fn = gd.compile(g)
    X, Y = torch.rand(4, 2), torch.rand(4, 1)
    before = fn(x=X, y=Y)[0]
    g.params["w"].data.add_(1.0)  # training updates params in place
    after = fn(x=X, y=Y)[0]
    assert not torch.equal(before, after)


def test_diamond_and_tied_weights_accumulate():
    g = gd.Graph("tied")
    x = g.input("x", (None, 3))
    w = g.param("w", torch.randn(3, 3, dtype=torch.float32))
    h = gd.tanh(gd.matmul(x, w))
    out = gd.matmul(h, w)  # w used twice
    d = gd.add(gd.mul(out, out), gd.sigmoid(out))  # out used three times
    g.output(gd.mean(d))
    X = torch.randn(5, 3)
    _, dw = gd.compile(gd.grad(g, ["w"]))(x=X)
    W = w.data.clone().requires_grad_()
    o = torch.tanh(X @ W) @ W
    (o * o + torch.sigmoid(o)).mean().backward()
    torch.testing.assert_close(dw, W.grad)


def test_grad_gives_zeros_for_unused_params():
    g = tiny()
    g.param("unused", torch.ones(3))
    _, d_unused = gd.compile(gd.grad(g, ["unused"]))(x=torch.rand(2, 2), y=torch.rand(2, 1))
    assert torch.equal(d_unused, torch.zeros(3))


def test_grad_wrt_an_input():
    g = tiny()
    X, Y = torch.rand(3, 2), torch.rand(3, 1)
    _, dx = gd.compile(gd.grad(g, ["x"]))(x=X, y=Y)
    Xl = X.clone().requires_grad_()
    ((torch.tanh(Xl @ g.params["w"].data + g.params["b"].data) - Y) ** 2).mean().backward()
    torch.testing.assert_close(dx, Xl.grad)


def test_batch_dimension_is_bound_at_run_time():
    fn = gd.compile(tiny())
    for n in (1, 5, 64):
        (loss,) = fn(x=torch.rand(n, 2), y=torch.rand(n, 1))
        assert loss.shape == ()


def test_compiled_source_is_kept_and_releases_values():
    fn = gd.compile(gd.grad(tiny(), ["w", "b"]))
    assert "torch.mm(" in fn.source and "del " in fn.source
    assert fn.source.count("\n    v") >= len(fn.graph.nodes) - 3  # one line per node (consts hoisted)


def test_optimize_false_keeps_the_graph_as_written():
    g = tiny()
    g.const(3.0)  # dead
    assert len(gd.compile(g, optimize=False).graph.nodes) == len(g.nodes)
    optimised = gd.compile(g).graph  # the passes drop the dead const (and fuse matmul+add into addmm)
    assert len(optimised.nodes) < len(g.nodes) - 1
    assert all(n.op.name != "const" for n in optimised.nodes)


def test_verify_catches_broken_use_lists():
    g = tiny()
    g.verify()
    g.nodes[1].inputs[0].users.clear()
    with pytest.raises(gd.GraphError, match="use-list"):
        g.verify()


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"x": torch.rand(4, 2)}, "missing input 'y'"),
        ({"x": torch.rand(4, 2), "y": torch.rand(4, 1), "z": torch.rand(1)}, "no input 'z'"),
        ({"x": torch.rand(4, 3), "y": torch.rand(4, 1)}, r"x is f32\[4,3\] .*declares f32\[N,2\]"),
        ({"x": torch.rand(4), "y": torch.rand(4, 1)}, "rank 1"),
        ({"x": torch.rand(4, 2), "y": torch.rand(5, 1)}, "disagree on N"),
        ({"x": torch.rand(4, 2, dtype=torch.float64), "y": torch.rand(4, 1)}, "f64.*declares f32"),
        ({"x": [[1.0, 2.0]], "y": torch.rand(1, 1)}, "must be a torch.Tensor"),
    ],
)
def test_bad_feeds_raise_graph_errors_naming_the_input(feeds, message):
    with pytest.raises(gd.GraphError, match=message):
        gd.compile(tiny())(**feeds)


def test_shape_error_names_node_op_shapes_location_and_hint():
    g = gd.Graph("bad")
    x = g.input("x", (None, 25))
    w = g.param("fc1.weight", torch.zeros(30, 25))
    with pytest.raises(gd.GraphError) as err:
        gd.matmul(x, w)
    msg = str(err.value)
    assert "matmul %0" in msg and "[N,25] @ [30,25]" in msg and "inner dims differ (25 vs 30)" in msg
    assert "did you mean to transpose fc1.weight?" in msg
    assert re.search(r"test_core\.py:\d+", msg)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("graph g(x: f32[N,2]) {\n  return x\n", "line 2"),
        ("graph g(x: f32[N,2]) {\n  %0: f32[N,2] = frob x\n  return %0\n}", "line 2: unknown op 'frob'"),
        ("graph g(x: f32[N,2]) {\n  %0: f32[N,2] = relu z\n  return %0\n}", "'z' is not defined"),
        ("graph g(x: f32[N,2]) {\n  %0: f32[N,3] = relu x\n  return %0\n}", r"declared f32\[N,3\]"),
        ("graph g(x: q8[N,2]) {\n  return x\n}", "unknown dtype 'q8'"),
        ("graph g(x: f32[N,2]) {\n  %0: f32[N,2] = add %1, x\n  %1: f32[N,2] = relu %0\n  return %1\n}",
         "depend on themselves"),
        ("graph g(x: f32[N,2]) {\n  %0: f32[N] = sum[axis=(1,] x\n  return %0\n}", "attributes"),
    ],
)
def test_malformed_text_raises_graph_error_with_line(text, message):
    with pytest.raises(gd.GraphError, match=message):
        gd.parse(text)


def test_parse_builds_text_whose_values_are_used_before_their_lines_in_dependency_order():
    text = ("graph g(x: f32[N,2]) {\n  %0: f32[N,2] = add %2, x\n  %1: f32[N,2] = relu x\n"
            "  %2: f32[N,2] = neg %1\n  return %0\n}")
    g = gd.parse(text)
    assert [n.op.name for n in g.nodes] == ["relu", "neg", "add"]
    assert str(gd.parse(str(g))) == str(g)


def test_graphdl_never_uses_torch_autograd_or_nn():
    root = pathlib.Path(gd.__file__).parent
    autograd = re.compile(r"torch\.autograd|from torch import autograd|requires_grad")
    nn = re.compile(r"torch\.nn\b|from torch import nn")
    # interop.py converts nn.Sequential to and from graphdl: it names torch.nn modules to read and
    # build them, and runs none (test_interop checks that no forward hook fires).
    offenders = [f"{p}:{i}" for p in root.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if autograd.search(line) or (nn.search(line) and p.name != "interop.py")]
    assert offenders == []


# -- random graphs: end-to-end gradients against torch.autograd -------------------------

UNARY = {"relu": (gd.relu, torch.relu), "tanh": (gd.tanh, torch.tanh), "sigmoid": (gd.sigmoid, torch.sigmoid),
         "neg": (gd.neg, torch.neg), "exp": (lambda v: gd.exp(gd.tanh(v)), lambda t: torch.exp(torch.tanh(t)))}
BINARY = {"add": (gd.add, torch.add), "sub": (gd.sub, torch.sub), "mul": (gd.mul, torch.mul)}


@st.composite
def programs(draw):
    """A random straight-line program over [B,4] values, [4] biases and [4,4] weights."""
    steps = []
    n_values = 2  # x and the first hidden value
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["unary", "binary", "bias", "matmul"]))
        a = draw(st.integers(0, n_values - 1))
        if kind == "unary":
            steps.append((kind, draw(st.sampled_from(sorted(UNARY))), a, None))
        elif kind == "binary":
            steps.append((kind, draw(st.sampled_from(sorted(BINARY))), a, draw(st.integers(0, n_values - 1))))
        else:
            steps.append((kind, draw(st.sampled_from(sorted(BINARY))), a, draw(st.integers(0, 1))))
        n_values += 1
    loss = draw(st.sampled_from(["mse", "mae", "mbe", "mean", "sum"]))
    return steps, loss


def _run(steps, loss, x, y, weights, biases, lib):
    mm, losses = lib["matmul"], lib["losses"]
    values = [x, lib["tanh"](mm(x, weights[0]))]
    for kind, name, a, b in steps:
        if kind == "unary":
            values.append(lib["unary"][name](values[a]))
        elif kind == "binary":
            values.append(lib["binary"][name](values[a], values[b]))
        elif kind == "bias":
            values.append(lib["binary"][name](values[a], biases[b]))
        else:
            values.append(mm(values[a], weights[b]))
    return losses[loss](values[-1], y)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.integers(0, 2**31 - 1))
def test_random_graph_gradients_match_autograd(program, seed):
    steps, loss = program
    gen = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)
    W = [torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.5 for _ in range(2)]
    B = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2)]
    g = gd.Graph("random")
    x, y = g.input("x", (None, 4), torch.float64), g.input("y", (None, 4), torch.float64)
    ws = [g.param(f"w{i}", t) for i, t in enumerate(W)]
    bs = [g.param(f"b{i}", t) for i, t in enumerate(B)]
    gd_lib = {"matmul": gd.matmul, "tanh": gd.tanh, "unary": {k: v[0] for k, v in UNARY.items()},
              "binary": {k: v[0] for k, v in BINARY.items()},
              "losses": {"mse": gd.mse, "mae": gd.mae, "mbe": gd.mbe,
                         "mean": lambda a, b: gd.mean(gd.mul(a, b)), "sum": lambda a, b: gd.sum(gd.mul(a, b))}}
    g.output(_run(steps, loss, x, y, ws, bs, gd_lib))
    names = [*(f"w{i}" for i in range(2)), *(f"b{i}" for i in range(2)), "x"]
    gg = gd.grad(g, names)
    gg.verify()
    assert str(gd.parse(str(gg))) == str(gg)
    got = gd.compile(gg)(x=X, y=Y)

    leaves = [t.clone().requires_grad_() for t in (*W, *B, X)]
    torch_lib = {"matmul": torch.mm, "tanh": torch.tanh, "unary": {k: v[1] for k, v in UNARY.items()},
                 "binary": {k: v[1] for k, v in BINARY.items()},
                 "losses": {"mse": lambda a, b: ((a - b) ** 2).mean(), "mae": lambda a, b: (a - b).abs().mean(),
                            "mbe": lambda a, b: (a - b).mean(), "mean": lambda a, b: (a * b).mean(),
                            "sum": lambda a, b: (a * b).sum()}}
    ref = _run(steps, loss, leaves[4], Y, leaves[:2], leaves[2:4], torch_lib)
    expected = torch.autograd.grad(ref, leaves, allow_unused=True)
    torch.testing.assert_close(got[0], ref.detach())
    for value, want, leaf in zip(got[1:], expected, leaves):
        torch.testing.assert_close(value, torch.zeros_like(leaf) if want is None else want)


# -- outputs belong to the caller (regressions found in review) --------------------------


def test_outputs_never_alias_params_constants_or_views():
    g = gd.Graph("alias")
    x = g.input("x", (None, 2))
    w = g.param("w", torch.randn(3, 2))
    s = g.param("s", torch.ones(()))
    g.output(gd.add(gd.mean(gd.matmul(x, gd.transpose(w))), s), w, gd.transpose(w))
    gg = gd.grad(g, ["w", "s"])  # dw comes out of a transposed product; ds is the constant 1
    fn = gd.compile(gg)
    X = torch.randn(4, 2)
    _, w_out, wt_out, dw, ds = fn(x=X)
    for t in (w_out, wt_out, dw, ds):
        assert t.is_contiguous()
    w_out.add_(1.0)
    wt_out.add_(1.0)
    ds.add_(5.0)
    assert not torch.equal(w_out, w.data) and not torch.equal(wt_out, w.data.T)
    torch.testing.assert_close(wt_out - 1.0, w.data.T)
    assert fn(x=X)[4].item() == 1.0  # the caller's edit did not reach the next call


@pytest.mark.parametrize("build", [lambda x, w: gd.sum(gd.tanh(gd.matmul(x, gd.transpose(w)))),
                                   lambda x, w: gd.add(gd.sum(w), gd.mean(x))],
                         ids=["transposed-product", "linear-in-w"])
def test_sgd_step_is_right_for_any_gradient_layout(build):
    g = gd.Graph("layout")
    x = g.input("x", (None, 2))
    w = g.param("w", torch.randn(3, 2))
    g.output(build(x, w))
    _, dw = gd.compile(gd.grad(g, ["w"]))(x=torch.randn(8, 2))
    expected = w.data - 0.1 * dw
    opt = gd.SGD(lr=0.1, momentum=0.9)
    opt.reset([w.data])
    opt.step([w.data], [dw])
    torch.testing.assert_close(w.data, expected)


def test_broadcast_like_gradient_keeps_the_input_shape():
    g = gd.Graph("bl")
    a = g.input("a", (1,), torch.float64)
    r = g.input("r", (None, 4), torch.float64)
    g.output(gd.sum(gd.mul(gd.broadcast_like(a, r, axis=0), r)))
    gg = gd.grad(g, ["a"])
    assert gg.outputs[1].shape == (1,)
    A, R = torch.randn(1, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    (da,) = gd.compile(gg)(a=A, r=R)[1:]
    torch.testing.assert_close(da, R.sum(1).sum().reshape(1))


def test_gradient_outputs_are_labelled_and_round_trip():
    g = tiny()
    gg = gd.grad(g, ["w", "b", "x"])
    assert gg.output_labels == ["", "d/dw", "d/db", "d/dx"]
    text = str(gg)
    assert text.splitlines()[-2] == "  return %3, %18 (d/dw), %14 (d/db), %16 (d/dx)"
    again = gd.parse(text)
    assert again.output_labels == gg.output_labels and str(again) == text
    assert gd.grad(gg, ["w"]).output_labels == ["", "d/dw", "d/db", "d/dx", "d/dw"]  # a second order keeps them
    compiled = gd.compile(gg)
    assert compiled.graph.output_labels == gg.output_labels  # passes keep them


@pytest.mark.parametrize("ret, message", [
    ("return %3 (d/dw", "cannot read the output '%3 \\(d/dw'"),
    ("return %3 (a b)", "output label 'a b' must name one output"),
    ("return %3 ()", "cannot read the output"),
    ("return %3 (x), ", "cannot read the output ''"),
    ("return (x)", r"'\(x\)' is not defined"),
])
def test_bad_output_labels_in_text_name_the_line(ret, message):
    with pytest.raises(gd.GraphError, match=message):
        gd.parse(TINY.replace("return %3", ret))


def test_output_labels_are_checked_and_kept_in_step():
    g = tiny()
    with pytest.raises(gd.GraphError, match="must name one output"):
        g.output(g.outputs[0], g.outputs[0], label="loss")
    with pytest.raises(gd.GraphError, match="must name one output"):
        g.output(g.outputs[0], label="two words")
    g.output(g.outputs[0], label="loss")
    assert g.output_labels == ["", "loss"] and str(g).splitlines()[-2] == "  return %3, %3 (loss)"
    g.output_labels.pop()
    with pytest.raises(gd.GraphError, match="2 outputs but 1 output labels"):
        g.verify()


def test_import_graphdl_leaves_networkx_for_first_use():
    """networkx was most of `import graphdl`'s own time (0.13 s of 0.16 s): it loads when
    a graph algorithm first needs it, not at import."""
    import subprocess
    import sys
    code = "import sys, graphdl; print('networkx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(pathlib.Path(gd.__file__).parent.parent)})
    assert out.stdout.strip() == "False"
