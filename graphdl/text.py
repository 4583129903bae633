"""The textual IR: a printer and a parser that round-trip exactly.

    graph tiny(x: f32[N,2], y: f32[N,1]; w: f32[2,1], b: f32[1]) {
      %0: f32[N,1] = matmul x, w
      %1: f32[N,1] = add %0, b
      %2: f32[] = sum[axis=(0,), keepdims=True] %1  # 0:Linear
      return %2
    }

Inputs come before the `;`, params after. Attributes that differ from the op's
defaults print in brackets as Python literals. A trailing `# scope` records the layer
a node belongs to, and `# grad scope` marks a node that `grad` emitted.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

import torch

from .ir import DTYPES, Graph, GraphError, Node, Shape, Value, format_type
from .ops import OPS


def format_graph(graph: Graph) -> str:
    names: dict[int, str] = {}
    for v in (*graph.inputs.values(), *graph.params.values()):
        names[id(v)] = v.name
    for k, node in enumerate(graph.nodes):
        names[id(node.out)] = f"%{k}"
    inputs = ", ".join(f"{v.name}: {format_type(v.dtype, v.shape)}" for v in graph.inputs.values())
    params = ", ".join(f"{v.name}: {format_type(v.dtype, v.shape)}" for v in graph.params.values())
    header = f"graph {graph.name}({inputs}; {params})" if params else f"graph {graph.name}({inputs})"
    lines = [header + " {"]
    lines += ["  " + format_node(n, names) for n in graph.nodes]
    lines.append("  return " + ", ".join(names.get(id(v), v.label) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)


def format_node(node: Node, names: dict[int, str]) -> str:
    """One line: `%k: f32[N,25] = op[attr=value] args  # scope`."""
    out = names.get(id(node.out), node.out.label)
    args = ", ".join(names.get(id(v), v.label) for v in node.inputs)
    line = f"{out}: {format_type(node.out.dtype, node.out.shape)} = {node.op.name}{format_attrs(node)}"
    line += f" {args}" if args else ""
    if node.backward:
        line += f"  # grad {node.scope}".rstrip()
    elif node.scope:
        line += f"  # {node.scope}"
    return line


def format_attrs(node: Node) -> str:
    """The attrs that differ from the op's defaults, as `[k=v, ...]` ('' if none)."""
    changed = {k: v for k, v in node.attrs.items() if node.op.attrs.get(k, object()) != v or k == "value"}
    return "[" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + "]" if changed else ""


# -- parsing --------------------------------------------------------------------------

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.]*"
_TYPE = r"(\w+)\[([^\]]*)\]"
_HEADER = re.compile(rf"^graph ({_NAME})\((.*)\) \{{$")
_DECL = re.compile(rf"^({_NAME}): {_TYPE}$")
_NODE = re.compile(rf"^(%\d+): {_TYPE} = ([a-z_]+)(\[[^\]]*\])?(?: ([^#\s].*?))?(?:  # (grad(?: |$))?(.*))?$")
_RETURN = re.compile(r"^return(?: (.*))?$")


def _fail(lineno: int, line: str, message: str) -> GraphError:
    return GraphError(f"IR text, line {lineno}: {message}\n  {lineno} | {line.strip()}")


