"""Graphviz export: a graph drawn one box per IR node, grouped by layer.

Boxes read like the text IR (`%3 matmul`, `f32[N,25]`), edges carry the type of the
value they carry, and inputs, params, constants, outputs and the forward and backward
passes each have their own look, so a picture and a printout of the same graph can be
read side by side.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import graphviz

from .checks import GraphError, format_shape, format_type
from .ir import Graph, Node, Value
from .ops.registry import const
from .text import format_attrs, format_node

FORMATS = ("svg", "png", "pdf", "dot")

STYLES: dict[str, dict[str, str]] = {
    "input": {"shape": "invhouse", "style": "filled", "fillcolor": "#c7e9c0"},
    "param": {"shape": "cylinder", "style": "filled", "fillcolor": "#fff2b3"},
    "const": {"shape": "ellipse", "style": "filled", "fillcolor": "#eeeeee", "fontsize": "9"},
    "forward": {"shape": "box", "style": "rounded,filled", "fillcolor": "#cfe2f3"},
    "backward": {"shape": "box", "style": "rounded,filled", "fillcolor": "#f8cbad"},
    "collective": {"shape": "hexagon", "style": "filled", "fillcolor": "#b4d7a8"},  # talks to the other ranks
    "output": {"shape": "house", "style": "filled", "fillcolor": "#e4c1f9"},
}
_FONT = {"fontname": "Helvetica"}


class DotNotFoundError(GraphError):
    """The Graphviz `dot` program, needed for svg/png/pdf, is not installed."""


def to_dot(graph: Graph, hide_params: bool = False, collapse_layers: bool = False,
           rankdir: str = "TB", profile: Any = None) -> graphviz.Digraph:
    """Draw a graph with Graphviz.

    Args:
        graph: the graph to draw (forward or gradient).
        hide_params: leave out param boxes; each node that uses a param names it on its
            own label instead.
        collapse_layers: draw each layer (nodes sharing a scope such as "0:Linear") as a
            single box labelled with the types flowing in and out; on a gradient graph a
            layer's forward and backward nodes become two boxes.
        rankdir: Graphviz layout direction, "TB" (top to bottom) or "LR".
        profile: a `gd.profile` report of this graph (`report.graph`): each node (or
            collapsed layer) is coloured by its time, pale yellow to red for the
            slowest, and labelled with its time and share of the step.

    Returns:
        A `graphviz.Digraph`: `.source` is the DOT text, `.pipe(format="svg")` draws it.
        Node ids are `in{i}`, `p{i}`, `n{k}` (the IR node %k), `layer{j}` and `out{i}`.
    """
    _check_to_dot_args(graph, rankdir, profile)
    drawing = _Drawing.start(graph, rankdir, profile)
    drawing.draw_inputs()
    drawing.draw_params(hide_params, collapse_layers)
    layers = drawing.draw_nodes(collapse_layers)
    drawing.draw_layers(layers)
    drawing.close_clusters()
    drawing.draw_edges()
    drawing.draw_outputs()
    return drawing.dot


def _check_to_dot_args(graph: object, rankdir: object, profile: Any) -> None:
    if not isinstance(graph, Graph):
        raise GraphError(f"to_dot takes a gd.Graph, got {type(graph).__name__}; for a model use model.graph()")
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise GraphError(f"to_dot: rankdir={rankdir!r} must be one of TB, LR, BT, RL")
    if profile is not None and getattr(profile, "graph", None) is not graph:
        raise GraphError(f"to_dot: the profile is not of graph {graph.name} as given: it timed the compiled, "
                         "optimised copy it holds; draw that one, gd.to_dot(report.graph, profile=report)")


@dataclass
class _Drawing:
    """A drawing under way: the DOT graph, one dashed cluster per layer, and which DOT
    node draws each value's producer."""

    graph: Graph
    dot: graphviz.Digraph
    clusters: dict[str, graphviz.Digraph]  # scope -> its cluster
    names: dict[int, str]  # id(value) -> its name in the text IR (x, fc0.weight, %3)
    box: dict[int, str | None] = field(default_factory=dict)  # id(value) -> the DOT node of its producer, or None
    profile: Any = None  # a gd.profile report of the graph, which colours the nodes by time

    @classmethod
    def start(cls, graph: Graph, rankdir: str, profile: Any = None) -> _Drawing:
        names = {id(v): v.name for v in (*graph.inputs.values(), *graph.params.values())}
        names.update({id(n.out): f"%{k}" for k, n in enumerate(graph.nodes)})
        title = f"graph {graph.name}" + (f": {_time(profile.seconds)} a step, coloured by time" if profile else "")
        dot = graphviz.Digraph(graph.name, graph_attr={"rankdir": rankdir, "label": _text(title),
                                                       "labelloc": "t", **_FONT},
                               node_attr={"fontsize": "11", **_FONT}, edge_attr={"fontsize": "9", **_FONT})
        scopes = list(dict.fromkeys(n.scope for n in graph.nodes if n.scope))
        clusters = {s: graphviz.Digraph(f"cluster_{i}", graph_attr={"label": _text(s), "style": "rounded,dashed"})
                    for i, s in enumerate(scopes)}
        return cls(graph, dot, clusters, names, profile=profile)

    def draw_inputs(self) -> None:
        for i, v in enumerate(self.graph.inputs.values()):
            self.box[id(v)] = f"in{i}"
            self.dot.node(f"in{i}", _label(v.name, format_type(v.dtype, v.shape)), tooltip=_text(f"input {v!r}"),
                          **STYLES["input"])

    def draw_params(self, hide_params: bool, collapse_layers: bool) -> None:
        """A param used by one layer only is drawn inside it (or, collapsed, absorbed into it)."""
        for i, v in enumerate(self.graph.params.values()):
            used_in = {u.scope for u in v.users}
            scope = used_in.pop() if len(used_in) == 1 else ""
            self.box[id(v)] = None if hide_params or (collapse_layers and scope) else f"p{i}"
            if self.box[id(v)]:
                self.clusters.get(scope, self.dot).node(f"p{i}", _label(v.name, format_type(v.dtype, v.shape)),
                                                        tooltip=_text(f"param {v!r}"), **STYLES["param"])

    def draw_nodes(self, collapse_layers: bool) -> dict[tuple[str, bool], list[Node]]:
        """A box per node, in its layer's cluster; with `collapse_layers`, the nodes of each
        (layer, backward) instead, to be drawn as one box each by draw_layers."""
        layers: dict[tuple[str, bool], list[Node]] = {}
        layer_box: dict[tuple[str, bool], str] = {}  # in the order of `layers`: layer{j} is its j-th
        for k, node in enumerate(self.graph.nodes):
            if collapse_layers and node.scope:
                layers.setdefault((node.scope, node.backward), []).append(node)
                self.box[id(node.out)] = layer_box.setdefault((node.scope, node.backward), f"layer{len(layer_box)}")
                continue
            self.draw_node(k, node)
        return layers

    def draw_node(self, k: int, node: Node) -> None:
        """Node k's box, listing the params drawn nowhere else, in its layer's cluster."""
        self.box[id(node.out)] = f"n{k}"
        hidden = [v for v in node.inputs if v.kind == "param" and self.box[id(v)] is None]
        attrs = _node_style(node)
        timed = self._heat([node], attrs)  # with a profile: coloured by its time, which its label says
        self.clusters.get(node.scope, self.dot).node(
            f"n{k}",
            _label(f"%{k} {node.op.name}{format_attrs(node)}", format_type(node.out.dtype, node.out.shape),
                   *(f"{v.name}: {format_type(v.dtype, v.shape)}" for v in hidden), *timed),
            tooltip=_text(f"{format_node(node, self.names)}\ncreated at {node.where}"),
            **attrs,
        )

    def draw_layers(self, layers: dict[tuple[str, bool], list[Node]]) -> None:
        returned = {id(v) for v in self.graph.outputs}
        for j, ((scope, backward), members) in enumerate(layers.items()):
            attrs = dict(STYLES["backward" if backward else "forward"])
            timed = self._heat(members, attrs)
            label = _layer_label(returned, scope, backward, members, self.box)
            self.dot.node(f"layer{j}", r"\n".join([label, *map(_text, timed)]),
                          tooltip=_text("\n".join(format_node(n, self.names) for n in members)),
                          **attrs, penwidth="2")

    def _heat(self, nodes: list[Node], attrs: dict[str, str]) -> list[str]:
        """With a profile: colour `attrs` by the nodes' time against the slowest node's, and
        return the label line saying it ([] without a profile or for untimed nodes)."""
        if self.profile is None:
            return []
        rows = [r for r in map(self.profile.row, nodes) if r is not None]
        if not rows:
            return []
        seconds = sum(r.seconds for r in rows)
        hottest = max((r.seconds for r in self.profile.rows if r.node is not None), default=0.0)
        fraction = min(seconds / hottest, 1.0) if hottest > 0 else 0.0
        attrs["fillcolor"] = heat(fraction)
        if fraction > 0.7:  # black text is hard to read on the dark reds
            attrs["fontcolor"] = "white"
        attrs["style"] = "rounded,filled" if "rounded" in attrs.get("style", "") else "filled"
        return [f"{_time(seconds)} ({seconds / (self.profile.seconds or 1.0):.0%})"]

    def close_clusters(self) -> None:
        for c in self.clusters.values():
            if c.body:
                self.dot.subgraph(c)

    def draw_edges(self) -> None:
        """One edge per value and user box, labelled with the value's type."""
        drawn: set[tuple[str, str, int]] = set()
        for node in self.graph.nodes:
            for v in node.inputs:
                edge = (self.box[id(v)], self.box[id(node.out)], id(v))
                if edge[0] is not None and edge[0] != edge[1] and edge not in drawn:
                    drawn.add(edge)
                    self.dot.edge(edge[0], edge[1], label=_text(format_type(v.dtype, v.shape)))

    def draw_outputs(self) -> None:
        for i, (v, label) in enumerate(zip(self.graph.outputs, self.graph.output_labels)):
            self.dot.node(f"out{i}", _label(f"output {i}" + (f": {label}" if label else ""),
                                            format_type(v.dtype, v.shape)), **STYLES["output"])
            if self.box[id(v)] is not None:
                self.dot.edge(self.box[id(v)], f"out{i}", label=_text(self.names[id(v)]))


