"""Errors that teach: one test per message that matters.

Each test builds the mistake a user makes and asserts that graphdl raises `gd.GraphError`
(a ValueError) whose message names what the user needs: the node, the op, the shapes,
the line of their code that created the node, and a hint. Nothing may escape as a bare
TypeError, AttributeError or torch/networkx error from inside graphdl.
"""

from __future__ import annotations

import pathlib
import re
import time

import numpy as np
import pytest
import torch
from test_core import tiny  # the contract's graph

import graphdl as gd

HERE = r"test_errors\.py:\d+"  # "created at" must point at the test's own line


def message(fn, *args, **kwargs) -> str:
    """The GraphError message `fn(*args, **kwargs)` raises."""
    with pytest.raises(gd.GraphError) as err:
        fn(*args, **kwargs)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def names(msg: str, *parts: str) -> None:
    """Every part (a regex) appears in the message."""
    for part in parts:
        assert re.search(part, msg), f"{part!r} not in:\n{msg}"


# -- building: shapes, with node, op, shapes, location and hint -------------------------


def test_matmul_mismatch_names_node_op_shapes_location_and_transpose_hint():
    g = gd.Graph("mlp")
    h = g.input("h", (None, 25))
    w = g.param("fc1.weight", torch.zeros(30, 25))
    msg = message(gd.matmul, h, w)
    names(msg, r"^matmul %0\(h: f32\[N,25\], fc1.weight: f32\[30,25\]\)", r"\[N,25\] @ \[30,25\]",
          r"inner dims differ \(25 vs 30\)", rf"created at .*{HERE}", r"hint: did you mean to transpose fc1.weight\?")


def test_broadcast_error_names_shapes_and_explains_symbolic_dims():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    b = g.param("b", torch.zeros(4))
    msg = message(gd.add, x, b)
    names(msg, r"add %0\(x: f32\[N,3\], b: f32\[4\]\)", r"\[N,3\] and \[4\] do not broadcast", HERE,
          "hint: shapes broadcast when", "symbolic dim such as N only matches itself or 1")


def test_loss_shape_error_tells_to_give_the_target_the_predictions_shape():
    g = gd.Graph("g")
    msg = message(gd.mse, g.input("p", (None, 1)), g.input("y", (None, 3)))
    names(msg, r"mse %0", r"prediction \[N,1\] and target \[N,3\] differ", HERE,
          r"hint: give the target the prediction's shape, \[N,1\]: declare it with shape \(None, 1\)")


def test_a_target_that_would_broadcast_the_prediction_is_refused():
    """pred [N,1] against y [N] broadcasts to [N,N]: a silently wrong loss, not a shape error, in torch."""
    g = gd.Graph("g")
    msg = message(gd.mse, g.input("p", (None, 1)), g.input("y", ("N",)))
    names(msg, r"^mse %0\(p: f32\[N,1\], y: f32\[N\]\)", r"prediction \[N,1\] and target \[N\] differ",
          r"they broadcast to \[N,N\]", HERE, r"hint: .*\[N,1\].*y\.reshape\(-1, 1\)")


def test_a_scalar_target_still_broadcasts():
    g = gd.Graph("g")
    w = g.param("w", torch.ones(3))
    g.output(gd.mse(w, 0.0))
    assert gd.compile(g)()[0].item() == 1.0


def test_layer_scope_is_named_in_builder_errors():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    with g.scope("2:Linear"):
        msg = message(gd.matmul, x, g.param("2.weight", torch.zeros(3, 4)))
    names(msg, r"created at .*\(in layer 2:Linear\)")


def test_sequential_builder_errors_name_the_layer_and_the_users_line():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 1))
    model.layers[2].weight = torch.zeros(25, 1, dtype=torch.float64)  # e.g. loaded from a float64 model
    msg = message(model.predict, torch.rand(4, 2))
    names(msg, r"^matmul %3\(%2: f32\[N,25\], 2.weight: f64\[25,1\]\)", rf"created at .*{HERE} \(in layer 2:Linear\)",
          r"dtypes differ", "hint: make every input of the op the same dtype")


def test_a_layer_weight_of_the_wrong_shape_is_refused_where_it_is_assigned():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 1))
    with pytest.raises(gd.GraphError, match=r"Linear\(25, 1\)\.weight must have shape \[25, 1\], got \[1, 25\]; "
                                            r"did you mean to transpose it \(tensor\.T\)\?"):
        model.layers[2].weight = torch.zeros(1, 25)  # e.g. loaded from torch.nn.Linear, which stores [out, in]
    with pytest.raises(gd.GraphError, match=r"Linear\(2, 25\)\.bias must have shape \[25\], got \[2\]"):
        model.layers[0].bias = torch.zeros(2)
    assert model.layers[2].weight.shape == (25, 1)  # the layer kept what it had


