"""ONNX import: `import_onnx(path)`, through one table, `IMPORT`.

`IMPORT` gives each ONNX op the graphdl IR it becomes, built with the same functional
ops users call. Import reads the file's bytes and parses them itself (never
`onnx.load`, which would follow external-data paths), checks every tensor's declared
size against the bytes it holds before copying it, and turns anything it cannot read
into a `GraphError`. (graphdl.onnx_io is the front door of both directions;
graphdl.onnx_export writes files.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import ops
from .checks import DTYPE_NAMES, DTYPES, GraphError, format_shape, read_int
from .files import as_path, read_bytes
from .ir import Graph, Value, is_identifier
from .onnx_format import ELEM_TYPE, INT64, MAX_FILE_BYTES, require_onnx


class Static:
    """A tensor the file fixes (an initializer or a Constant): read by rows that need a
    constant (axes), or turned into a graph value on first use as data."""

    def __init__(self, tensor: torch.Tensor, name: str, initializer: bool) -> None:
        self.tensor, self.name, self.initializer = tensor, name, initializer
        self.value: Value | None = None


class NodeReader:
    """One ONNX node as its import row sees it: inputs as graph values or constants,
    attributes checked against the ones the row understands."""

    def __init__(self, importer: Importer, node: Any, attrs: dict[str, Any]) -> None:
        self.importer, self.node, self.attrs = importer, node, attrs
        self.opset = importer.opset

    def x(self, i: int) -> Value:
        """Input i as a graph value."""
        return self.importer.as_value(self.entry(i))

    def optional(self, i: int) -> Value | None:
        entry = self._entry(i)
        return None if entry is None else self.importer.as_value(entry)

    def entry(self, i: int) -> Value | Static:
        """Input i as it is: a graph value, or a constant from the file."""
        entry = self._entry(i)
        if entry is None:
            raise GraphError(f"input {i} is required")
        return entry

    def ints(self, i: int) -> list[int] | None:
        """Input i, which must be a constant in the file (e.g. axes), as ints; None if absent."""
        entry = self._entry(i)
        if entry is None:
            return None
        if not isinstance(entry, Static) or entry.tensor.dtype != torch.int64 or entry.tensor.ndim != 1:
            raise GraphError(f"input {i} ({self.node.input[i]}) must be a constant 1-d int64 tensor in the file; "
                             "graphdl needs it while building the graph")
        return [int(v) for v in entry.tensor]

    def attr(self, name: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        value = self.attrs.get(name, default)
        if name in self.attrs and not isinstance(value, kind):
            raise GraphError(f"attribute {name}={value!r} has the wrong type")
        return value

    def text(self, name: str, default: str) -> str:
        """A string attribute (onnx hands them over as bytes)."""
        value = self.attr(name, default, (str, bytes))
        try:
            return value.decode() if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise GraphError(f"attribute {name} is not UTF-8 text") from None

    def _entry(self, i: int) -> Value | Static | None:
        if i >= len(self.node.input) or not self.node.input[i]:
            return None
        name = self.node.input[i]
        if name not in self.importer.env:
            raise GraphError(f"input {i} ({name!r}) is not defined before this node (the file's nodes must be "
                             "in topological order)")
        return self.importer.env[name]


ImportRow = Callable[[NodeReader], Value | Static]


def _gemm(r: NodeReader) -> Value:
    a, b, c = r.x(0), r.x(1), r.optional(2)
    alpha, beta = r.attr("alpha", 1.0, (float, int)), r.attr("beta", 1.0, (float, int))
    if r.attr("transA", 0, int):
        a = ops.transpose(a)
    if r.attr("transB", 0, int):
        b = ops.transpose(b)
    y = ops.matmul(a, b)
    if alpha != 1.0:
        y = y * float(alpha)
    if c is not None:
        y = y + (c if beta == 1.0 else c * float(beta))
    return y


def _transpose(r: NodeReader) -> Value:
    x = r.x(0)
    perm = r.attr("perm", None, list)
    perm = list(reversed(range(x.ndim))) if perm is None else perm
    if perm == list(range(x.ndim)):
        return x
    if perm == [*range(x.ndim - 2), x.ndim - 1, x.ndim - 2]:
        return ops.transpose(x)
    return ops.permute(x, tuple(perm))


def _reshape(r: NodeReader) -> Value:
    """Reshape to a shape fixed in the file: a 0 copies the input's dim (unless allowzero),
    and a -1 that would fold the batch dim into another (ONNX's [-1, 64] of an [N,1,8,8])
    keeps it as the batch dim when the other dims account for every other element."""
    x, shape = r.x(0), r.ints(1)
    if shape is None:
        raise GraphError("input 1 (the shape) is required")
    if not r.attr("allowzero", 0, int):
        shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
    symbols = [d for d in x.shape if isinstance(d, str)]
    if shape.count(-1) == 1 and len(symbols) == 1 and symbols[0] not in shape:
        rest = math.prod(d for d in shape if d != -1)
        if rest == math.prod(d for d in x.shape if isinstance(d, int)):
            shape = [symbols[0] if d == -1 else d for d in shape]
    return ops.reshape(x, tuple(shape))


def _flatten(r: NodeReader) -> Value:
    """Flatten to 2-d at `axis`: [prod(dims before), prod(dims from axis on)]."""
    x = r.x(0)
    axis = r.attr("axis", 1, int)
    if not -x.ndim <= axis <= x.ndim:
        raise GraphError(f"Flatten axis={axis} is not an axis of {format_shape(x.shape)}")
    axis %= x.ndim + 1
    sides = []
    for dims in (x.shape[:axis], x.shape[axis:]):
        if len(dims) == 1 or not any(isinstance(d, str) for d in dims):
            sides.append(dims[0] if len(dims) == 1 else math.prod(dims))
        else:
            raise GraphError(f"Flatten axis={axis} of {format_shape(x.shape)} would fold the symbolic dim into "
                             "another; graphdl keeps the batch dim a dim of its own")
    return ops.reshape(x, tuple(sides))


def _slice(r: NodeReader) -> Value:
    x, starts, ends = r.x(0), r.ints(1), r.ints(2)
    axes, steps = r.ints(3), r.ints(4)
    if starts is None or ends is None or len(starts) != len(ends):
        raise GraphError("Slice needs starts and ends of one length, constant in the file")
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(axes) == len(steps) == len(starts):
        raise GraphError("Slice's starts, ends, axes and steps differ in length")
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 1:
            raise GraphError(f"Slice step {step} is not supported; graphdl slices forwards (step >= 1)")
        size = x.shape[axis % x.ndim] if -x.ndim <= axis < x.ndim else 0
        clamp = (lambda v: max(-size - 1, min(v, size))) if isinstance(size, int) else (lambda v: v)  # noqa: E731
        x = ops.slice_(x, axis, clamp(start), clamp(end), step)
    return x


def _gather(r: NodeReader) -> Value:
    index = r.entry(1)
    if not isinstance(index, Value):
        raise GraphError("Gather's indices are a constant in the file; graphdl reads indices from an int64 input")
    return ops.index_select(r.x(0), index, axis=r.attr("axis", 0, int))


def _reduce(build: Callable[..., Value]) -> ImportRow:
    """ReduceSum/ReduceMean, with axes from the attribute (older opsets) or the input (newer)."""
    def row(r: NodeReader) -> Value:
        x = r.x(0)
        axes = r.ints(1)
        if axes is None:
            axes = r.attr("axes", None, list)
        if not axes:
            if r.attr("noop_with_empty_axes", 0, int):
                return x
            axes = None
        return build(x, axis=axes, keepdims=bool(r.attr("keepdims", 1, int)))
    return row


def _constant(r: NodeReader) -> Static:
    if len(r.attrs) != 1:
        raise GraphError(f"a Constant takes one value attribute, got {sorted(r.attrs) or 'none'}")
    (kind, value), = r.attrs.items()
    out = r.node.output[0]
    if kind == "value":
        return Static(r.importer.tensor(value, f"Constant {out!r}"), out, initializer=False)
    as_tensor = {"value_float": torch.float32, "value_floats": torch.float32,
                 "value_int": torch.int64, "value_ints": torch.int64}  # the attributes IMPORT lets through
    try:
        return Static(torch.tensor(value, dtype=as_tensor[kind]), out, initializer=False)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise GraphError(f"Constant attribute {kind} holds {type(value).__name__} values torch cannot read ({e})") \
            from None


def _last_axis(op: str) -> ImportRow:
    """Softmax or LogSoftmax: over any axis from opset 13, over the last before it."""
    def row(r: NodeReader) -> Value:
        x = r.x(0)
        axis = r.attr("axis", -1 if r.opset >= 13 else 1, int)
        if not -x.ndim <= axis < x.ndim:
            raise GraphError(f"{r.node.op_type} over axis {axis} of {format_shape(x.shape)}: no such axis")
        if r.opset >= 13 and axis % x.ndim != x.ndim - 1:
            return ops.apply(ops.OPS[op], x, axis=axis)
        # Before opset 13 these flattened the input to 2-d at `axis`; over the last axis
        # both readings normalise each row over the last axis, as graphdl does.
        if axis % x.ndim != x.ndim - 1:
            raise GraphError(f"{r.node.op_type} over axis {axis} of {format_shape(x.shape)} is not supported "
                             f"before opset 13 (which flattened the input there); graphdl's {op} normalises "
                             "the last axis")
        return ops.apply(ops.OPS[op], x)
    return row


def _unary(build: Callable[[Value], Value]) -> ImportRow:
    return lambda r: build(r.x(0))


def _binary(build: Callable[[Value, Value], Value]) -> ImportRow:
    return lambda r: build(r.x(0), r.x(1))


# ONNX op -> (graphdl IR builder, the attributes it reads; any other attribute is refused).
IMPORT: dict[str, tuple[ImportRow, frozenset[str]]] = {
    "Identity": (lambda r: r.entry(0), frozenset()),
    "Constant": (_constant, frozenset({"value", "value_float", "value_floats", "value_int", "value_ints"})),
    "MatMul": (_binary(ops.matmul), frozenset()),
    "Gemm": (_gemm, frozenset({"alpha", "beta", "transA", "transB"})),
    "Add": (_binary(ops.add), frozenset()),
    "Sub": (_binary(ops.sub), frozenset()),
    "Mul": (_binary(ops.mul), frozenset()),
    "Div": (_binary(ops.div), frozenset()),
    "Relu": (_unary(ops.relu), frozenset()),
    "Tanh": (_unary(ops.tanh), frozenset()),
    "Sigmoid": (_unary(ops.sigmoid), frozenset()),
    "Exp": (_unary(ops.exp), frozenset()),
    "Log": (_unary(ops.log), frozenset()),
    "Neg": (_unary(ops.neg), frozenset()),
    "Abs": (_unary(ops.abs), frozenset()),
    "Sign": (_unary(ops.sign), frozenset()),
    "Transpose": (_transpose, frozenset({"perm"})),
    "ReduceSum": (_reduce(ops.sum), frozenset({"axes", "keepdims", "noop_with_empty_axes"})),
    "ReduceMean": (_reduce(ops.mean), frozenset({"axes", "keepdims", "noop_with_empty_axes"})),
    "Softmax": (_last_axis("softmax"), frozenset({"axis"})),
    "LogSoftmax": (_last_axis("log_softmax"), frozenset({"axis"})),
    "Reshape": (_reshape, frozenset({"allowzero"})),
    "Flatten": (_flatten, frozenset({"axis"})),
    "Concat": (lambda r: ops.concat(*(r.x(i) for i in range(len(r.node.input))), axis=r.attr("axis", 0, int)),
               frozenset({"axis"})),
    "Slice": (_slice, frozenset()),
    "Gather": (_gather, frozenset({"axis"})),
    "LeakyRelu": (lambda r: ops.leaky_relu(r.x(0), float(r.attr("alpha", 0.01, (float, int)))), frozenset({"alpha"})),
    "Gelu": (lambda r: ops.gelu(r.x(0), approximate=r.text("approximate", "none")), frozenset({"approximate"})),
}


# -- convolution, pooling, normalisation, dropout (as torch.onnx.export writes them) ---------


def _text(r: NodeReader, name: str, default: str) -> str:
    value = r.attr(name, default.encode(), bytes)
    return value.decode("ascii", "replace")


def _ints(r: NodeReader, name: str, default: list[int]) -> list[int]:
    values = r.attr(name, default, list)
    if not all(isinstance(v, int) for v in values):
        raise GraphError(f"attribute {name}={values!r} must be ints")
    return values


def _padding(r: NodeReader, d: int) -> tuple[int, ...]:
    """ONNX's pads [begin..., end...] as graphdl's padding: the same at both ends."""
    if _text(r, "auto_pad", "NOTSET") != "NOTSET":
        raise GraphError("auto_pad is not supported; graphdl reads explicit pads")
    pads = _ints(r, "pads", [0] * 2 * d)
    if len(pads) != 2 * d or pads[:d] != pads[d:]:
        raise GraphError(f"pads {pads} pad the two ends differently; graphdl pads both ends alike")
    return tuple(pads[:d])


def _conv_in(r: NodeReader) -> Value:
    x, w, bias = r.x(0), r.x(1), r.optional(2)
    d = w.ndim - 2
    if d not in (1, 2):
        raise GraphError(f"a Conv of {d}-d kernels is not supported; graphdl has conv1d and conv2d")
    if _ints(r, "kernel_shape", list(w.shape[2:])) != list(w.shape[2:]):
        raise GraphError(f"kernel_shape {r.attrs['kernel_shape']} is not the weight's {list(w.shape[2:])}")
    op = ops.conv1d if d == 1 else ops.conv2d
    return op(x, w, *([bias] if bias is not None else []), stride=tuple(_ints(r, "strides", [1] * d)),
              padding=_padding(r, d), dilation=tuple(_ints(r, "dilations", [1] * d)), groups=r.attr("group", 1, int))


def _pool_in(op: Any) -> ImportRow:
    def row(r: NodeReader) -> Value:
        if r.attr("ceil_mode", 0, int) or r.attr("storage_order", 0, int) or \
                _ints(r, "dilations", [1, 1]) != [1, 1]:
            raise GraphError("ceil_mode, storage_order and dilations are not supported")
        kernel = _ints(r, "kernel_shape", [])
        if len(kernel) != 2:
            raise GraphError(f"kernel_shape {kernel} is not 2-d; graphdl pools [N, C, H, W]")
        extra = {} if op is ops.max_pool2d else {"count_include_pad": bool(r.attr("count_include_pad", 0, int))}
        return op(r.x(0), kernel_size=tuple(kernel), stride=tuple(_ints(r, "strides", [1, 1])),
                  padding=_padding(r, 2), **extra)
    return row


def _batch_norm_in(r: NodeReader) -> Value:
    if r.attr("training_mode", 0, int):
        raise GraphError("training_mode=1 is not supported; graphdl imports inference graphs (running statistics)")
    return ops.batch_norm(r.x(0), r.x(3), r.x(4), r.x(1), r.x(2), eps=float(r.attr("epsilon", 1e-5, float)))


def _layer_norm_in(r: NodeReader) -> Value:
    x, w, bias = r.x(0), r.x(1), r.optional(2)
    axis = r.attr("axis", -1, int)
    if not -x.ndim <= axis < x.ndim or axis % x.ndim != x.ndim - w.ndim:
        raise GraphError(f"axis={axis} does not normalise the weight's {w.ndim} last dims of {format_shape(x.shape)}")
    if bias is None:
        raise GraphError("a LayerNormalization without a bias is not supported")
    return ops.layer_norm(x, w, bias, eps=float(r.attr("epsilon", 1e-5, float)))


def _dropout_in(r: NodeReader) -> Value | Static:
    if len(r.node.input) > 2 and r.node.input[2]:
        raise GraphError("a Dropout with a training_mode input is not supported; export the model in eval mode")
    return r.entry(0)  # inference: the identity


IMPORT.update({
    "Conv": (_conv_in, frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})),
    "MaxPool": (_pool_in(ops.max_pool2d),
                frozenset({"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides"})),
    "AveragePool": (_pool_in(ops.avg_pool2d),
                    frozenset({"auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads",
                               "strides"})),
    "BatchNormalization": (_batch_norm_in, frozenset({"epsilon", "momentum", "training_mode"})),
    "LayerNormalization": (_layer_norm_in, frozenset({"axis", "epsilon", "stash_type"})),
    "Dropout": (_dropout_in, frozenset({"seed"})),
})


def import_onnx(path: str | os.PathLike[str]) -> Graph:
    """Build a graph from an ONNX model file.

    Args:
        path: an `.onnx` file of the ops in `IMPORT` (MatMul, Gemm, Add, Sub, Mul, Div,
            Relu, Tanh, Sigmoid, Exp, Log, Neg, Abs, Sign, Transpose, ReduceSum,
            ReduceMean, Softmax, LogSoftmax, Identity, Constant, Reshape, Flatten, Concat,
            Slice, Gather, LeakyRelu, Gelu; Conv, MaxPool, AveragePool, BatchNormalization
            (inference), LayerNormalization, Dropout (inference: the identity)), weights
            inside the file.

    Returns:
        A `gd.Graph`: the model's inputs under their names (sanitised to graphdl names),
        a leading symbolic or unknown dim as the batch dim "N", the initializers as
        params holding copies of their values, and the model's outputs. It prints,
        compiles, differentiates and trains like any graph.

    Raises:
        GraphError: the file is missing, not ONNX, corrupt (a tensor's declared size
            differs from its data), keeps weights in external files, or uses an op or
            attribute graphdl cannot import (named with its node and the opset).
        ImportError: the onnx package is missing.
    """
    onnx = require_onnx()
    path = as_path(path)
    return Importer(onnx, path, _read_model(onnx, path)).build()


def _read_model(onnx: Any, path: Path) -> Any:
    try:
        with path.open("rb") as f:  # read at most one byte past the limit, whatever the file claims to be
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        read_bytes(path)  # raises, naming what is wrong
        raise
    if len(data) > MAX_FILE_BYTES:
        raise GraphError(f"{path}: is over 2 GiB, more than protobuf can read as one ONNX model")
    not_onnx = f"{path}: is not an ONNX model"
    if not data:
        raise GraphError(f"{not_onnx}: the file is empty")
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as e:  # protobuf's DecodeError, or a message nested too deep
        raise GraphError(f"{not_onnx}, or it is corrupt: protobuf cannot read it ({e})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise GraphError(f"{not_onnx}: it lacks an ONNX model's IR version, graph or opset "
                         f"(a {len(data)}-byte file that protobuf reads as something else)")
    _check_text(path, model)
    return model


def _check_text(path: Path, model: Any) -> None:
    """Every string field is text. ONNX is proto2, where protobuf hands over a string
    that is not valid UTF-8 as bytes instead of failing, and every name would then be
    bytes to the code that reads it."""
    stack = [model]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            values = value if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else [value]
            if field.type == field.TYPE_MESSAGE:
                stack.extend(values)
            elif field.type == field.TYPE_STRING and any(not isinstance(v, str) for v in values):
                raise GraphError(f"{path}: the field {field.full_name} holds text that is not UTF-8; "
                                 "the file is corrupt")


class Importer:
    """Builds a graphdl graph from a parsed ONNX model, one node at a time."""

    def __init__(self, onnx: Any, path: Path, model: Any) -> None:
        self.onnx, self.path, self.model = onnx, path, model
        self.opset = self._default_opset()
        self.graph = Graph(_sanitise(model.graph.name, set()) if model.graph.name else "onnx")
        self.env: dict[str, Value | Static] = {}
        self.taken: set[str] = set()

    def build(self) -> Graph:
        body = self.model.graph
        if len(body.sparse_initializer):
            raise self._error("it has sparse initializers, which graphdl does not read")
        for t in body.initializer:
            try:
                self.env[t.name] = Static(self.tensor(t, f"initializer {t.name!r}"), t.name, initializer=True)
            except GraphError as e:
                raise self._error(str(e)) from None
        for v in body.input:
            if v.name not in self.env:  # IR < 4 also lists initializers as inputs
                self.env[v.name] = self._input(v)
        for k, node in enumerate(body.node):
            self._node(k, node)
        for v in body.output:
            self._output(v)
        self.graph.verify()
        return self.graph

    # -- values ----------------------------------------------------------------------

    def tensor(self, proto: Any, what: str) -> torch.Tensor:
        """A TensorProto's value, checked against its declared dims and type before any copy."""
        _check_self_contained(proto, what)
        dims = _tensor_dims(proto, what)
        if proto.data_type not in _LAYOUTS:
            raise GraphError(f"{what} is of ONNX type {_type_name(self.onnx, proto.data_type)}; graphdl reads "
                             "float, double, float16, bfloat16 and int64 (axes) tensors")
        dtype, layout, field = _LAYOUTS[proto.data_type]
        numel = math.prod(dims)
        array = _raw_array(proto, what, dims, numel, layout) if proto.raw_data else \
            _field_array(proto, what, dims, numel, layout, field)
        return _as_tensor(array, dtype, dims)

    def as_value(self, entry: Value | Static) -> Value:
        """A graph value for an input: a constant from the file becomes a param (an
        initializer, or a non-scalar Constant) or a `const` node (a float scalar Constant)."""
        if isinstance(entry, Value):
            return entry
        if entry.value is None:
            t = entry.tensor
            if t.dtype not in DTYPE_NAMES:
                raise GraphError(f"{entry.name!r} is a {t.dtype} tensor; graphdl computes with float tensors only")
            if t.ndim == 0 and not entry.initializer:
                entry.value = self.graph.const(float(t), t.dtype)
            else:
                entry.value = self.graph.param(self._name(entry.name), t)
        return entry.value

    def _input(self, v: Any) -> Value:
        what = f"input {v.name!r}"
        dtype = self._input_dtype(v, what)
        shape = [self._input_dim(what, axis, d) for axis, d in enumerate(v.type.tensor_type.shape.dim)]
        return self.graph.input(self._name(v.name), shape, dtype)

    def _input_dtype(self, v: Any, what: str) -> torch.dtype:
        """The dtype of a graph input, which must be a float tensor of known rank."""
        if v.type.WhichOneof("value") != "tensor_type":
            raise self._error(f"{what} is not a tensor; graphdl takes tensor inputs")
        t = v.type.tensor_type
        dtype = next((DTYPES[n] for n, e in ELEM_TYPE.items() if e == t.elem_type), None)
        if dtype is None:
            raise self._error(f"{what} is of ONNX type {_type_name(self.onnx, t.elem_type)}; graphdl takes "
                              "float, double, float16 and bfloat16 inputs, and int64 indices")
        if not t.HasField("shape"):
            raise self._error(f"{what} declares no shape; graphdl needs at least its rank")
        return dtype

    def _input_dim(self, what: str, axis: int, d: Any) -> int | str:
        """A graph input's dim: a size, the batch "N" (a symbolic or unknown leading dim), or a symbol."""
        kind = d.WhichOneof("value")
        if kind == "dim_value":
            try:
                return read_int(d.dim_value, f"{what}: dim {axis}")  # int64 in the file: only its sign can be wrong
            except GraphError:
                raise self._error(f"{what} has a negative dim {d.dim_value}; the file is corrupt") from None
        if axis == 0:  # a symbolic or unknown leading dim is the batch
            return "N"
        if kind == "dim_param" and d.dim_param.isidentifier() and d.dim_param != "N":
            return d.dim_param
        raise self._error(f"{what}: dim {axis} is {d.dim_param or 'unknown'!r}; graphdl takes a symbolic "
                          "batch dim in front and fixed sizes (or symbol names) after it")

    def _output(self, v: Any) -> None:
        if v.name not in self.env:
            raise self._error(f"output {v.name!r} is not computed by any node")
        value = self.as_value(self.env[v.name])
        declared = v.type.tensor_type.shape.dim if v.type.tensor_type.HasField("shape") else None
        if declared is not None:
            dims = [d.dim_value if d.WhichOneof("value") == "dim_value" else None for d in declared]
            if len(dims) != value.ndim or any(d is not None and d != s for d, s in zip(dims, value.shape)):
                raise self._error(f"output {v.name!r} is declared {dims} but graphdl computes "
                                  f"{format_shape(value.shape)}; the model is inconsistent or graphdl read it wrong")
        self.graph.output(value)

    def _name(self, name: str) -> str:
        name = _sanitise(name, self.taken)
        self.taken.add(name)
        return name

    # -- nodes -----------------------------------------------------------------------

    def _node(self, k: int, node: Any) -> None:
        label = f"{k} ({node.name!r})" if node.name else str(k)
        where = f"ONNX node {label}, a {node.op_type} (opset {self.opset})"
        row, known = self._row(node, label)
        attrs = self._attrs(node, known, where)
        if len(node.output) != 1 or not node.output[0]:
            raise self._error(f"{where} has {len(node.output)} outputs; graphdl imports nodes with one")
        self.env[node.output[0]] = self._build(k, node, row, attrs, where)

    def _row(self, node: Any, label: str) -> tuple[ImportRow, frozenset[str]]:
        """The node's import row and the attributes it reads, if graphdl imports its op."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in IMPORT:
            op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise self._error(f"ONNX node {label} is a {op} (opset {self.opset}), which graphdl cannot import; "
                              f"it imports {', '.join(sorted(IMPORT))}")
        return IMPORT[node.op_type]

    def _attrs(self, node: Any, known: frozenset[str], where: str) -> dict[str, Any]:
        """The node's attributes by name, each one its row reads, each readable."""
        attrs = {}
        for a in node.attribute:
            if a.name not in known:
                raise self._error(f"{where}: attribute {a.name!r} is not supported")
            try:
                attrs[a.name] = self.onnx.helper.get_attribute_value(a)
            except Exception as e:  # an attribute whose type field is missing or wrong
                raise self._error(f"{where}: attribute {a.name!r} cannot be read ({e})") from None
        return attrs

    def _build(self, k: int, node: Any, row: ImportRow, attrs: dict[str, Any], where: str) -> Value | Static:
        """The node's graphdl IR, by its row, each graphdl node created noting the ONNX node it is from."""
        first = len(self.graph.nodes)
        try:
            with self.graph.scope(f"{k}:{node.op_type}"):
                result = row(NodeReader(self, node, attrs))
        except GraphError as e:
            raise self._error(f"{where}: {e}") from None
        for n in self.graph.nodes[first:]:
            n.where = f"{self.path.name}: {where}"
        return result

    def _default_opset(self) -> int:
        versions = [o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        try:
            return read_int(versions[0] if versions else None, "the default opset's version", 1, 10_000)
        except GraphError:
            raise self._error("it imports no valid version of the default ONNX opset; the file is corrupt") from None

    def _error(self, message: str) -> GraphError:
        return GraphError(f"{self.path}: {message}")


# How each ONNX tensor type graphdl reads is stored: (dtype, numpy layout of the raw
# bytes, the typed field that holds the values when there are no raw bytes).
_LAYOUTS = {1: (torch.float32, "<f4", "float_data"), 11: (torch.float64, "<f8", "double_data"),
            10: (torch.float16, "<f2", "int32_data"), 16: (torch.bfloat16, "<u2", "int32_data"),
            INT64: (torch.int64, "<i8", "int64_data")}


def _check_self_contained(proto: Any, what: str) -> None:
    """The tensor's data is in the file, whole."""
    if proto.data_location == 1 or len(proto.external_data):  # TensorProto.EXTERNAL
        raise GraphError(f"{what} keeps its data in an external file; graphdl reads self-contained models: "
                         "re-save it with onnx.save_model(model, path, save_as_external_data=False)")
    if proto.HasField("segment"):
        raise GraphError(f"{what} is a segment of a tensor, which graphdl does not read")


def _tensor_dims(proto: Any, what: str) -> list[int]:
    """The tensor's dims, each a size (int64 in the file, so only its sign can be wrong); their
    product is checked against the data the tensor holds, before anything is allocated."""
    dims = list(proto.dims)
    try:
        for axis, d in enumerate(dims):
            read_int(d, f"{what}: dim {axis}")
    except GraphError:
        raise GraphError(f"{what} has negative dims {dims}; the file is corrupt") from None
    return dims


def _raw_array(proto: Any, what: str, dims: list[int], numel: int, layout: str) -> Any:
    """The tensor's raw bytes as a numpy array, after checking they are as many as its dims say."""
    import numpy as np

    itemsize = np.dtype(layout).itemsize
    if len(proto.raw_data) != numel * itemsize:
        raise GraphError(f"{what} declares dims {dims} ({numel} x {itemsize} bytes) but holds "
                         f"{len(proto.raw_data)} bytes; the file is corrupt")
    return np.frombuffer(proto.raw_data, dtype=layout)


def _field_array(proto: Any, what: str, dims: list[int], numel: int, layout: str, field: str) -> Any:
    """The tensor's typed values as a numpy array, after checking they are as many as its dims say."""
    import numpy as np

    values = getattr(proto, field)
    if len(values) != numel:
        raise GraphError(f"{what} declares dims {dims} ({numel} values) but holds {len(values)}; "
                         "the file is corrupt")
    if field != "int32_data":
        return np.asarray(values, dtype=layout)
    bits = np.asarray(values, dtype=np.int64)  # 16-bit floats are stored as their bits, one per int32
    if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
        raise GraphError(f"{what} holds 16-bit values outside 0..65535; the file is corrupt")
    return bits.astype("<u2").view(layout)


def _as_tensor(array: Any, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
    """A tensor of `dims` owning a native-order copy of `array`."""
    import numpy as np

    array = array.astype(array.dtype.newbyteorder("="))  # a native-order copy, owned by the tensor
    if dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).reshape(dims)
    return torch.from_numpy(array).reshape(dims)


def _sanitise(name: str, taken: set[str]) -> str:
    """An ONNX name as a graphdl name (letters, digits, '_' in dotted parts), unique in `taken`."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "_.") else "_" for c in name)
    clean = ".".join(part or "_" for part in clean.split(".")) or "_"
    if not is_identifier(clean):
        clean = "_"
    unique, i = clean, 1
    while unique in taken:
        unique, i = f"{clean}_{i}", i + 1
    return unique


def _type_name(onnx: Any, elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"#{elem_type} (unknown)"