# ColorBrewer's YlOrRd: pale yellow for the fastest nodes, dark red for the slowest.
HEAT = ("#ffffb2", "#fed976", "#feb24c", "#fd8d3c", "#f03b20", "#bd0026")


def heat(fraction: float) -> str:
    """The colour of a node whose time is `fraction` (0 to 1) of the slowest node's."""
    at = max(0.0, min(1.0, fraction)) * (len(HEAT) - 1)
    i = min(int(at), len(HEAT) - 2)
    low, high = (tuple(int(c[j:j + 2], 16) for j in (1, 3, 5)) for c in HEAT[i:i + 2])
    return "#" + "".join(f"{round(a + (b - a) * (at - i)):02x}" for a, b in zip(low, high))


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def _text(text: str) -> str:
    """User text (a scope, an attr, a file path) as Graphviz should show it: literally.
    Unescaped, `a\\` would end the quoted DOT string early, `\\l` would be a line break
    and `<b>` HTML markup; escape() doubles backslashes and marks the text as not HTML."""
    return graphviz.escape(text)


def _label(*lines: str) -> str:
    # `\n` is Graphviz's centred line break, joining lines that are each shown literally.
    return r"\n".join(_text(line) for line in lines)


def _node_style(node: Node) -> dict[str, str]:
    """A node box's Graphviz attributes: a constant, a collective, backward or forward (a
    constant of the backward pass in the backward pass's colour)."""
    style = "const" if node.op is const else "collective" if node.op.collective else \
        "backward" if node.backward else "forward"
    attrs = dict(STYLES[style])
    if node.op is const and node.backward:
        attrs["fillcolor"] = STYLES["backward"]["fillcolor"]
    return attrs


