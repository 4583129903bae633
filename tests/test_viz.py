"""Graphviz export: one box per IR node, layer clusters, forward/backward colours, files."""

from __future__ import annotations

import re

import pytest
import torch

import graphdl as gd
from graphdl.viz import STYLES

# A DOT statement `id [k=v ...]`; values may be quoted and hold brackets or newlines.
_STATEMENT = re.compile(r'^\t*(\w+) \[((?:[^\]"]|"(?:[^"\\]|\\.)*")*)\]', re.M)
_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s\]]+)')
_EDGE = re.compile(r'^\t*(\w+) -> (\w+) \[label="([^"]*)"\]', re.M)
_CLUSTER = re.compile(r'subgraph (cluster_\d+) \{\n\t\tgraph \[label="([^"]*)"[^\n]*\n(.*?)\n\t\}', re.S)


def boxes(source: str) -> dict[str, dict[str, str]]:
    """Every node statement of DOT source: id -> its attributes (quotes removed)."""
    found = {}
    for node_id, attrs in _STATEMENT.findall(source):
        if node_id not in ("graph", "node", "edge"):
            found[node_id] = {k: v[1:-1] if v.startswith('"') else v for k, v in _ATTR.findall(attrs)}
    return found


def mlp() -> gd.Graph:
    """x -> Linear(2,3) -> ReLU -> Linear(3,1) -> Sigmoid -> MSE, scoped as Sequential does."""
    g = gd.Graph("mlp")
    h = g.input("x", (None, 2))
    y = g.input("y", (None, 1))
    torch.manual_seed(0)
    for k, (i, o, act) in enumerate([(2, 3, gd.relu), (3, 1, gd.sigmoid)]):
        w = g.param(f"{2 * k}.weight", torch.randn(i, o))
        b = g.param(f"{2 * k}.bias", torch.zeros(o))
        with g.scope(f"{2 * k}:Linear"):
            h = gd.add(gd.matmul(h, w), b)
        with g.scope(f"{2 * k + 1}:{'ReLU' if act is gd.relu else 'Sigmoid'}"):
            h = act(h)
    g.output(gd.mse(h, y))
    return g


def ids(found: dict, prefix: str) -> list[str]:
    return [i for i in found if re.fullmatch(prefix + r"\d+", i)]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "gradient"])
def test_every_ir_node_input_param_and_output_has_one_box(backward):
    g = mlp()
    if backward:
        g = gd.grad(g, list(g.params))
    found = boxes(gd.to_dot(g).source)
    assert len(ids(found, "n")) == len(g.nodes)
    assert len(ids(found, "in")) == len(g.inputs) == 2
    assert len(ids(found, "p")) == len(g.params) == 4
    assert len(ids(found, "out")) == len(g.outputs)
    for k, node in enumerate(g.nodes):
        label = found[f"n{k}"]["label"]
        assert label.startswith(f"%{k} {node.op.name}")
        assert label.endswith(gd.checks.format_type(node.out.dtype, node.out.shape))
    assert found["p0"]["label"] == r"0.weight\nf32[2,3]"


def test_a_cnns_training_step_draws_every_node_with_its_attrs():
    """The conv layers' ops, the dropout mask and the buffers' next values draw as any node:
    one box each, labelled as the text IR writes them."""
    model = gd.Sequential(gd.Reshape((1, 6, 6)), gd.Conv2d(1, 2, 3, padding=1), gd.BatchNorm2d(2), gd.ReLU(),
                          gd.MaxPool2d(2), gd.Dropout(0.5, seed=3), gd.Flatten(), gd.Linear(18, 2))
    g = gd.grad(model.graph(gd.CrossEntropy(), training=True), list(model.parameters()))
    found = boxes(gd.to_dot(g).source)
    assert len(ids(found, "n")) == len(g.nodes) and len(ids(found, "out")) == len(g.outputs)
    labels = [found[f"n{k}"]["label"] for k in range(len(g.nodes))]
    for expected in ("conv2d[padding=1]", "max_pool2d[kernel_size=2]", "dropout_mask[seed=3]", "batch_norm",
                     "conv_backward_weight[padding=1]", "max_pool2d_backward[kernel_size=2]"):
        assert any(expected in label for label in labels), expected