def _parse_type(lineno: int, line: str, dtype: str, dims: str) -> tuple[torch.dtype, Shape]:
    if dtype not in DTYPES:
        raise _fail(lineno, line, f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    shape: list[int | str] = []
    for d in filter(None, (p.strip() for p in dims.split(","))):
        if d.isascii() and d.isdigit():
            shape.append(int(d))
        elif d.isidentifier():
            shape.append(d)
        else:
            raise _fail(lineno, line, f"dimension {d!r} must be a whole number or a symbol such as N")
    return DTYPES[dtype], tuple(shape)


def _parse_attrs(lineno: int, line: str, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        call = ast.parse(f"f({text[1:-1]})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError("attributes must be name=value pairs")
        return {kw.arg: ast.literal_eval(_NonFinite().visit(kw.value)) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
        raise _fail(lineno, line, f"cannot read the attributes {text}: {e}") from None


class _NonFinite(ast.NodeTransformer):
    """The printer writes non-finite floats as repr does (inf, nan); read them back."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(float(node.id)) if node.id in ("inf", "nan") else node


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, in linear time (a regex lookahead was quadratic)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _split_decls(lineno: int, line: str, text: str) -> list[tuple[str, torch.dtype, Shape]]:
    decls = []
    for part in _split_top_level(text.strip()) if text.strip() else []:
        m = _DECL.match(part.strip())
        if not m:
            raise _fail(lineno, line, f"cannot read the declaration {part.strip()!r}; write it as name: f32[N,2]")
        dtype, shape = _parse_type(lineno, line, m[2], m[3])
        decls.append((m[1], dtype, shape))
    return decls


def parse(text: str, params: dict[str, torch.Tensor] | None = None) -> Graph:
    """Rebuild a graph from its textual IR; `str(parse(str(g))) == str(g)`.

    Args:
        text: the textual IR, as `str(graph)` prints it.
        params: tensors for the declared params; a param not given starts as zeros.

    Returns:
        The graph, with every node re-checked by its op's shape rule.

    Raises:
        GraphError: naming the line, for any malformed or inconsistent text.
    """
    if not isinstance(text, str):
        raise GraphError(f"parse takes the IR text as a str, got {type(text).__name__}")
    params = _check_params(params)
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.strip().startswith("//")]
    if not lines:
        raise GraphError("IR text is empty; it should start with 'graph NAME(inputs; params) {'")
    lineno, line = lines[0]
    header = _HEADER.match(line.strip())
    if not header:
        raise _fail(lineno, line, "expected 'graph NAME(inputs; params) {'")
    sig = header[2].split(";")
    if len(sig) > 2:
        raise _fail(lineno, line, "the signature has more than one ';' (inputs ; params)")
    try:
        graph = Graph(header[1])
        for name, dtype, shape in _split_decls(lineno, line, sig[0]):
            graph.input(name, shape, dtype)
        for name, dtype, shape in _split_decls(lineno, line, sig[1] if len(sig) == 2 else ""):
            if any(isinstance(d, str) for d in shape):
                raise _fail(lineno, line, f"param {name} has a symbolic dim; params need concrete shapes")
            data = params.get(name)
            if data is None:
                data = _zeros(lineno, line, name, dtype, shape)
            elif tuple(data.shape) != shape or data.dtype != dtype:
                raise _fail(lineno, line, f"param {name} is declared {format_type(dtype, shape)} but the "
                                          f"tensor given is {format_type(data.dtype, tuple(data.shape))}")
            graph.param(name, data)
    except GraphError as e:
        if "IR text" in str(e):
            raise
        raise _fail(lineno, line, str(e)) from None

    if lines[-1][1].strip() != "}":
        raise _fail(*lines[-1], "expected '}' closing the graph")
    if len(lines) < 3 or not _RETURN.match(lines[-2][1].strip()):
        raise _fail(*lines[-2], "expected 'return VALUES' as the last line before '}'")

    # Read every node line first, then build in dependency order (networkx), so a
    # forward reference is fine and a cycle is reported with its lines.
    records: dict[str, tuple[int, str, re.Match]] = {}
    for lineno, line in lines[1:-2]:
        m = _NODE.match(line.strip())
        if not m:
            raise _fail(lineno, line, "expected '%k: f32[dims] = op[attrs] args'")
        if m[1] in records:
            raise _fail(lineno, line, f"{m[1]} is defined twice (line {records[m[1]][0]} too)")
        if m[4] not in OPS:
            raise _fail(lineno, line, f"unknown op {m[4]!r}; known ops: {', '.join(sorted(OPS))}")
        records[m[1]] = (lineno, line, m)

    def args_of(lineno: int, line: str, text: str | None) -> list[str]:
        names = [a.strip() for a in text.split(",")] if text and text.strip() else []
        for a in names:
            if a not in records and a not in graph.inputs and a not in graph.params:
                raise _fail(lineno, line, f"{a!r} is not defined; define it as a node, input or param")
        return names

    import networkx as nx  # on first use, not at `import graphdl`

    deps = nx.DiGraph()
    deps.add_nodes_from(records)
    for key, (lineno, line, m) in records.items():
        deps.add_edges_from((a, key) for a in args_of(lineno, line, m[6]) if a in records)
    try:
        order = list(nx.lexicographical_topological_sort(deps, key=lambda k: records[k][0]))
    except nx.NetworkXUnfeasible:
        cycle = [u for u, _ in nx.find_cycle(deps)]
        lineno, line, _ = records[cycle[0]]
        raise _fail(lineno, line, f"values depend on themselves: {' -> '.join([*cycle, cycle[0]])}") from None

    env: dict[str, Value] = {**graph.inputs, **graph.params}
    for key in order:
        lineno, line, m = records[key]
        dtype, shape = _parse_type(lineno, line, m[2], m[3])
        attrs = _parse_attrs(lineno, line, m[5])
        inputs = [env[a] for a in args_of(lineno, line, m[6])]
        with graph.scope((m[8] or "").strip(), backward=bool(m[7])):
            try:
                value = graph.add_node(OPS[m[4]], inputs, attrs, where=f"IR text line {lineno}")
            except GraphError as e:  # keep the message and hint; "created at" is this line
                reason = [ln for ln in str(e).splitlines() if not ln.strip().startswith("created at")]
                raise _fail(lineno, line, "\n".join(reason)) from None
        if (value.dtype, value.shape) != (dtype, shape):
            raise _fail(lineno, line, f"declared {format_type(dtype, shape)} but {m[4]} of these inputs "
                                      f"gives {format_type(value.dtype, value.shape)}")
        env[key] = value

    ret = _RETURN.match(lines[-2][1].strip())
    graph.output(*(env[a] for a in args_of(lines[-2][0], lines[-2][1], ret[1])))
    unused = sorted(set(params) - set(graph.params))
    if unused:
        raise GraphError(f"parse: params={{...}} gives {', '.join(map(repr, unused))}, which the text does not "
                         f"declare; it declares: {', '.join(graph.params) or 'no params'}")
    return graph


# Params the text declares but `params` does not give start as zeros; past this size that
# is more likely a typo in a dim than a wish for gigabytes of zeros. (Under
# `torch.device("meta")`, as io.py parses, nothing is allocated, so there is no limit.)
MAX_ZERO_PARAM_ELEMENTS = 2**28


def _zeros(lineno: int, line: str, name: str, dtype: torch.dtype, shape: Shape) -> torch.Tensor:
    count = math.prod(shape)  # type: ignore[arg-type]  (params have int dims only)
    if count > MAX_ZERO_PARAM_ELEMENTS and torch.empty(0).device.type != "meta":
        raise _fail(lineno, line, f"param {name} is declared {format_type(dtype, shape)} ({count:,} elements); "
                                  f"pass its tensor with parse(text, params={{{name!r}: tensor}}) rather than "
                                  "have graphdl allocate that many zeros")
    return torch.zeros(shape, dtype=dtype)


def _check_params(params: object) -> dict[str, torch.Tensor]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise GraphError(f"parse: params must be a dict of name -> torch.Tensor, got {type(params).__name__}")
    for name, data in params.items():
        if not isinstance(data, torch.Tensor):
            raise GraphError(f"parse: params[{name!r}] must be a torch.Tensor, got {type(data).__name__}")
    return params