def test_dtype_mismatch_names_both_values():
    g = gd.Graph("g")
    msg = message(gd.matmul, g.input("x", (None, 3)), g.param("w", torch.zeros(3, 3, dtype=torch.float64)))
    names(msg, r"dtypes differ \(x: f32, w: f64\)", "hint: make every input of the op the same dtype")


def test_value_of_another_graph_names_node_both_graphs_and_location():
    g, h = gd.Graph("g"), gd.Graph("h")
    msg = message(gd.add, g.input("x", (None, 2)), h.input("y", (None, 2)))
    names(msg, r"add %0\(x: f32\[N,2\], y: f32\[N,2\]\)", "y belongs to graph 'h', not 'g'", HERE,
          "hint: build each graph from its own inputs and params")


@pytest.mark.parametrize("bad, kind", [(torch.zeros(2), "Tensor"), (np.zeros(2), "ndarray"), ("x", "str"),
                                       (None, "NoneType"), (True, "bool"), ([1.0], "list")])
def test_op_input_of_the_wrong_type_is_named_with_its_position(bad, kind):
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    msg = message(gd.add, x, bad)
    names(msg, rf"add %0\(x: f32\[N,2\], {kind}\): input 1 is a {kind}", HERE)
    if kind == "Tensor":
        names(msg, "hint: wrap tensors with Graph.param or Graph.input")


@pytest.mark.parametrize("args", [(1, 2), ("x",), ()])
def test_op_without_any_graph_value_says_where_values_come_from(args):
    msg = message(gd.add if len(args) == 2 else gd.relu, *args)
    names(msg, "at least one input must be a graph value", "Graph.input, Graph.param", HERE)


def test_a_failed_op_leaves_the_graph_as_it_was():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    before = str(g)
    message(gd.matmul, x, 2.0)  # the 2.0 became a const node before the shape rule failed
    assert str(g) == before and g.nodes == []


@pytest.mark.parametrize("axis, expect", [(1.0, "axis must be None, an int or a tuple of ints, got 1.0"),
                                          ("1", "axis must be None, an int or a tuple of ints"),
                                          (5, r"axis 5 is out of range for shape \[N,2\]"),
                                          ((0, 0), "repeats an axis"), ((), r"axis=\(\) names no axis")])
def test_bad_reduction_axes(axis, expect):
    g = gd.Graph("g")
    msg = message(gd.sum, g.input("x", (None, 2)), axis=axis)
    names(msg, r"^sum %0\(x: f32\[N,2\]\)", expect, HERE)


def test_empty_axis_is_refused_because_torch_would_reduce_everything():
    g = gd.Graph("g")
    msg = message(gd.mean, g.input("x", (3, 4)), axis=[])
    names(msg, "names no axis", "hint: use axis=None to reduce every axis")


@pytest.mark.parametrize("axis", [0, -1, (0,), [0]])
@pytest.mark.parametrize("reduce", [gd.sum, gd.mean])
def test_a_0d_value_has_no_axis_to_reduce(reduce, axis):
    """mean(x, axis=0) on a 0-d x used to build and then fail in grad + compile with an IndexError."""
    g = gd.Graph("g")
    msg = message(reduce, g.param("w", torch.tensor(2.0)), axis=axis)
    names(msg, rf"^{reduce.__name__} %0\(w: f32\[\]\): axis .* is out of range for shape \[\]",
          "hint: a 0-d value has no axes; use axis=None", HERE)


@pytest.mark.parametrize("g_shape, ref_shape, axis, expect", [
    ((3,), (3,), 0, r"\[3\] is not \[3\] reduced over axes \(0,\)"),
    ((1,), (2, 3), (0, 1), r"\[1\] is not \[2,3\] reduced over axes \(0, 1\)"),
    ((3,), (2, 3), (), r"axis=\(\) names no axis"),
])
def test_broadcast_like_axis_must_describe_a_reduction(g_shape, ref_shape, axis, expect):
    """Its VJP reduces over `axis`: a g that is not such a reduction failed only in grad."""
    g = gd.Graph("g")
    msg = message(gd.broadcast_like, g.input("g", g_shape), g.input("ref", ref_shape), axis=axis)
    names(msg, "^broadcast_like", expect)


def test_numpy_integer_axes_are_axes():
    g = gd.Graph("g")
    out = gd.sum(g.input("x", (3, 4)), axis=np.int64(-1))
    assert out.shape == (3,) and out.node.attrs["axis"] == (1,) and type(out.node.attrs["axis"][0]) is int


def test_keepdims_and_mean_must_be_flags():
    g = gd.Graph("g")
    x = g.input("x", (3, 4))
    names(message(gd.sum, x, axis=1, keepdims="no"), "keepdims='no' must be True or False")
    names(message(gd.broadcast_like, g.input("s", (3,)), x, axis=1, mean=[1]), r"mean=\[1\] must be True or False")


