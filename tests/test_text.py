"""The text IR's `# scope` comments: every scope string and the gradient marker read back
exactly, ordinary scopes print as they always have."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphdl as gd
from graphdl.text import format_scope

# Graph.scope refuses line breaks; everything else is a scope someone could write.
SCOPES = st.text(st.characters(blacklist_characters="\n\r"), max_size=12) | st.sampled_from(
    ["grad", "grad ", "grad x", " grad", "gradient", "# grad", '"', '"q"', "a\\", "<b>", " a ", "\t", "\u2028",
     "x\x85y", "\ud800", "0:Linear", "a  # b", "é", '"grad"'])


def _scoped_graph(scopes: list[tuple[str, bool]]) -> gd.Graph:
    g = gd.Graph("g")
    h = g.input("x", (None, 2))
    for scope, backward in scopes:
        with g.scope(scope, backward=backward):
            h = gd.relu(h)
    g.output(h)
    return g


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(SCOPES, st.booleans()), min_size=1, max_size=4))
def test_any_scope_round_trips_exactly(scopes):
    g = _scoped_graph(scopes)
    text = str(g)
    parsed = gd.parse(text)
    assert [(n.scope, n.backward) for n in parsed.nodes] == scopes
    assert str(parsed) == text
    text.encode()  # writable as UTF-8 to a .txt file (a lone surrogate is escaped)


@pytest.mark.parametrize("scope, backward, comment", [
    ("0:Linear", False, "  # 0:Linear"),           # ordinary scopes print as before
    ("0:Linear", True, "  # grad 0:Linear"),
    ("", True, "  # grad"),
    ("", False, ""),
    ("gradient", False, "  # gradient"),
    ("grad", False, '  # "grad"'),                # read back as a forward node, not a gradient one
    ("grad 0:Linear", False, '  # "grad 0:Linear"'),
    (" 0:Linear ", False, '  # " 0:Linear "'),     # spaces at the ends are kept
    (" ", True, '  # grad " "'),
    ('"q"', False, '  # "\\"q\\""'),
    ("tab\there", False, '  # "tab\\there"'),
])
def test_scopes_that_would_read_back_differently_are_written_as_json_strings(scope, backward, comment):
    g = _scoped_graph([(scope, backward)])
    assert str(g).splitlines()[1] == "  %0: f32[N,2] = relu x" + comment
    assert (gd.parse(str(g)).nodes[0].scope, gd.parse(str(g)).nodes[0].backward) == (scope, backward)


def test_format_scope_leaves_plain_scopes_alone():
    assert [format_scope(s) for s in ("0:Linear", "loss", "a  # b", "é")] == ["0:Linear", "loss", "a  # b", "é"]


@pytest.mark.parametrize("comment, message", [
    ('"unclosed', 'the scope "unclosed is not one JSON string'),
    ('"a" "b"', 'the scope "a" "b" is not one JSON string'),
    ('"a\\nb"', "must be a one-line str"),
])
def test_a_bad_quoted_scope_names_its_line(comment, message):
    text = f"graph g(x: f32[N,2]) {{\n  %0: f32[N,2] = relu x  # {comment}\n  return %0\n}}"
    with pytest.raises(gd.GraphError, match="^IR text, line 2: .*" + message):
        gd.parse(text)


def test_hand_written_scopes_keep_their_inner_text():
    text = "graph g(x: f32[N,2]) {\n  %0: f32[N,2] = relu x  # grad  padded\n  return %0\n}"
    node = gd.parse(text).nodes[0]
    assert (node.scope, node.backward) == (" padded", True)


def test_scoped_gradient_graph_round_trips_through_a_text_file(tmp_path):
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    w = g.param("w", torch.ones(2, 1))
    with g.scope("grad"):  # a layer someone named "grad"
        h = gd.matmul(x, w)
    with g.scope(" loss "):
        g.output(gd.sum(h))
    gg = gd.grad(g, ["w"])
    gd.save_graph(gg, tmp_path / "gg.txt")
    back = gd.load_graph(tmp_path / "gg.txt")
    assert [(n.scope, n.backward) for n in back.nodes] == [(n.scope, n.backward) for n in gg.nodes]
    assert str(back) == str(gg)
