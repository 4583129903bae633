"""ONNX import's table, `IMPORT`: each ONNX op the graphdl IR it becomes, built with the
same functional ops users call, read through a `NodeReader` (graphdl.onnx_import reads
the file and walks its nodes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import ops
from .checks import GraphError, format_shape
from .ir import Value

if TYPE_CHECKING:
    from .onnx_import import Importer


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