@pytest.mark.parametrize("shape", [5, 1.5, (1.5,), (-1,), ("a b",)])
def test_sum_to_shape_must_be_a_shape(shape):
    g = gd.Graph("g")
    names(message(gd.sum_to, g.input("x", (3, 4)), shape), r"sum_to %0", "must be a tuple of non-negative ints")


def test_unknown_attribute_lists_the_ops_attributes():
    g = gd.Graph("g")
    x = g.input("x", (3,))
    names(message(lambda: gd.relu(x, foo=1)), "unknown attribute", "foo", "hint: relu takes no attributes")


def test_wrong_number_of_inputs():
    g = gd.Graph("g")
    x = g.input("x", (3,))
    names(message(gd.relu, x, x), r"relu %0\(x: f32\[3\], x: f32\[3\]\): takes 1 input\(s\), got 2")


# -- declaring inputs, params, constants, names -----------------------------------------


@pytest.mark.parametrize("name", [3, None, "", "a b", "a..b", "ñ", "x-1"])
def test_graph_name_must_be_an_ascii_name(name):
    names(message(gd.Graph, name), "graph name", "must be a str of ASCII letters")


@pytest.mark.parametrize("name", [3, None, "", "a b", "x-1"])
def test_input_and_param_names(name):
    names(message(gd.Graph("g").input, name, (2,)), "is not valid")
    names(message(gd.Graph("g").param, name, torch.zeros(2)), "is not valid")


def test_a_name_defined_twice():
    g = gd.Graph("g")
    g.input("x", (2,))
    names(message(g.param, "x", torch.zeros(2)), "'x' is already defined; pick another name")


@pytest.mark.parametrize("shape, expect", [
    ((None, 2.0), "dimension 2.0"), ((None, -2), "dimension -2"), ((True, 2), "dimension True"),
    (3, "shape must be a sequence"), ((np.int64(3),), "dimension"), ((None, "2"), "dimension '2'"),
])
def test_input_shape_dims(shape, expect):
    names(message(gd.Graph("g").input, "x", shape), "input x", expect, r"\(None, 2\)|non-negative int, None")


@pytest.mark.parametrize("dtype, expect", [
    (torch.int64, "torch.int64 is not supported"), ("f32", r"did you mean torch.float32\?"),
    ([1], r"\[1\] is not supported"), (np.float32, "is not supported"),
])
def test_input_dtype(dtype, expect):
    names(message(gd.Graph("g").input, "x", (2,), dtype), "input x: dtype", expect)


@pytest.mark.parametrize("data, expect", [(np.zeros(2), "got ndarray"), ([1.0], "got list"),
                                          (torch.zeros(2, dtype=torch.int64), "floating dtype")])
def test_param_value(data, expect):
    names(message(gd.Graph("g").param, "w", data), "param w", expect)


@pytest.mark.parametrize("value, expect", [("a", "must be a real number such as 2 or 0.5, got str"),
                                           (torch.ones(3), "got Tensor"), (10**400, "too large for a float")])
def test_const_value(value, expect):
    names(message(gd.Graph("g").const, value), "const: value", expect, HERE)


def test_const_dtype():
    names(message(gd.Graph("g").const, 1.0, torch.int32), "const: dtype torch.int32 is not supported")
    names(message(gd.Graph("g").const, 1.0, [1]), r"const: dtype \[1\] is not supported")


def test_scope_must_be_a_one_line_str():
    g = gd.Graph("g")
    for bad in (3, "a\nb"):
        with pytest.raises(gd.GraphError, match="must be a one-line str"), g.scope(bad):
            pass


def test_output_must_be_a_value_of_the_graph():
    g, h = gd.Graph("g"), gd.Graph("h")
    names(message(g.output, 3), "output 3 is not a value of this graph")
    names(message(g.output, h.input("x", (2,))), r"output x: f32\[2\] is not a value of this graph")


# -- verify -----------------------------------------------------------------------------


def test_verify_names_where_the_broken_node_was_created():
    g = tiny()
    g.nodes[1].out.shape = (5,)  # corrupt what add's rule gives
    names(message(g.verify), r"node %1 \(add, created at .*test_core\.py:\d+\)", r"output is f32\[5\]")


def test_using_a_removed_nodes_value_is_reported_not_a_recursion_error():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    h = gd.relu(x)
    g.remove_node(h.node)
    g.output(gd.tanh(h))
    assert h.label == "%?"
    names(message(g.verify), r"node %0 \(tanh", "uses the value of a removed node \\(relu\\)")
    names(message(gd.compile, g), "removed node")


# -- grad ---------------------------------------------------------------------------------


def test_grad_of_something_that_is_not_a_graph():
    names(message(gd.grad, "tiny", ["w"]), "grad takes a gd.Graph, got str")


@pytest.mark.parametrize("wrt, expect", [
    (None, "wrt must be a list of input or param names"),
    ([3], "wrt 3 \\(int\\) is not an input or param of graph tiny"),
    (["q"], "wrt 'q' is not an input or param.*hint: pass the names of inputs or params; graph tiny has: x, y, w, b"),
    (["%3"], "not values computed by nodes"),
])
def test_grad_wrt_names_what_exists(wrt, expect):
    msg = message(gd.grad, tiny(), wrt)
    assert re.search(expect, msg.replace("\n", " ")), msg


