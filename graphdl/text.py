"""The textual IR: a printer and a parser that round-trip exactly.

    graph tiny(x: f32[N,2], y: f32[N,1]; w: f32[2,1], b: f32[1]) {
      %0: f32[N,1] = matmul x, w
      %1: f32[N,1] = add %0, b
      %2: f32[] = sum[axis=(0,), keepdims=True] %1  # 0:Linear
      return %2 (total)
    }

Inputs come before the `;`, params after. An output may carry a label in parentheses
(`grad` labels each gradient `d/d<name>`). Attributes that differ from the op's
defaults print in brackets as Python literals. A trailing `# scope` records the layer
a node belongs to, and `# grad scope` marks a node that `grad` emitted. A scope that
would not read back as itself (`grad`, ` padded `, one with a tab) is written as a JSON
string: `# "grad"`, `# grad " padded "`.
"""

from __future__ import annotations

import ast
import cmath
import json
import math
import re
from typing import Any

import torch

from .building import pauses_gc
from .checks import DTYPES, GraphError, NumberText, Shape, format_type, read_shape, show_number, whole_number
from .ir import Graph, Node, Value
from .ops.registry import OPS


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
    lines.append("  return " + ", ".join((names.get(id(v)) or v.label) + (f" ({label})" if label else "")
                                         for v, label in zip(graph.outputs, graph.output_labels)))
    lines.append("}")
    return "\n".join(lines)


def format_node(node: Node, names: dict[int, str]) -> str:
    """One line: `%k: f32[N,25] = op[attr=value] args  # scope`."""
    # `or`, not names.get(id, v.label), which would work out every value's label anyway.
    out = names.get(id(node.out)) or node.out.label
    args = ", ".join(names.get(id(v)) or v.label for v in node.inputs)
    line = f"{out}: {format_type(node.out.dtype, node.out.shape)} = {node.op.name}{format_attrs(node)}"
    line += f" {args}" if args else ""
    if node.backward:
        line += "  # grad" + (f" {format_scope(node.scope)}" if node.scope else "")
    elif node.scope:
        line += f"  # {format_scope(node.scope)}"
    return line


def format_scope(scope: str) -> str:
    """A scope as the text IR writes it: as it is when it reads back unchanged, else as a
    JSON string (spaces at its ends, unprintable characters, a leading quote, or a forward
    scope that would read as the `grad` marker)."""
    plain = scope.isprintable() and scope == scope.strip() and not scope.startswith('"') and \
        scope != "grad" and not scope.startswith("grad ")
    return scope if plain else json.dumps(scope)


def format_attrs(node: Node) -> str:
    """The attrs that differ from the op's defaults, as `[k=v, ...]` ('' if none)."""
    changed = {k: v for k, v in node.attrs.items() if node.op.attrs.get(k, object()) != v or k == "value"}
    return "[" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + "]" if changed else ""


# -- parsing --------------------------------------------------------------------------

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.]*"
_TYPE = r"(\w+)\[([^\]]*)\]"
_HEADER = re.compile(rf"^graph ({_NAME})\((.*)\) \{{$")
_DECL = re.compile(rf"^({_NAME}): {_TYPE}$")
_NODE = re.compile(rf"^(%\d+): {_TYPE} = ([a-z_][a-z0-9_]*)(\[[^\]]*\])?(?: ([^#\s].*?))?(?:  # (grad(?: |$))?(.*))?$")
_RETURN = re.compile(r"^return(?: (.*))?$")
_OUTPUT = re.compile(r"^(\S+)(?: \((.+)\))?$")  # %k, or %k (label)
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII only: '²'.isdigit() is True, and int() would read '٣'
# The printer writes at most 17 significant digits; a longer number is refused before
# Python reads it (past 4,300 digits int() raises, and reading is quadratic before that).
_LONG_NUMBER = re.compile(r"[0-9]{41,}")


def _fail(lineno: int, line: str, message: str) -> GraphError:
    line = line.strip()
    if len(line) > 200:  # a crafted line (a 5,000-digit dim) would bury the message
        line = f"{line[:160]} ... ({len(line):,} characters)"
    return GraphError(f"IR text, line {lineno}: {message}\n  {lineno} | {line}")


