"""graphdl.autodiff.grad on hand-built graphs, and the messages for its arguments. (Every
op's VJP is checked by test_ops' registry; random graphs by test_fuzz.)"""

from __future__ import annotations

import re

import pytest
import torch
from messages import message, names
from test_contract import tiny

import graphdl as gd


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
    assert gg.output_labels == ("", "d/dw", "d/db", "d/dx")
    text = str(gg)
    assert text.splitlines()[-2] == "  return %3, %18 (d/dw), %14 (d/db), %16 (d/dx)"
    again = gd.parse(text)
    assert again.output_labels == gg.output_labels and str(again) == text
    assert gd.grad(gg, ["w"]).output_labels == ("", "d/dw", "d/db", "d/dx", "d/dw")  # a second order keeps them
    compiled = gd.compile(gg)
    assert compiled.graph.output_labels == gg.output_labels  # passes keep them


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



@pytest.mark.parametrize("of", [1, -2, True, "0", 0.0, 10**5000], ids=["1", "-2", "True", "str", "float", "huge"])
def test_grad_of_an_index_that_is_no_outputs_names_it(of):
    """`of` is read by checks.read_int: a bool or a float is no index, and a 5,000-digit
    int is named without crashing repr."""
    g = tiny()
    shown = "2\\*\\*16609 or more" if of == 10**5000 else re.escape(repr(of))
    names(message(gd.grad, g, ["w"], of=of), f"grad: of={shown} is not an output index of graph tiny",
          r"\(it has 1 outputs\)")

def test_no_non_float_value_can_exist_to_differentiate():
    """grad wrt a non-float value cannot be asked for: graphdl values are floating by construction."""
    names(message(gd.Graph("g").input, "i", (2,), torch.int32), "not supported")
    names(message(gd.Graph("g").param, "i", torch.zeros(2, dtype=torch.bool)), "floating dtype")


def test_integer_indices_take_no_gradient():
    """i64 inputs are indices: grad refuses to differentiate with respect to one, naming it."""
    g = gd.Graph("g")
    i = g.input("i", (None,), torch.int64)
    w = g.param("w", torch.rand(5, 3))
    g.output(gd.sum(gd.index_select(w, i, axis=0)))
    names(message(gd.grad, g, ["w", "i"]), r"grad: wrt 'i' is i: i64\[N\], integer indices, which take no gradient",
          "hint: differentiate with respect to floating inputs and params only")
    (_, dw) = gd.compile(gd.grad(g, ["w"]))(i=torch.tensor([0, 0, 4]))
    assert torch.equal(dw, torch.tensor([[2.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3]))