def test_inputs_params_constants_outputs_and_passes_look_different():
    g = gd.grad(mlp(), ["0.weight"])
    found = boxes(gd.to_dot(g).source)
    assert found["in0"]["shape"] == STYLES["input"]["shape"]
    assert found["p0"]["shape"] == STYLES["param"]["shape"]
    assert found["out0"]["shape"] == STYLES["output"]["shape"]
    assert len({STYLES[k]["shape"] for k in ("input", "param", "const", "output", "forward")}) == 5
    for k, node in enumerate(g.nodes):
        box = found[f"n{k}"]
        if node.op.name == "const":
            assert box["shape"] == STYLES["const"]["shape"]
        else:
            assert box["shape"] == STYLES["forward"]["shape"]
        colour = STYLES["backward" if node.backward else "forward" if node.op.name != "const" else "const"]
        assert box["fillcolor"] == colour["fillcolor"], f"%{k} {node.op.name}"
    assert any(n.backward for n in g.nodes) and any(not n.backward for n in g.nodes)
    assert STYLES["forward"]["fillcolor"] != STYLES["backward"]["fillcolor"]


def test_each_layer_is_a_cluster_holding_its_forward_and_backward_nodes():
    g = gd.grad(mlp(), ["0.weight", "0.bias", "2.weight", "2.bias"])
    source = gd.to_dot(g).source
    clusters = {label: set(boxes(body)) for _, label, body in _CLUSTER.findall(source)}
    assert list(clusters) == ["0:Linear", "1:ReLU", "2:Linear", "3:Sigmoid"]
    for k, node in enumerate(g.nodes):
        holders = [label for label, members in clusters.items() if f"n{k}" in members]
        assert holders == ([node.scope] if node.scope else []), f"%{k} {node.op.name} {node.scope!r}"
    assert {"p0", "p1"} <= clusters["0:Linear"]  # a layer's own params sit inside it
    backward_linear = [k for k, n in enumerate(g.nodes) if n.scope == "0:Linear" and n.backward]
    assert backward_linear and all(f"n{k}" in clusters["0:Linear"] for k in backward_linear)


def test_edges_carry_the_type_of_their_value():
    g = mlp()
    edges = _EDGE.findall(gd.to_dot(g).source)
    assert ("in0", "n0", "f32[N,2]") in edges
    assert ("p0", "n0", "f32[2,3]") in edges
    assert ("n0", "n1", "f32[N,3]") in edges
    assert ("n6", "out0", "%6") in edges
    node_inputs = sum(len(n.inputs) for n in g.nodes)
    assert len(edges) == node_inputs + len(g.outputs)


def test_hide_params_drops_param_boxes_but_names_them_on_their_users():
    g = mlp()
    found = boxes(gd.to_dot(g, hide_params=True).source)
    assert ids(found, "p") == []
    assert len(ids(found, "n")) == len(g.nodes)
    assert found["n0"]["label"] == r"%0 matmul\nf32[N,3]\n0.weight: f32[2,3]"
    assert all(not e[0].startswith("p") for e in _EDGE.findall(gd.to_dot(g, hide_params=True).source))


def test_collapse_layers_draws_one_box_per_layer():
    g = mlp()
    found = boxes(gd.to_dot(g, collapse_layers=True).source)
    layers = [found[i]["label"] for i in ids(found, "layer")]
    assert layers == ["0:Linear [N,2]→[N,3]", "1:ReLU [N,3]→[N,3]", "2:Linear [N,3]→[N,1]",
                      "3:Sigmoid [N,1]→[N,1]"]
    assert ids(found, "n") == ["n6"]  # the unscoped loss node stays a node
    assert ids(found, "p") == []  # each param belongs to one layer, so it is folded in

    gg = gd.grad(g, list(g.params))
    found = boxes(gd.to_dot(gg, collapse_layers=True).source)
    labels = [found[i]["label"] for i in ids(found, "layer")]
    assert "0:Linear (grad) [N,3], [N,2]→[3], [2,3]" in labels
    assert len(labels) == 8
    for i in ids(found, "layer"):
        style = "backward" if "(grad)" in found[i]["label"] else "forward"
        assert found[i]["fillcolor"] == STYLES[style]["fillcolor"]


def test_labels_show_attrs_as_the_text_ir_does():
    g = gd.Graph("attrs")
    x = g.input("x", (None, 3))
    g.output(gd.sum(gd.mean(x, axis=1, keepdims=True)))
    found = boxes(gd.to_dot(g).source)
    assert found["n0"]["label"] == r"%0 mean[axis=(1,), keepdims=True]\nf32[N,1]"
    assert "mean[axis=(1,), keepdims=True] x" in str(g)


def test_bad_arguments_raise_graph_errors():
    with pytest.raises(gd.GraphError, match="to_dot takes a gd.Graph"):
        gd.to_dot("graph")
    with pytest.raises(gd.GraphError, match="rankdir"):
        gd.to_dot(mlp(), rankdir="sideways")
    with pytest.raises(gd.GraphError, match=r"end the name in \.svg, \.png, \.pdf, \.dot"):
        gd.render(mlp(), "picture.jpeg")