def test_grad_wrt_the_output_value_explains_inputs_and_params_only():
    g = tiny()
    msg = message(gd.grad, g, [g.outputs[0]])
    names(msg, r"wrt %3: f32\[\] \(Value\)", "not values computed by nodes", "make it an input")


def test_grad_wrt_a_param_value_says_pass_its_name():
    g = tiny()
    names(message(gd.grad, g, [g.params["w"]]), r"wrt takes names, got the param w: f32\[2,1\]",
          r"hint: pass its name, wrt=\['w'\]")


def test_grad_of_a_non_scalar_output_and_of_a_graph_without_outputs():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    names(message(gd.grad, g, ["x"]), "has no outputs; add the loss with graph.output")
    g.output(gd.relu(x))
    names(message(gd.grad, g, ["x"]), "is not a scalar; reduce it first")


def test_no_non_float_value_can_exist_to_differentiate():
    """grad wrt a non-float value cannot be asked for: graphdl values are floating by construction."""
    names(message(gd.Graph("g").input, "i", (2,), torch.int32), "not supported")
    names(message(gd.Graph("g").param, "i", torch.zeros(2, dtype=torch.bool)), "floating dtype")


# -- compile and feeds ----------------------------------------------------------------------


def test_compile_something_that_is_not_a_graph_or_has_no_outputs():
    names(message(gd.compile, 3), "compile takes a gd.Graph, got int")
    names(message(gd.compile, gd.Graph("g")), "has no outputs; add one with graph.output")


@pytest.mark.parametrize("name", ["torch", "math", "c0", "P0", "def", "None", "lambda"])
def test_graph_names_that_clash_with_generated_code_still_compile(name):
    g = gd.Graph(name)
    x = g.input("x", (3,))
    g.output(gd.mul(gd.add(x, 2.0), g.param("w", torch.full((3,), 2.0))))
    (out,) = gd.compile(g)(x=torch.ones(3))
    assert torch.equal(out, torch.full((3,), 6.0))


@pytest.mark.parametrize("x, expect", [
    (np.zeros((4, 2), np.float32), r"input x must be a torch.Tensor \(f32\[N,2\]\), got ndarray; "
                                   r"convert it with torch.as_tensor\(x, dtype=torch.float32\)"),
    ([[1.0, 2.0]], "got list"),
    (1.0, "got float"),
    (torch.tensor(1.0), r"input x has rank 0 \(f32\[\]\) but the graph declares rank 2 \(f32\[N,2\]\)"),
    (torch.zeros(4, 2, dtype=torch.int64), r"input x is int64\[4,2\] .*convert it with .to\(torch.float32\)"),
    (torch.zeros(4, 3), r"dim 1 is 3, expected 2"),
])
def test_bad_feeds(x, expect):
    names(message(gd.compile(tiny()), x=x, y=torch.rand(4, 1)), "graph tiny: ", expect)


def test_feeds_given_twice_or_too_many():
    fn = gd.compile(tiny())
    names(message(fn, torch.rand(1, 2), x=torch.rand(1, 2)), "input x given both by position and by name")
    names(message(fn, torch.rand(1, 2), torch.rand(1, 1), torch.rand(1)), "takes 2 inputs .*got 3 positional")


def test_non_contiguous_feeds_are_fine():
    g = tiny()
    X, Y = torch.rand(2, 5).t(), torch.rand(5, 1)
    assert not X.is_contiguous()
    torch.testing.assert_close(gd.compile(g)(x=X, y=Y)[0], gd.compile(g)(x=X.contiguous(), y=Y)[0])


def test_run_time_failure_names_the_ir_line_where_it_was_made_and_a_changed_param():
    g = tiny()
    fn = gd.compile(g)
    g.params["w"].data.resize_(3, 3)
    msg = message(fn, x=torch.rand(1, 2), y=torch.rand(1, 1))
    names(msg, r"running `%0: f32\[N,1\] = (matmul|addmm)[^`]*x, w` failed: RuntimeError",
          r"created at .*test_core\.py:\d+",
          r"hint: a param changed after compile \(w is now f32\[3,3\], declared f32\[2,1\]\)")