def _parse_type(lineno: int, line: str, name: str, dtype: str, dims: str) -> tuple[torch.dtype, Shape]:
    """The dtype and shape of `name` (a declared input or param, or a node's %k)."""
    if dtype not in DTYPES:
        raise _fail(lineno, line, f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    shape: list[int | str] = []
    for d in filter(None, (p.strip() for p in dims.split(","))):
        if _INTEGER.fullmatch(d):
            shape.append(whole_number(d))
        elif d.isidentifier():
            shape.append(d)
        else:
            raise _fail(lineno, line, f"dimension {d!r} must be a whole number or a symbol such as N")
    try:
        return DTYPES[dtype], read_shape(shape, name, DTYPES[dtype])
    except GraphError as e:
        raise _fail(lineno, line, str(e)) from None


def _parse_attrs(lineno: int, line: str, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    long = _LONG_NUMBER.search(text)
    if long:
        names = re.findall(r"(\w+)\s*=", text[:long.start()])
        raise _fail(lineno, line, f"attribute {names[-1] if names else '?'!r} holds a number of {len(long[0]):,} "
                                  "digits; numbers in IR text have at most 40 (write 1e30, not 1000...0)")
    source = f"f({text[1:-1]})"
    try:
        call = ast.parse(source, mode="eval").body
        if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError("attributes must be name=value pairs")
        return {kw.arg: ast.literal_eval(_Literal(source, kw.arg).visit(kw.value)) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
        raise _fail(lineno, line, f"cannot read the attributes {text}: {e}") from None


class _Literal(ast.NodeTransformer):
    """Reads an attribute's value as the printer writes it: non-finite floats as repr
    does (inf, nan), and no literal beyond float64 (1e400 would silently read as inf)."""

    def __init__(self, source: str, name: str) -> None:
        self.source, self.name = source, name

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(float(node.id)) if node.id in ("inf", "nan") else node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, (float, complex)) and not cmath.isfinite(node.value):
            literal = NumberText(ast.get_source_segment(self.source, node) or "")
            raise ValueError(f"attribute {self.name}: {show_number(literal)} is too large for a float; "
                             "write inf if that is meant")
        return node


def _parse_scope(lineno: int, line: str, text: str) -> str:
    """The scope after `# ` (or `# grad `): as written, or decoded if it is a JSON string."""
    if not text.startswith('"'):
        return text
    try:
        scope = json.loads(text)
    except (ValueError, RecursionError):
        scope = None
    if not isinstance(scope, str):
        raise _fail(lineno, line, f"the scope {text} is not one JSON string; write it as \"name\", with JSON's "
                                  "escapes such as \\\" and \\t inside")
    return scope


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
        dtype, shape = _parse_type(lineno, line, m[1], m[2], m[3])
        decls.append((m[1], dtype, shape))
    return decls


@pauses_gc
def parse(text: str, params: dict[str, torch.Tensor] | None = None) -> Graph:
    """Rebuild a graph from its textual IR; `str(parse(str(g))) == str(g)`.

    Every value is defined on a line before the lines that use it, as the printer
    writes it; the nodes are built in line order.

    Args:
        text: the textual IR, as `str(graph)` prints it.
        params: tensors for the declared params; a param not given starts as zeros.

    Returns:
        The graph, with every node re-checked by its op's shape rule.

    Raises:
        GraphError: naming the line, for any malformed or inconsistent text.
    """
    lines, params = _check_parse_args(text, params)
    graph = _parse_signature(*lines[0], params)
    _check_closing_lines(lines)
    env = _parse_nodes(graph, lines[1:-2])
    _parse_outputs(graph, env, *lines[-2])
    _check_params_declared(graph, params)
    return graph


def _check_parse_args(text: object, params: object) -> tuple[list[tuple[int, str]], dict[str, torch.Tensor]]:
    """The text's (line number, line) pairs without blank and // comment lines, and the params."""
    if not isinstance(text, str):
        raise GraphError(f"parse takes the IR text as a str, got {type(text).__name__}")
    checked = _check_params(params)
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.strip().startswith("//")]
    if not lines:
        raise GraphError("IR text is empty; it should start with 'graph NAME(inputs; params) {'")
    return lines, checked


def _parse_signature(lineno: int, line: str, params: dict[str, torch.Tensor]) -> Graph:
    """The graph `graph NAME(inputs; params) {` declares, with its inputs and params."""
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
            graph.param(name, _param_data(lineno, line, name, dtype, shape, params))
    except GraphError as e:
        if "IR text" in str(e):
            raise
        raise _fail(lineno, line, str(e)) from None
    return graph


def _param_data(lineno: int, line: str, name: str, dtype: torch.dtype, shape: Shape,
                params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor of a param the signature declares: the one `params` gives, of the declared
    type, or zeros."""
    if any(isinstance(d, str) for d in shape):
        raise _fail(lineno, line, f"param {name} has a symbolic dim; params need concrete shapes")
    data = params.get(name)
    if data is None:
        return _zeros(lineno, line, name, dtype, shape)
    if tuple(data.shape) != shape or data.dtype != dtype:
        raise _fail(lineno, line, f"param {name} is declared {format_type(dtype, shape)} but the "
                                  f"tensor given is {format_type(data.dtype, tuple(data.shape))}")
    return data


def _check_closing_lines(lines: list[tuple[int, str]]) -> None:
    if lines[-1][1].strip() != "}":
        raise _fail(*lines[-1], "expected '}' closing the graph")
    if len(lines) < 3 or not _RETURN.match(lines[-2][1].strip()):
        raise _fail(*lines[-2], "expected 'return VALUES' as the last line before '}'")


def _parse_nodes(graph: Graph, lines: list[tuple[int, str]]) -> dict[str, Value]:
    """Add a node per line, in order; returns every value by its name in the text."""
    env: dict[str, Value] = {**graph.inputs, **graph.params}
    defined_on: dict[str, int] = {}  # %k -> its line
    # A graph has few distinct types and attrs: read each once (reading them every time was
    # half of parse: a third for types, a sixth for attrs, whose reader is Python's).
    types: dict[tuple[str, str], tuple[torch.dtype, Shape]] = {}
    attrs_read: dict[str | None, dict[str, Any]] = {}
    for lineno, line in lines:
        m = _NODE.match(line.strip())
        if not m:
            raise _fail(lineno, line, "expected '%k: f32[dims] = op[attrs] args'")
        if m[1] in defined_on:
            raise _fail(lineno, line, f"{m[1]} is defined twice (line {defined_on[m[1]]} too)")
        if m[4] not in OPS:
            raise _fail(lineno, line, f"unknown op {m[4]!r}; known ops: {', '.join(sorted(OPS))}")
        if (m[2], m[3]) not in types:
            types[m[2], m[3]] = _parse_type(lineno, line, m[1], m[2], m[3])
        if m[5] not in attrs_read:
            attrs_read[m[5]] = _parse_attrs(lineno, line, m[5])
        env[m[1]] = _parse_node(graph, lineno, line, m, types[m[2], m[3]], dict(attrs_read[m[5]]),
                                _args(env, lineno, line, m[6]))
        defined_on[m[1]] = lineno
    return env


def _parse_node(graph: Graph, lineno: int, line: str, m: re.Match, declared: tuple[torch.dtype, Shape],
                attrs: dict[str, Any], inputs: list[Value]) -> Value:
    """Add the node of one line; its op's rule must give the type the line declares."""
    dtype, shape = declared
    scope = _parse_scope(lineno, line, m[8] or "")
    try:
        with graph.scope(scope, backward=bool(m[7])):
            value = graph.add_node(OPS[m[4]], inputs, attrs, where=f"IR text line {lineno}")
    except GraphError as e:  # keep the message and hint; "created at" is this line
        reason = [ln for ln in str(e).splitlines() if not ln.strip().startswith("created at")]
        raise _fail(lineno, line, "\n".join(reason)) from None
    if (value.dtype, value.shape) != (dtype, shape):
        raise _fail(lineno, line, f"declared {format_type(dtype, shape)} but {m[4]} of these inputs "
                                  f"gives {format_type(value.dtype, value.shape)}")
    return value


def _args(env: dict[str, Value], lineno: int, line: str, text: str | None) -> list[Value]:
    """The values a comma-separated list names; each must be defined on an earlier line."""
    names = [a.strip() for a in text.split(",")] if text and text.strip() else []
    for a in names:
        if a not in env:
            raise _fail(lineno, line, f"{a!r} is not defined before this line; define it as a node on an "
                                      "earlier line, an input or a param")
    return [env[a] for a in names]


def _parse_outputs(graph: Graph, env: dict[str, Value], lineno: int, line: str) -> None:
    """`return %k (label), ...`: the graph's outputs, in order."""
    for part in _split_top_level(_RETURN.match(line.strip())[1] or "") if line.strip() != "return" else []:
        m = _OUTPUT.match(part.strip())
        if not m:
            raise _fail(lineno, line, f"cannot read the output {part.strip()!r}; write it as %k or %k (label)")
        (value,) = _args(env, lineno, line, m[1])
        try:
            graph.output(value, label=m[2] or "")
        except GraphError as e:
            raise _fail(lineno, line, str(e)) from None


def _check_params_declared(graph: Graph, params: dict[str, torch.Tensor]) -> None:
    unused = sorted(set(params) - set(graph.params))
    if unused:
        raise GraphError(f"parse: params={{...}} gives {', '.join(map(repr, unused))}, which the text does not "
                         f"declare; it declares: {', '.join(graph.params) or 'no params'}")


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