def _layer_label(returned: set[int], scope: str, backward: bool, members: list[Node],
                 box: dict[int, str | None]) -> str:
    """`0:Linear [N,2]→[N,25]`: the shapes of the values entering and leaving the layer
    (`returned`: the ids of the graph's outputs)."""
    inside = {id(n.out) for n in members}
    entering = [v for n in members for v in n.inputs if id(v) not in inside and box.get(id(v)) is not None]
    leaving = [n.out for n in members if id(n.out) in returned or _read_outside(n, inside)]
    name = f"{scope} (grad)" if backward else scope
    return _label(f"{name} {_shapes(entering)}→{_shapes(leaving)}")


def _read_outside(node: Node, inside: set[int]) -> bool:
    """Whether a node outside the layer (whose values' ids are `inside`) reads this node's value."""
    return any(id(u.out) not in inside for u in node.out.users)


def _shapes(values: list[Value]) -> str:
    return ", ".join(dict.fromkeys(format_shape(v.shape) for v in values)) or "·"


def render(graph: Graph, path: str | os.PathLike[str], hide_params: bool = False, collapse_layers: bool = False,
           rankdir: str = "TB", profile: Any = None) -> Path:
    """Draw a graph to a file whose extension picks the format: .svg, .png, .pdf or .dot.

    Args:
        graph: the graph to draw.
        path: where to write; `.dot` writes the DOT text and needs no Graphviz install,
            the other formats run the Graphviz `dot` program.
        hide_params, collapse_layers, rankdir, profile: as for `to_dot`.

    Returns:
        The path written.

    Raises:
        DotNotFoundError: (a GraphError) for svg/png/pdf when `dot` is not installed.
        GraphError: for an unknown extension or a file that cannot be written.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise GraphError(f"cannot tell the image format of {str(path)!r}: end the name in "
                         f"{', '.join('.' + f for f in FORMATS)}")
    dot = to_dot(graph, hide_params=hide_params, collapse_layers=collapse_layers, rankdir=rankdir, profile=profile)
    if fmt == "dot":
        data = dot.source.encode()
    else:
        data = _run_dot(dot, fmt)
    try:
        path.write_bytes(data)
    except OSError as e:
        raise GraphError(f"cannot write {str(path)!r}: {e.strerror}; check that the folder exists and is "
                         "writable") from None
    return path


# Past this many nodes a notebook gets each layer as one box, and past MAX_INLINE none
# (dot takes seconds on thousands of nodes; the text IR is still shown).
COLLAPSE_INLINE, MAX_INLINE = 300, 3000


def mimebundle(graph: Graph, text: str) -> dict[str, str]:
    """What Jupyter shows for a graph or model: the drawing as SVG when Graphviz's `dot`
    is installed and the graph is not huge, and always `text` (the text IR or repr)."""
    bundle = {"text/plain": text}
    if len(graph.nodes) <= MAX_INLINE:
        collapse = len(graph.nodes) > COLLAPSE_INLINE
        try:
            dot = to_dot(graph, hide_params=collapse, collapse_layers=collapse)
            bundle["image/svg+xml"] = _run_dot(dot, "svg").decode()
        except GraphError:  # no `dot`, or it failed: the text alone
            pass
    return bundle


def _run_dot(dot: graphviz.Digraph, fmt: str) -> bytes:
    missing = DotNotFoundError(
        f"drawing .{fmt} files needs the Graphviz 'dot' program, which is not on PATH; install Graphviz "
        "(apt-get install graphviz, brew install graphviz or conda install graphviz) or write a .dot file"
    )
    if shutil.which("dot") is None:
        raise missing
    try:
        return dot.pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound:
        raise missing from None
    except graphviz.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise GraphError(f"Graphviz 'dot' failed to draw .{fmt}: {detail[0] if detail else e}") from None