# -- IR text ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expect", [
    ("graph g(x: f32[²,2]) {\n  return x\n}", r"line 1: dimension '²' must be a whole number"),
    ("graph a..b(x: f32[N,2]) {\n  return x\n}", "line 1: graph name 'a..b'"),
    ("graph g(x.: f32[N,2]) {\n  return x.\n}", "line 1: .*name 'x.' is not valid"),
    ("graph g(; w: f32[100000,100000]) {\n  return w\n}",
     r"line 1: param w is declared f32\[100000,100000\] \(10,000,000,000 elements\); pass its tensor with "
     r"parse\(text, params=\{'w': tensor\}\)"),
    ("graph g(x: f32[N,2]) {\n  %0: f32[N] = sum[axis=1.0] x\n  return %0\n}", "line 2: sum %0.*axis must be None"),
    ("graph g(x: f32[N,2]) {\n  %0: f32[2] = sum_to[shape=2] x\n  return %0\n}", "line 2: sum_to %0.*shape 2 must be"),
    ("graph g(x: f32[N,2]) {\n  %0: f32[N] = sum[**{'axis': 1}] x\n  return %0\n}", "name=value pairs"),
    ("graph g(x: f32[N,2]; w: f32[3,2]) {\n  %0: f32[N,2] = matmul x, w\n  return %0\n}",
     r"line 2: matmul %0\(x: f32\[N,2\], w: f32\[3,2\]\): .*inner dims differ \(2 vs 3\)\n"
     r"  hint: did you mean to transpose w\?\n  2 \| %0: f32\[N,2\] = matmul x, w$"),
])
def test_ir_text_errors_name_the_line(text, expect):
    names(message(gd.parse, text), "^IR text, line", expect)


def test_ir_text_error_keeps_the_hint_and_drops_the_created_at():
    msg = message(gd.parse, "graph g(x: f32[N,2]; w: f32[3,2]) {\n  %0: f32[N,2] = matmul x, w\n  return %0\n}")
    assert "created at" not in msg and "hint: did you mean to transpose w?" in msg


@pytest.mark.parametrize("params, expect", [
    ([1], "params must be a dict of name -> torch.Tensor, got list"),
    ({"w": np.zeros(2)}, r"params\['w'\] must be a torch.Tensor, got ndarray"),
    ({"w": torch.zeros(2), "wb": torch.zeros(1)}, "params=.*gives 'wb', which the text does not declare; "
                                                 "it declares: w"),
])
def test_parse_params(params, expect):
    names(message(gd.parse, "graph g(; w: f32[2]) {\n  return w\n}", params), expect)


def test_huge_headers_parse_in_linear_time():
    """A regex lookahead made splitting the header quadratic: 200k dims took ~30 s."""
    text = "graph g(x: f32[" + "N," * 200_000 + "2]) {\n  return x\n}"
    started = time.perf_counter()
    assert gd.parse(text).inputs["x"].ndim == 200_001
    assert time.perf_counter() - started < 3.0
    started = time.perf_counter()
    names(message(gd.parse, "graph g(" + "," * 200_000 + ") {\n  return\n}"), "cannot read the declaration")
    assert time.perf_counter() - started < 3.0


def test_non_finite_constants_compile_and_round_trip():
    g = gd.Graph("g")
    x = g.input("x", (3,))
    g.output(gd.add(gd.add(x, float("inf")), gd.mul(x, float("nan"))), gd.add(x, float("-inf")))
    text = str(g)
    assert "value=inf" in text and "value=nan" in text and "value=-inf" in text
    assert str(gd.parse(text)) == text
    a, b = gd.compile(g)(x=torch.ones(3))
    assert torch.isnan(a).all() and torch.isneginf(b).all()


# -- training: bad settings raise ValueError naming the argument ------------------------------


def _model() -> gd.Sequential:
    torch.manual_seed(0)
    return gd.Sequential(gd.Linear(2, 4), gd.Tanh(), gd.Linear(4, 1))


def _data(n: int = 20, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, generator=gen) * scale, torch.rand(n, 1, generator=gen) * scale


def _fit_message(*args, **kwargs) -> str:
    X, Y = _data()
    kwargs = {"verbose": False, **kwargs}
    with pytest.raises(ValueError) as err:
        _model().fit(*(args or (X, Y)), **kwargs)
    return str(err.value)