def test_dot_files_need_no_graphviz_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` anywhere on it
    out = gd.render(mlp(), tmp_path / "g.dot")
    assert out.read_text() == gd.to_dot(mlp()).source
    with pytest.raises(gd.DotNotFoundError, match=r"needs the Graphviz 'dot' program.*apt-get install graphviz"):
        gd.render(mlp(), tmp_path / "g.svg")
    assert not (tmp_path / "g.svg").exists()


def test_unwritable_path_raises_graph_error(tmp_path):
    with pytest.raises(gd.GraphError, match="cannot write"):
        gd.render(mlp(), tmp_path / "missing" / "g.dot")


@pytest.mark.usefixtures("dot_program")
def test_svg_drawn_by_dot_shows_every_op(tmp_path):
    g = gd.grad(mlp(), ["0.weight"])
    svg = gd.render(g, tmp_path / "g.svg", collapse_layers=False).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for k, node in enumerate(g.nodes):
        assert f"%{k} {node.op.name}" in svg
    assert "0:Linear" in svg and "f32[N,2]" in svg


@pytest.mark.usefixtures("dot_program")
@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF")])
def test_binary_formats(tmp_path, fmt, magic):
    out = gd.render(mlp(), tmp_path / f"g.{fmt}", hide_params=True, collapse_layers=True)
    assert out.read_bytes().startswith(magic)


def test_gradient_outputs_are_labelled_with_their_param():
    found = boxes(gd.to_dot(gd.grad(mlp(), ["0.weight", "2.bias"])).source)
    assert found["out0"]["label"] == "output 0\\nf32[]"
    assert found["out1"]["label"] == "output 1: d/d0.weight\\nf32[2,3]"
    assert found["out2"]["label"] == "output 2: d/d2.bias\\nf32[1]"


def test_graphs_and_models_display_in_jupyter(dot_program):
    model = gd.Sequential(gd.Standardize(2), gd.Linear(2, 3), gd.Softmax())
    for obj, text in ((mlp(), str(mlp())), (model, repr(model))):
        bundle = obj._repr_mimebundle_()
        assert bundle["text/plain"] == text
        assert bundle["image/svg+xml"].lstrip().startswith("<?xml") and "</svg>" in bundle["image/svg+xml"]
    assert "0:Standardize" in model._repr_mimebundle_()["image/svg+xml"]


def test_jupyter_display_degrades_to_text(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no Graphviz `dot` on this machine
    assert mlp()._repr_mimebundle_() == {"text/plain": str(mlp())}
    model = gd.Sequential(gd.Linear(2, 1))
    assert model._repr_mimebundle_() == {"text/plain": repr(model)}
    unbuilt = gd.Sequential(gd.Standardize(), gd.ReLU())  # cannot build a graph yet: its repr alone
    assert unbuilt._repr_mimebundle_() == {"text/plain": repr(unbuilt)}


ODD_SCOPES = ["a\\", "<b>", '"q"', "{x|y}", 'a\\"', "\\l", "x\\ny", "<<b>x</b>>", "a&b", "C:\\dir\\", "grad"]


@pytest.mark.usefixtures("dot_program")
@pytest.mark.parametrize("scope", ODD_SCOPES)
def test_dot_draws_any_scope_literally(tmp_path, scope):
    """Scopes are user text: `a\\` must not end DOT's quoted string, `<b>` must not be HTML,
    `\\l` must not be a line break; the picture shows each exactly as the IR holds it."""
    import warnings
    import xml.etree.ElementTree as ET

    from graphdl.text import format_scope

    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    w = g.param("w", torch.zeros(2, 2))
    with g.scope(scope):
        h = gd.mul(gd.matmul(x, w), 2.0)
    g.output(gd.relu(h))
    svg_ns, xlink = "{http://www.w3.org/2000/svg}", "{http://www.w3.org/1999/xlink}"
    for collapse, shown in ((False, scope), (True, f"{scope} [N,2]→[N,2]")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # graphviz warns when it expects dot to fail
            svg = gd.render(g, tmp_path / "g.svg", collapse_layers=collapse).read_text()
        root = ET.fromstring(svg)
        assert shown in [t.text for t in root.iter(f"{svg_ns}text")]
        # dot writes "  " as " \xa0"
        tooltips = [a.get(f"{xlink}title", "").replace("\xa0", " ") for a in root.iter(f"{svg_ns}a")]
        assert any(t.startswith(f"%0: f32[N,2] = matmul x, w  # {format_scope(scope)}") for t in tooltips)
