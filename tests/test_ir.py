"""graphdl.ir: declaring inputs, params, constants, names, scopes and outputs, and what
`verify()` catches."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from messages import message, names
from test_contract import tiny

import graphdl as gd

HERE = r"test_ir\.py:\d+"  # "created at" must point at the test's own line


def test_verify_catches_broken_use_lists():
    g = tiny()
    g.verify()
    g.nodes[1].inputs[0].users.clear()
    with pytest.raises(gd.GraphError, match="use-list"):
        g.verify()


def test_output_labels_are_checked_and_kept_in_step():
    g = tiny()
    with pytest.raises(gd.GraphError, match="must name one output"):
        g.output(g.outputs[0], g.outputs[0], label="loss")
    with pytest.raises(gd.GraphError, match="must name one output"):
        g.output(g.outputs[0], label="two words")
    g.output(g.outputs[0], label="loss")
    assert g.output_labels == ("", "loss") and str(g).splitlines()[-2] == "  return %3, %3 (loss)"
    g._labels.pop()  # what only a bug inside graphdl could do: the lists are not the user's to edit
    with pytest.raises(gd.GraphError, match="2 outputs but 1 output labels"):
        g.verify()


def test_outputs_are_read_only_and_only_the_editing_functions_change_them():
    g = tiny()
    loss = g.outputs[0]
    assert isinstance(g.outputs, tuple) and isinstance(g.output_labels, tuple)
    with pytest.raises(AttributeError):
        g.outputs = ()
    with pytest.raises(AttributeError):
        g.output_labels = ("x",)
    with pytest.raises(TypeError):
        g.outputs[0] = loss  # a tuple: the data-parallel code once wrote here behind the graph's back
    doubled = gd.mul(loss, 2.0)
    g.set_output(0, doubled, label="twice")
    g.verify()
    assert g.outputs == (doubled,) and g.output_labels == ("twice",) and g.is_output(doubled)
    assert not g.is_output(loss)
    for bad in (1, -2, True, "0", 10**5000):  # a 5,000-digit index is named without crashing repr
        with pytest.raises(gd.GraphError, match="no output"):
            g.set_output(bad, loss)
    with pytest.raises(gd.GraphError, match="output label"):
        g.set_output(0, loss, label="two words")


# -- declaring inputs, params, constants, names -----------------------------------------


@pytest.mark.parametrize("name", [3, None, "", "a b", "a..b", "ñ", "x-1"])
def test_graph_name_must_be_an_ascii_name(name):
    names(message(gd.Graph, name), "graph name", "must be a str of ASCII letters")


@pytest.mark.parametrize("name", [3, None, "", "a b", "x-1"])
def test_input_and_param_names(name):
    names(message(gd.Graph("g").input, name, (2,)), "is not valid")
    names(message(gd.Graph("g").param, name, torch.zeros(2)), "is not valid")


def test_the_names_a_bad_name_message_suggests_are_accepted():
    # The message once said "not starting with a digit-only part" while 0.weight (a
    # Sequential's own param name) was accepted: every example it gives must be valid.
    msg = message(gd.Graph("g").input, "a b", (2,))
    examples = re.findall(r"'([^']+)'", msg.split("e.g.")[1])
    assert "0.bias" in examples
    for name in examples:
        assert gd.Graph("g").param(name, torch.zeros(2)).name == name


def test_a_name_defined_twice():
    g = gd.Graph("g")
    g.input("x", (2,))
    names(message(g.param, "x", torch.zeros(2)), "'x' is already defined; pick another name")


@pytest.mark.parametrize("shape, expect", [
    ((None, 2.0), "dimension 1 .*got 2.0"), ((None, -2), "dimension 1 .*got -2"),
    ((True, 2), r"dimension 0 .*got True \(a bool\)"), (3, "shape must be a sequence"), ((np.int64(3),), "dimension 0"),
    ((None, "2"), r"dimension 1 .*got '2' \(a str\)"),
    ((None, 2**64), r"dimension 1 .* to 2\*\*63 - 1, got 18446744073709551616"),
])
def test_input_shape_dims(shape, expect):
    names(message(gd.Graph("g").input, "x", shape), "input x", expect, r"\(None, 2\)|non-negative int, None")


@pytest.mark.parametrize("dtype, expect", [
    (torch.int32, "torch.int32 is not supported"), ("f32", r"did you mean torch.float32\?"),
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
    g = gd.Graph("g")
    # The lambda makes this line the caller, so "created at" can name it (message() is in messages.py).
    names(message(lambda: g.const(value)), "const: value", expect, HERE)


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
    names(message(g.verify), r"node %1 \(add, created at .*test_contract\.py:\d+\)", r"output is f32\[5\]")


def test_using_a_removed_nodes_value_is_reported_not_a_recursion_error():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    h = gd.relu(x)
    g.remove_node(h.node)
    g.output(gd.tanh(h))
    assert h.label == "%?"
    names(message(g.verify), r"node %0 \(tanh", "uses the value of a removed node \\(relu\\)")
    names(message(gd.compile, g), "removed node")


def test_reorder_takes_every_node_once_and_keeps_reads_after_writes():
    g = tiny()  # matmul, add, tanh, mse: a chain
    nodes = list(g.nodes)
    with pytest.raises(gd.GraphError, match="every node of the graph exactly once"):
        g.reorder(nodes[:-1])
    with pytest.raises(gd.GraphError, match="every node of the graph exactly once"):
        g.reorder([nodes[0], *nodes[:-1]])
    with pytest.raises(gd.GraphError, match="before .* whose value it reads"):
        g.reorder([nodes[1], nodes[0], *nodes[2:]])
    assert g.nodes == nodes  # a refused order changes nothing
    c = g.const(3.0)  # reads nothing: it may go first
    g.reorder([c.node, *nodes])
    assert g.nodes == [c.node, *nodes] and str(g).splitlines()[1].endswith("const[value=3.0]")
    g.verify()


def test_set_output_keeps_the_record_of_outputs_in_step():
    g = tiny()
    loss = g.outputs[0]
    doubled = gd.mul(loss, 2.0)
    g.set_output(0, doubled)
    assert g.outputs == (doubled,) and g.is_output(doubled) and not g.is_output(loss)
    g.verify()
    with pytest.raises(gd.GraphError, match="not a value of this graph"):
        g.set_output(0, tiny().outputs[0])


def test_an_i64_input_holds_indices_and_prints_and_parses_as_i64():
    g = gd.Graph("g")
    i = g.input("i", (None, 4), torch.int64)
    assert i.dtype == torch.int64 and repr(i) == "i: i64[N,4]"
    g.output(gd.reshape(i, (None, 2, 2)))
    assert str(g).startswith("graph g(i: i64[N,4]) {")
    assert str(gd.parse(str(g))) == str(g)
    names(message(gd.Graph("g").param, "w", torch.zeros(2, dtype=torch.int64)), "floating dtype")
    names(message(gd.Graph("g").const, 1.0, torch.int64), "const: dtype torch.int64 is not supported")


def test_float_ops_refuse_integer_values_and_say_what_integers_are_for():
    g = gd.Graph("g")
    i = g.input("i", (None,), torch.int64)
    names(message(gd.tanh, i), r"^tanh %0\(i: i64\[N\]\): i is i64, integer indices, but tanh computes on "
          "floating-point values", r"hint: integers are only read as indices \(index_select, gd.Embedding\)")
    names(message(lambda: i + 1.0), r"i is i64, integer indices; a Python number only combines with floating values")
    names(message(gd.index_select, g.param("w", torch.zeros(3, 2)), g.input("f", (None,))),
          r"input 1, f, holds indices, so it must be i64, not f32", r"hint: declare it with dtype=torch.int64")