@pytest.mark.parametrize("make, expect", [
    (lambda: gd.SGD(lr=-0.1), r"lr must be in \[0.0, inf\], got -0.1"),
    (lambda: gd.SGD(lr=float("nan")), "lr must be a finite number, got nan"),
    (lambda: gd.SGD(lr=float("inf")), "lr must be a finite number, got inf"),
    (lambda: gd.SGD(momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
    (lambda: gd.SGD(momentum=-0.5), r"momentum must be in \[0.0, 1.0\), got -0.5"),
])
def test_bad_optimizer_settings_name_the_argument(make, expect):
    with pytest.raises(ValueError, match=expect):
        make()


X_NAN = torch.tensor([[0.1, 0.2], [0.3, float("nan")], [0.5, 0.6]])


@pytest.mark.parametrize("args, kwargs, expect", [
    ((), {"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
    ((), {"epochs": -1}, "epochs must be a whole number >= 0, got -1"),
    ((torch.rand(4, 2), torch.rand(3, 1)), {}, "X has 4 examples but Y has 3"),
    ((torch.rand(4, 3), torch.rand(4, 1)), {}, "X has 3 features but the model takes 2"),
    ((torch.rand(4, 2).numpy(), torch.rand(4, 1)), {}, "X must be a torch.Tensor, got ndarray"),
    ((X_NAN, torch.rand(3, 1)), {}, r"X has NaN or inf values, first at X\[1, 1\] = nan; drop or repair"),
    ((torch.rand(3, 2), torch.tensor([[0.0], [float("inf")], [1.0]])), {}, r"Y has NaN or inf .* Y\[1, 0\] = inf"),
    ((), {"validation_data": (X_NAN, torch.rand(3, 1))}, r"X \(validation\) has NaN or inf values"),
    ((torch.rand(0, 2), torch.rand(0, 1)), {}, "X and Y have no examples"),
    ((), {"validation_data": torch.rand(3, 2)}, r"validation_data must be a pair \(X_val, Y_val\), got Tensor"),
    ((), {"validation_data": (1, 2, 3)}, "validation_data must be a pair .* got tuple of length 3"),
    ((), {"seed": 1.5}, r"seed must be a whole number in \[-9223372036854775808, 18446744073709551615\], got 1.5"),
    ((), {"schedule": 3}, "schedule must be a graphdl schedule such as gd.StepDecay"),
    ((), {"schedule": lambda epoch, lr: -lr}, "gave lr=-0.01 for epoch 1; a learning rate must be a finite number"),
    ((), {"schedule": lambda lr: lr}, r"cannot be called as schedule\(epoch, base_lr\)"),
    ((), {"shuffle": torch.ones(2)}, "shuffle must be True or False"),
    ((), {"verbose": "no"}, "verbose must be True or False, got 'no'"),
    ((torch.rand(4, 2, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)), {},
     r"input x is f64\[4,2\] but the graph declares f32\[N,2\]; convert it with .to\(torch.float32\)"),
])
def test_bad_fit_arguments_name_the_argument(args, kwargs, expect):
    names(_fit_message(*args, **kwargs), expect)


@pytest.mark.parametrize("make, expect", [
    (lambda: gd.SGD(momentum=0.5, nesterov=torch.ones(2)), "nesterov must be True or False"),
    (lambda: gd.Linear(10**30, 2), "in_features=10{30} is too large"),
    (lambda: gd.Linear(2, 2, dtype=torch.int64), "Linear: dtype torch.int64 is not supported; use one of"),
    (lambda: gd.Linear(2, 2, generator=0), "generator must be a torch.Generator or None, got int"),
    (lambda: _model().to("nowhere"), "device 'nowhere' cannot hold the model"),
    (lambda: _model().evaluate(*_data(), loss=["mse"]), "loss must be a graphdl loss such as gd.MSE"),
])
def test_bad_layer_optimizer_and_model_settings(make, expect):
    with pytest.raises(ValueError, match=expect.replace("10{30}", "1" + "0" * 30)):
        make()


BIG = 10**400  # a Python int no float can hold


@pytest.mark.parametrize("make, expect", [
    (lambda: gd.Linear(2, 2, dtype=torch.float8_e4m3fn),
     "Linear: dtype torch.float8_e4m3fn is not supported; use one of torch.float16, torch.bfloat16, torch.float32, "
     "torch.float64"),
    (lambda: gd.Linear(2, 2, dtype=torch.complex64), "dtype torch.complex64 is not supported"),
    (lambda: gd.Linear(2, 2, dtype="f32"), r"dtype 'f32' is not supported; .*did you mean torch.float32\?"),
    (lambda: gd.SGD(lr=BIG), r"lr=10{11}\.\.\.0{8} \(401 digits\) is too large for a float; lr must be a finite "
                             r"number in \[0.0, inf\]"),
    (lambda: gd.SGD(lr=True), "lr must be a finite number, got True"),
    (lambda: gd.SGD(lr=0.1 + 0j), r"lr must be a finite number, got \(0.1\+0j\)"),
    (lambda: gd.SGD(lr=torch.tensor(0.1)), r"lr must be a finite number, got tensor\(0.1000\); pass a Python number"),
    (lambda: gd.SGD(lr=np.float32("nan")), r"lr must be a finite number, got np.float32\(nan\)"),
    (lambda: gd.SGD(momentum=np.float64(1.0)), r"momentum must be in \[0.0, 1.0\), got np.float64\(1.0\)"),
    (lambda: gd.SGD(weight_decay=-BIG), "weight_decay=-10{10}.* is too large for a float"),
    (lambda: gd.StepDecay(every=1, factor=BIG), "factor=10{11}.* is too large for a float"),
    (lambda: gd.StepDecay(every=2.0, factor=0.5), r"every must be a whole number >= 1, got 2.0"),
    (lambda: gd.ExponentialDecay(rate=BIG), "rate=10{11}.* is too large"),
    (lambda: gd.CosineDecay(epochs=10, min_lr=BIG), "min_lr=10{11}.* is too large"),
    (lambda: gd.Linear(np.int64(0), 2), "in_features must be a whole number >= 1, got np.int64\\(0\\)"),
])
def test_number_settings_are_checked_whatever_their_type(make, expect):
    with pytest.raises(ValueError, match=expect.replace("10{11}", "1" + "0" * 11).replace("10{10}", "1" + "0" * 10)
                       .replace("0{8}", "0" * 8)):
        make()


def test_any_finite_real_number_type_is_a_number_setting():
    from fractions import Fraction
    opt = gd.SGD(lr=np.float32(0.5), momentum=Fraction(1, 2), weight_decay=np.int64(0))
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.5, 0.5, 0.0)
    assert all(type(v) is float for v in (opt.lr, opt.momentum, opt.weight_decay))
    step = gd.StepDecay(every=np.int64(2), factor=np.float16(0.5))
    assert (step.every, step.factor) == (2, 0.5) and type(step.every) is int
    layer = gd.Linear(np.int64(2), np.uint8(3))
    assert layer.config()["in_features"] == 2 and type(layer.config()["out_features"]) is int  # JSON-able
    X, Y = _data()
    history = _model().fit(X, Y, optimizer=opt, epochs=np.int64(2), batch_size=np.int32(8), seed=np.uint64(2**64 - 1),
                           schedule=lambda epoch, lr: np.float32(lr / 2), verbose=False)
    assert history["lr"] == [0.25, 0.25]
    g = gd.Graph("g")
    out = gd.mul(g.input("x", (2,)), np.float32(3))  # a numpy scalar becomes a const, like a Python float
    assert gd.compile(g.output(out) or g)(x=torch.ones(2))[0].tolist() == [3.0, 3.0]


@pytest.mark.parametrize("kwargs, expect", [
    ({"seed": 2**70}, "seed=1180591620717411303424 is too large; seed must be at most 18446744073709551615"),
    ({"seed": -2**70}, "seed must be a whole number >= -9223372036854775808"),
    ({"batch_size": 2.0}, r"batch_size must be a whole number >= 1, got 2.0"),
    ({"schedule": lambda epoch, lr: BIG}, r"gave lr=10{11}.*\(401 digits\) for epoch 1; a learning rate must be"),
    ({"schedule": lambda epoch, lr: float("nan")}, "gave lr=nan for epoch 1"),
    ({"schedule": lambda epoch, lr: "0.1"}, "gave lr='0.1' for epoch 1"),
    ({"schedule": gd.StepDecay(every=1, factor=1e300), "optimizer": gd.SGD(lr=0.0), "epochs": 3},
     r"schedule StepDecay\(every=1, factor=1e\+300\) overflowed computing the lr for epoch 3"),
])
def test_fit_number_settings_and_schedule_outputs(kwargs, expect):
    names(_fit_message(**kwargs), expect.replace("10{11}", "1" + "0" * 11))


def test_model_file_dtypes_are_checked_by_name():
    for name in ("float8_e4m3fn", "Tensor", "no_such_dtype"):
        with pytest.raises(gd.GraphError, match=rf"layer 0 \(Linear\): bad settings .*{name}"):
            gd.Sequential.from_config([{"type": "Linear", "in_features": 2, "out_features": 1, "dtype": name}])
    model = gd.Sequential.from_config([{"type": "Linear", "in_features": 2, "out_features": 1, "dtype": "bfloat16"}])
    assert model.layers[0].weight.dtype == torch.bfloat16


def test_evaluate_checks_its_data_too():
    with pytest.raises(ValueError, match=r"Y has NaN or inf values, first at Y\[2, 0\]"):
        _model().evaluate(torch.rand(3, 2), torch.tensor([[0.0], [1.0], [float("nan")]]))


def test_params_that_are_not_finite_before_training():
    model = _model()
    model.layers[2].bias[0] = float("nan")
    X, Y = _data()
    with pytest.raises(ValueError, match="param 2.bias is NaN or inf before training; re-initialise the model"):
        model.fit(X, Y, verbose=False)


# -- training: divergence stops with the last finite params and the history --------------------


def _reference_divergence(X, Y, lr, momentum, epochs, batch_size, seed):
    """fit's loop, written out with a host sync per batch: where the loss first stops being
    finite, the params the model had then, and each completed epoch's mean loss."""
    model = _model()
    params = list(model.parameters().values())
    step = gd.compile(gd.grad(model.graph(gd.MSE()), list(model.parameters())))
    opt = gd.SGD(lr=lr, momentum=momentum)
    opt.reset(params)
    gen = torch.Generator().manual_seed(seed)
    sizes = [min(batch_size, len(X) - s) for s in range(0, len(X), batch_size)]
    weights = torch.tensor(sizes, dtype=X.dtype, device=X.device) / len(X)
    losses_per_epoch = []
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=gen).to(X.device)
        Xe, Ye = X.index_select(0, order), Y.index_select(0, order)
        losses = []
        for b, first in enumerate(range(0, len(X), batch_size)):
            out = step(x=Xe[first:first + batch_size], y=Ye[first:first + batch_size])
            if not torch.isfinite(out[0]):
                return epoch + 1, b + 1, {k: v.clone() for k, v in model.parameters().items()}, losses_per_epoch
            opt.update(params, list(out[1:]), lr, overwrite_grads=True)  # as fit updates, to the bit
            losses.append(out[0])
        losses_per_epoch.append(float(torch.stack(losses) @ weights))
    raise AssertionError("the reference run did not diverge")


@pytest.mark.parametrize("lr, momentum, batch_size", [(1.0, 0.9, 3), (5.0, 0.9, 3), (2.0, 0.0, 4)])
def test_divergence_names_epoch_and_batch_and_keeps_the_last_finite_params(lr, momentum, batch_size):
    X, Y = _data(scale=10.0)
    epoch, batch, params, losses = _reference_divergence(X, Y, lr, momentum, 30, batch_size, seed=0)
    model = _model()
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, optimizer=gd.SGD(lr=lr, momentum=momentum), epochs=30, batch_size=batch_size, seed=0,
                  verbose=False)
    e = err.value
    assert (e.epoch, e.batch) == (epoch, batch)
    names(str(e), rf"the loss became (inf|nan) in epoch {epoch}/30, batch {batch}/\d+ \(lr={lr:g}\)",
          "keeps its last finite params",
          f"history of the {epoch - 1} completed epoch" if epoch > 1 else "No epoch completed", r"\.history",
          "model.history", "hint: lower the learning rate")
    for name, value in model.parameters().items():
        assert torch.isfinite(value).all() and torch.equal(value, params[name]), name
    assert e.history is model.history and e.history["loss"] == losses
    assert len(e.history["lr"]) == epoch - 1 and "accuracy" not in e.history  # regression targets: no accuracy


def test_an_update_that_makes_params_infinite_is_undone():
    """The loss is finite (1e38) but its gradient times a huge lr overflows the weight."""
    model = gd.Sequential(gd.Linear(1, 1))
    model.layers[0].weight.fill_(1e19)
    model.layers[0].bias.zero_()
    X, Y = torch.ones(4, 1), torch.zeros(4, 1)
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, optimizer=gd.SGD(lr=1e20), epochs=1, batch_size=2, shuffle=False, verbose=False)
    names(str(err.value), r"the update of epoch 1/1, batch 1/2 \(lr=1e\+20\) made params NaN or inf",
          "the loss was 1e\\+38", "keeps its params from before that update",
          "No epoch completed; the empty history is on this error's .history and on model.history")
    assert torch.equal(model.layers[0].weight, torch.full((1, 1), 1e19))
    assert (err.value.epoch, err.value.batch) == (1, 1)


def test_an_epoch_whose_replay_stays_finite_is_rolled_back_whole(monkeypatch):
    """If the replay cannot find the batch (a non-deterministic kernel), the model goes back
    to the epoch's start, which was checked finite."""
    from graphdl import train
    model, (X, Y) = _model(), _data()
    real = train._largest
    calls, before = {"n": 0}, {}

    def flaky(tensors):  # calls: end of epoch 1 (= start of 2), end of epoch 2: say a param is not finite
        calls["n"] += 1
        if calls["n"] == 1:
            before.update({k: v.clone() for k, v in model.parameters().items()})
        return torch.tensor(float("inf")) if calls["n"] == 2 else real(tensors)

    monkeypatch.setattr(train, "_largest", flaky)
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, epochs=5, batch_size=4, seed=0, verbose=False)
    names(str(err.value), "diverged in epoch 2/5", "the batch is unknown", "params from the start of that epoch")
    assert err.value.batch is None and err.value.history.epochs == 1
    assert all(torch.equal(v, before[k]) for k, v in model.parameters().items())


# -- the README's "When things go wrong" shows real messages --------------------------------------------------------


def _doc_examples() -> list[tuple[str, str, str]]:
    """(file name, code, printed message) for each example: the code is the whole block as
    shown, its `# name.py` first line included, so the line numbers in a message are what
    a reader who copies the block into that file gets."""
    doc = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    found = re.findall(r"```python\n(# (\S+)\n.*?)```\n\n```text\n(.*?)\n```", doc, re.S)
    assert len(found) >= 3
    return [(name, code, printed) for code, name, printed in found]


@pytest.mark.parametrize("name, code, printed", _doc_examples(), ids=lambda v: v if v.endswith(".py") else "")
def test_docs_show_the_messages_exactly_as_printed(name, code, printed):
    with pytest.raises(Exception) as err:  # noqa: B017 - any exception: its printed form is what is compared
        exec(compile(code, name, "exec"), {"__name__": "__main__"})  # noqa: S102
    e = err.value
    assert f"{type(e).__module__}.{type(e).__qualname__}: {e}" == printed
