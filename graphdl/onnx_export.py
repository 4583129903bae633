"""ONNX export: `export_onnx(model_or_graph, path)`, through one table, `EXPORT`.

`EXPORT` gives each graphdl op the ONNX nodes that compute it (every op in `OPS`, the
adjoints and fused ops included, so a gradient graph or a compiled graph exports too),
in the spirit of the op registry. The symbolic batch dim "N" is a `dim_param` in the
file, so one file serves every batch size. (graphdl.onnx_io is the front door of both
directions; graphdl.onnx_import reads files back.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .checks import GraphError, dtype_name, shown, whole
from .files import as_path, atomic_write
from .ir import Graph, Value
from .onnx_format import DEFAULT_OPSET, ELEM_TYPE, INT64, MAX_FILE_BYTES, MIN_OPSET, require_onnx
from .text import format_node


class Emitter:
    """Appends the ONNX nodes for one graphdl node at a time, naming each value after the
    text IR (`%3`, its helpers `%3.1`, ...) and noting the IR line in each node's doc."""

    def __init__(self, onnx: Any, opset: int) -> None:
        self.helper = onnx.helper
        self.opset = opset
        self.nodes: list[Any] = []
        self.result = ""
        self._doc = ""
        self._count = 0

    def start(self, result: str, doc: str) -> None:
        self.result, self._doc, self._count = result, doc, 0

    def __call__(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{self.result}.{self._count}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out, doc_string=self._doc,
                                                **attrs))
        return out

    def finish(self, name: str) -> None:
        """Make `name`, what the row computed, carry the graphdl value's own name."""
        last = self.nodes[-1] if self.nodes else None
        if last is not None and last.output[0] == name and name.startswith(self.result + "."):
            last.output[0] = last.name = self.result
        else:
            self("Identity", name)
            self.nodes[-1].output[0] = self.nodes[-1].name = self.result

    def pair(self, op_type: str, *inputs: str, **attrs: Any) -> tuple[str, str]:
        """A node of two outputs (MaxPool's values and indices): their names."""
        self._count += 1
        out = f"{self.result}.{self._count}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out, f"{out}i"], name=out,
                                                doc_string=self._doc, **attrs))
        return out, f"{out}i"

    def int64(self, value: int) -> str:
        return self("Constant", value=self.helper.make_tensor("", INT64, [], [value]))

    def scalar(self, value: float, dtype: torch.dtype) -> str:
        tensor = self.helper.make_tensor("", ELEM_TYPE[dtype_name(dtype)], [], [value])
        return self("Constant", value=tensor)

    def ints(self, values: Sequence[int]) -> str:
        return self("Constant", value=self.helper.make_tensor("", INT64, [len(values)], list(values)))

    def reduce(self, op_type: str, x: str, ndim: int, axes: Sequence[int] | None, keepdims: bool) -> str:
        """ReduceSum/ReduceMean over `axes` (None: all), in the form the opset wants."""
        if ndim == 0:
            return self("Identity", x)
        axes = list(range(ndim)) if axes is None else list(axes)
        if self.opset >= (13 if op_type == "ReduceSum" else 18):  # axes became an input then
            return self(op_type, x, self.ints(axes), keepdims=int(keepdims))
        return self(op_type, x, axes=axes, keepdims=int(keepdims))

    def count(self, ref: str, value: Value, axes: Sequence[int], dtype: torch.dtype | None = None) -> str:
        """The number of elements of `value` over `axes`, in `dtype` (by default the value's;
        symbolic dims read at run time)."""
        dtype = value.dtype if dtype is None else dtype
        static = math.prod(d for i, d in enumerate(value.shape) if i in axes and isinstance(d, int))
        dynamic = [i for i in axes if isinstance(value.shape[i], str)]
        if not dynamic:
            return self.scalar(float(static), dtype)
        dims = self("Gather", self("Shape", ref), self.ints(dynamic))
        n = self("ReduceProd", self("Cast", dims, to=ELEM_TYPE[dtype_name(dtype)]), keepdims=0)
        return n if static == 1 else self("Mul", n, self.scalar(float(static), dtype))


ExportRow = Callable[[Emitter, list[str], Any], str]  # (emit, input names, graphdl node) -> result name


def _same(op_type: str) -> ExportRow:
    """An op that is one ONNX op of the same inputs."""
    return lambda e, a, n: e(op_type, *a)


def _broadcast_like(e: Emitter, a: list[str], n: Any) -> str:
    g, ref = n.inputs
    axes = tuple(range(ref.ndim)) if n.attrs["axis"] is None else n.attrs["axis"]
    src = a[0]
    if n.attrs["axis"] is not None and g.ndim and g.ndim + len(axes) == ref.ndim:
        src = e("Unsqueeze", src, e.ints(axes))
    if n.attrs["mean"]:
        src = e("Div", src, e.count(a[1], ref, axes))
    return e("Expand", src, e("Shape", a[1]))


def _sum_to(e: Emitter, a: list[str], n: Any) -> str:
    (x,), shape = n.inputs, n.attrs["shape"]
    lead = x.ndim - len(shape)
    kept = [lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1]
    src = a[0]
    if kept:
        src = e.reduce("ReduceSum", src, x.ndim, kept, keepdims=True)
    if lead:
        src = e.reduce("ReduceSum", src, x.ndim, range(lead), keepdims=False)
    return src


def _loss(elementwise: Callable[[Emitter, str], str]) -> ExportRow:
    """mean(f(a - b)) over every element, as the loss ops compute it."""
    def row(e: Emitter, a: list[str], n: Any) -> str:
        return e.reduce("ReduceMean", elementwise(e, e("Sub", *a)), n.inputs[0].ndim, None, keepdims=False)
    return row


def _mse_backward(e: Emitter, a: list[str], n: Any) -> str:
    g, x, y = a
    scaled = e("Mul", e("Mul", e("Sub", x, y), g), e.scalar(2.0, n.out.dtype))
    return e("Div", scaled, e.count(x, n.inputs[1], range(n.inputs[1].ndim)))


def _one_minus(e: Emitter, y: str, dtype: torch.dtype) -> str:
    return e("Sub", e.scalar(1.0, dtype), y)


def _bce_with_logits(e: Emitter, a: list[str], n: Any) -> str:
    # softplus(x) - x*y, with softplus(x) = max(x, 0) + log(1 + e**-|x|): finite for logits of any size.
    x, y = a
    softplus = e("Add", e("Relu", x), e("Log", e("Add", e.scalar(1.0, n.out.dtype), e("Exp", e("Neg", e("Abs", x))))))
    return e.reduce("ReduceMean", e("Sub", softplus, e("Mul", x, y)), n.inputs[0].ndim, None, keepdims=False)


def _cross_entropy(e: Emitter, a: list[str], n: Any) -> str:
    x, y = a  # -mean over rows of sum(y * log_softmax(x)), x and y [N, C]
    per_row = e.reduce("ReduceSum", e("Mul", y, e("LogSoftmax", x, axis=-1)), 2, [1], keepdims=False)
    return e("Neg", e.reduce("ReduceMean", per_row, 1, None, keepdims=False))


# -- beyond two dims: shapes, indexing, activations -------------------------------------------


def _sizes(e: Emitter, ref: str, ref_value: Value, shape: Sequence[int | str]) -> str:
    """An int64 shape tensor for `shape`, whose symbolic dims are those of `ref_value`
    (named `ref`), read from its Shape at run time: -1 for the one symbol where that is
    exact, else the dims gathered."""
    symbols = [d for d in shape if isinstance(d, str)]
    static = math.prod(d for d in shape if isinstance(d, int))
    if len(symbols) <= 1 and static > 0:
        return e.ints([-1 if isinstance(d, str) else d for d in shape])
    dims = e("Shape", ref)
    parts = [e("Gather", dims, e.ints([ref_value.shape.index(d)])) if isinstance(d, str) else e.ints([d])
             for d in shape]
    return e("Concat", *parts, axis=0) if len(parts) > 1 else parts[0]


def _reshape_to(e: Emitter, x: str, x_value: Value, shape: Sequence[int | str]) -> str:
    if 0 in shape:  # Reshape reads a 0 as "copy the input's dim" unless allowzero (opset 14)
        if e.opset < 14:
            raise GraphError(f"export_onnx: reshaping to {list(shape)}, with a 0 dim, needs opset 14 or later")
        return e("Reshape", x, _sizes(e, x, x_value, shape), allowzero=1)
    return e("Reshape", x, _sizes(e, x, x_value, shape))


def _slice(e: Emitter, a: list[str], n: Any) -> str:
    at = n.attrs
    return e("Slice", a[0], e.ints([at["start"]]), e.ints([at["stop"]]), e.ints([at["axis"]]), e.ints([at["step"]]))


def _pad(e: Emitter, x: str, ndim: int, axis: int, before: int, after: int, dtype: torch.dtype) -> str:
    pads = [0] * (2 * ndim)
    pads[axis], pads[ndim + axis] = before, after
    return e("Pad", x, e.ints(pads), e.scalar(0.0, dtype))


def _unslice(e: Emitter, a: list[str], n: Any) -> str:
    """g put back along the axis: spread out by `step` (each element then step - 1 zeros),
    padded to `start` before and to `size` after."""
    (g,), at = n.inputs, n.attrs
    axis, step, size, length = at["axis"], at["step"], at["size"], g.shape[at["axis"]]
    src, span = a[0], length
    if step > 1 and length:
        spread = _pad(e, e("Unsqueeze", src, e.ints([axis + 1])), g.ndim + 1, axis + 1, 0, step - 1, g.dtype)
        span = length * step
        src = _reshape_to(e, spread, g, [*g.shape[:axis], span, *g.shape[axis + 1:]])
    after = size - at["start"] - span
    src = _pad(e, src, g.ndim, axis, at["start"], max(after, 0), g.dtype)
    return e("Slice", src, e.ints([0]), e.ints([size]), e.ints([axis])) if after < 0 else src


def _index_add(e: Emitter, a: list[str], n: Any) -> str:
    """ScatterElements adding src at the indices, each index spread over src's other dims."""
    x, index, src = n.inputs
    axis = n.attrs["axis"]
    if e.opset < 16:
        raise GraphError("export_onnx: index_add is a ScatterElements with reduction='add', which needs opset 16 "
                         "or later")
    values = a[2] if index.ndim == 1 else e("Reshape", a[2], _flat_sizes(e, a[0], x, axis, a[1]))
    along = e("Reshape", a[1], e.ints([-1 if i == axis else 1 for i in range(x.ndim)]))
    indices = e("Expand", along, e("Shape", values))
    return e("ScatterElements", a[0], indices, values, axis=axis, reduction="add")


def _flat_sizes(e: Emitter, x: str, x_value: Value, axis: int, index: str) -> str:
    """x's shape with the axis dim replaced by the number of indices."""
    count = e("Size", index)
    pieces = [*(e("Gather", e("Shape", x), e.ints([i])) if isinstance(d, str) else e.ints([d])
                for i, d in enumerate(x_value.shape[:axis])),
              e("Reshape", count, e.ints([1])),
              *(e("Gather", e("Shape", x), e.ints([axis + 1 + i])) if isinstance(d, str) else e.ints([d])
                for i, d in enumerate(x_value.shape[axis + 1:]))]
    return e("Concat", *pieces, axis=0)


_SQRT_HALF, _SQRT_2_OVER_PI, _INV_SQRT_2PI, _CUBIC = math.sqrt(0.5), math.sqrt(2 / math.pi), \
    1 / math.sqrt(2 * math.pi), 0.044715


def _erf(e: Emitter, x: str, dtype: torch.dtype) -> str:
    """Erf, computed in float32 for float64 and bfloat16, which onnxruntime (1.23) has no Erf
    for: an absolute error under 1e-7, within float64's tolerance for gelu."""
    if dtype in (torch.float32, torch.float16):
        return e("Erf", x)
    return e("Cast", e("Erf", e("Cast", x, to=ELEM_TYPE["f32"])), to=ELEM_TYPE[dtype_name(dtype)])


def _cdf_terms(e: Emitter, x: str, n: Any, approximate: str) -> tuple[str, str]:
    """(Phi(x), or its tanh form's 0.5 (1 + t); and the rest of gelu' beside it)."""
    dtype = n.out.dtype
    c = lambda v: e.scalar(v, dtype)  # noqa: E731
    if approximate == "none":
        phi = e("Mul", c(0.5), e("Add", c(1.0), _erf(e, e("Mul", x, c(_SQRT_HALF)), dtype)))
        density = e("Mul", c(_INV_SQRT_2PI), e("Exp", e("Mul", c(-0.5), e("Mul", x, x))))
        return phi, e("Mul", x, density)
    x3 = e("Mul", e("Mul", x, x), x)
    t = e("Tanh", e("Mul", c(_SQRT_2_OVER_PI), e("Add", x, e("Mul", c(_CUBIC), x3))))
    half = e("Mul", c(0.5), e("Add", c(1.0), t))
    du = e("Mul", c(_SQRT_2_OVER_PI), e("Add", c(1.0), e("Mul", c(3 * _CUBIC), e("Mul", x, x))))
    rest = e("Mul", e("Mul", c(0.5), x), e("Mul", e("Sub", c(1.0), e("Mul", t, t)), du))
    return half, rest


def _gelu(e: Emitter, a: list[str], n: Any) -> str:
    if e.opset >= 20 and n.out.dtype in (torch.float32, torch.float16):  # the runtime's Gelu types
        return e("Gelu", a[0], approximate=n.attrs["approximate"])
    return e("Mul", a[0], _cdf_terms(e, a[0], n, n.attrs["approximate"])[0])


def _gelu_backward(e: Emitter, a: list[str], n: Any) -> str:
    phi, rest = _cdf_terms(e, a[1], n, n.attrs["approximate"])
    return e("Mul", a[0], e("Add", phi, rest))


def _collective(e: Emitter, a: list[str], n: Any) -> str:
    raise GraphError(f"export_onnx: {n.op.name} (created at {n.where}) sums a value over the ranks of a "
                     "data-parallel job, which ONNX has no op for; export the model, or the gradient graph "
                     "before graphdl.passes.allreduce put collectives into it")


EXPORT: dict[str, ExportRow] = {
    "const": lambda e, a, n: e.scalar(n.attrs["value"], n.out.dtype),
    "zeros_like": lambda e, a, n: e("Expand", e.scalar(0.0, n.out.dtype), e("Shape", a[0])),
    "add": _same("Add"), "sub": _same("Sub"), "mul": _same("Mul"), "div": _same("Div"),
    "neg": _same("Neg"), "exp": _same("Exp"), "log": _same("Log"), "abs": _same("Abs"), "sign": _same("Sign"),
    "greater": lambda e, a, n: e("Cast", e("Greater", *a), to=ELEM_TYPE[dtype_name(n.out.dtype)]),
    "relu": _same("Relu"), "tanh": _same("Tanh"), "sigmoid": _same("Sigmoid"),
    "matmul": _same("MatMul"),
    "transpose": lambda e, a, n: e("Transpose", a[0], perm=[*range(n.out.ndim - 2), n.out.ndim - 1, n.out.ndim - 2]),
    "sum": lambda e, a, n: e.reduce("ReduceSum", a[0], n.inputs[0].ndim, n.attrs["axis"], n.attrs["keepdims"]),
    "mean": lambda e, a, n: e.reduce("ReduceMean", a[0], n.inputs[0].ndim, n.attrs["axis"], n.attrs["keepdims"]),
    "broadcast_like": _broadcast_like,
    "sum_to": _sum_to,
    "mse": _loss(lambda e, d: e("Mul", d, d)),
    "mae": _loss(lambda e, d: e("Abs", d)),
    "mbe": _loss(lambda e, d: d),
    "softmax": lambda e, a, n: e("Softmax", a[0], axis=n.attrs.get("axis", -1)),
    "log_softmax": lambda e, a, n: e("LogSoftmax", a[0], axis=n.attrs.get("axis", -1)),
    "bce_with_logits": _bce_with_logits,
    "cross_entropy": _cross_entropy,
    "reshape": lambda e, a, n: _reshape_to(e, a[0], n.inputs[0], n.attrs["shape"]),
    "flatten": lambda e, a, n: _reshape_to(e, a[0], n.inputs[0], n.out.shape),
    "permute": lambda e, a, n: e("Transpose", a[0], perm=list(n.attrs["dims"])),
    "concat": lambda e, a, n: e("Concat", *a, axis=n.attrs["axis"]),
    "slice": _slice,
    "unslice": _unslice,
    "index_select": lambda e, a, n: e("Gather", *a, axis=n.attrs["axis"]),
    "index_add": _index_add,
    "gelu": _gelu,
    "gelu_backward": _gelu_backward,
    "leaky_relu": lambda e, a, n: e("LeakyRelu", a[0], alpha=n.attrs["negative_slope"]),
    "silu": lambda e, a, n: e("Mul", a[0], e("Sigmoid", a[0])),
    # Fused ops, so that a compiled (optimised) graph exports as well.
    "addmm": lambda e, a, n: e("Gemm", a[1], a[2], a[0]),
    "addmm_tanh": lambda e, a, n: e("Tanh", e("Gemm", a[1], a[2], a[0])),
    "matmul_tn": lambda e, a, n: e("Gemm", *a, transA=1),
    "matmul_nt": lambda e, a, n: e("Gemm", *a, transB=1),
    "relu_backward": lambda e, a, n: e("Where", e("Greater", a[1], e.scalar(0.0, n.out.dtype)), a[0],
                                       e.scalar(0.0, n.out.dtype)),
    "tanh_backward": lambda e, a, n: e("Mul", a[0], _one_minus(e, e("Mul", a[1], a[1]), n.out.dtype)),
    "sigmoid_backward": lambda e, a, n: e("Mul", a[0], e("Mul", a[1], _one_minus(e, a[1], n.out.dtype))),
    "mse_backward": _mse_backward,
    # Collectives (graphdl.distributed): refused, saying why.
    "allreduce_start": _collective, "allreduce_wait": _collective, "unpack": _collective,
}


# -- convolution, pooling, normalisation, dropout (graphdl.ops.conv, .normalization, .random) --


def _spread(value: int | tuple[int, ...], d: int) -> list[int]:
    return [value] * d if isinstance(value, int) else list(value)


def _conv_attrs(n: Any, w: Value) -> dict[str, Any]:
    d = w.ndim - 2
    a = n.attrs
    return {"kernel_shape": list(w.shape[2:]), "strides": _spread(a["stride"], d),
            "pads": _spread(a["padding"], d) * 2, "dilations": _spread(a["dilation"], d), "group": a["groups"]}


def _conv(e: Emitter, a: list[str], n: Any) -> str:
    return e("Conv", *a, **_conv_attrs(n, n.inputs[1]))


def _output_padding(x: Value, g: Value, kernel: Sequence[int], attrs: dict[str, Any]) -> list[int]:
    """What ConvTranspose must add at the end of each spatial dim to give x's size: the
    elements a strided window never reached."""
    return [size - ((out - 1) * s - 2 * p + dl * (k - 1) + 1)
            for size, out, k, s, p, dl in zip(x.shape[2:], g.shape[2:], kernel, attrs["strides"], attrs["pads"],
                                              attrs["dilations"])]


def _conv_backward_input(e: Emitter, a: list[str], n: Any) -> str:
    g, x, w = n.inputs
    attrs = _conv_attrs(n, w)
    return e("ConvTranspose", a[0], a[2], output_padding=_output_padding(x, g, w.shape[2:], attrs), **attrs)


def _conv_backward_weight(e: Emitter, a: list[str], n: Any) -> str:
    # gw[o, i, k] = sum over n, l of g[n, o, l] * x_padded[n, i, l*stride + k*dilation]: a
    # convolution of x's channels (as a batch) with g's (as kernels), over the batch as
    # channels, its stride the dilation and its dilation the stride; one per group.
    g, x, w = n.inputs
    d = w.ndim - 2
    attrs = _conv_attrs(n, w)
    groups, swap = attrs["group"], [1, 0, *range(2, d + 2)]
    xt, gt = e("Transpose", a[1], perm=swap), e("Transpose", a[0], perm=swap)
    per_in, per_out = x.shape[1] // groups, w.shape[0] // groups
    parts = []
    for k in range(groups):
        xs = e("Slice", xt, e.ints([k * per_in]), e.ints([(k + 1) * per_in]), e.ints([0])) if groups > 1 else xt
        gs = e("Slice", gt, e.ints([k * per_out]), e.ints([(k + 1) * per_out]), e.ints([0])) if groups > 1 else gt
        full = e("Conv", xs, gs, strides=attrs["dilations"], dilations=attrs["strides"], pads=attrs["pads"],
                 kernel_shape=list(g.shape[2:]))
        parts.append(e("Transpose", full, perm=swap))
    both = e("Concat", *parts, axis=0) if groups > 1 else parts[0]
    return e("Slice", both, e.ints([0] * d), e.ints(list(w.shape[2:])), e.ints(list(range(2, d + 2))))


def _pool_attrs(n: Any) -> dict[str, Any]:
    a = n.attrs
    kernel = _spread(a["kernel_size"], 2)
    return {"kernel_shape": kernel, "strides": kernel if a["stride"] is None else _spread(a["stride"], 2),
            "pads": _spread(a["padding"], 2) * 2}


def _flat(e: Emitter, x: str) -> str:
    return e("Reshape", x, e.ints([-1]))


def _needs_opset(e: Emitter, n: Any, opset: int, what: str) -> None:
    if e.opset < opset:
        raise GraphError(f"export_onnx: {n.op.name} (created at {n.where}) needs {what}, from ONNX opset {opset}; "
                         f"export with opset={opset} or later")


def _max_pool_backward(e: Emitter, a: list[str], n: Any) -> str:
    # MaxPool's indices count over the whole [N, C, H, W] tensor: g is added in at them.
    _needs_opset(e, n, 16, "ScatterElements' reduction='add'")
    _, indices = e.pair("MaxPool", a[1], **_pool_attrs(n))
    zeros = _flat(e, e("Expand", e.scalar(0.0, n.out.dtype), e("Shape", a[1])))
    summed = e("ScatterElements", zeros, _flat(e, indices), _flat(e, a[0]), axis=0, reduction="add")
    return e("Reshape", summed, e("Shape", a[1]))


def _max_pool_select(e: Emitter, a: list[str], n: Any) -> str:
    _, indices = e.pair("MaxPool", a[1], **_pool_attrs(n))
    return e("Gather", _flat(e, a[0]), indices, axis=0)


def _avg_pool(e: Emitter, a: list[str], n: Any) -> str:
    return e("AveragePool", a[0], count_include_pad=int(n.attrs["count_include_pad"]), **_pool_attrs(n))


def _avg_pool_backward(e: Emitter, a: list[str], n: Any) -> str:
    # Each window's share of g (divided by what the pool divided by), spread over the
    # window by a transposed convolution of every plane with a kernel of ones.
    g, x = n.inputs
    attrs = _pool_attrs(n)
    kernel = attrs["kernel_shape"]
    if n.attrs["count_include_pad"]:
        divisor = e.scalar(float(math.prod(kernel)), n.out.dtype)
    else:  # how many real elements each window holds
        ones = e("Expand", e.scalar(1.0, n.out.dtype), e("Shape", a[1]))
        divisor = e("Mul", e("AveragePool", ones, count_include_pad=1, **attrs),
                    e.scalar(float(math.prod(kernel)), n.out.dtype))
    planes = e("Reshape", e("Div", a[0], divisor), e.ints([-1, 1, *g.shape[2:]]))
    ones_kernel = e("Expand", e.scalar(1.0, n.out.dtype), e.ints([1, 1, *kernel]))
    conv = {"strides": attrs["strides"], "pads": attrs["pads"], "dilations": [1, 1]}
    spread = e("ConvTranspose", planes, ones_kernel, kernel_shape=kernel,
               output_padding=_output_padding(x, g, kernel, conv), **conv)
    return e("Reshape", spread, e("Shape", a[1]))


def _var(e: Emitter, a: list[str], n: Any) -> str:
    # The divisor n - correction clamped at 0, as torch.var's (inf or nan below); for a half
    # dtype the deviations squared, summed and counted in float32, as the kernel does.
    (x,) = n.inputs
    axes = tuple(range(x.ndim)) if n.attrs["axis"] is None else n.attrs["axis"]
    centred = e("Sub", a[0], e.reduce("ReduceMean", a[0], x.ndim, axes, keepdims=True))
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if wide != x.dtype:  # squared and summed in float32, as the kernel does
        centred = e("Cast", centred, to=ELEM_TYPE["f32"])
    squares = e.reduce("ReduceSum", e("Mul", centred, centred), x.ndim, axes, n.attrs["keepdims"])
    divisor = e("Max", e("Sub", e.count(a[0], x, axes, wide), e.scalar(float(n.attrs["correction"]), wide)),
                e.scalar(0.0, wide))
    quotient = e("Div", squares, divisor)
    return quotient if wide == x.dtype else e("Cast", quotient, to=ELEM_TYPE[dtype_name(x.dtype)])


def _correct_var(e: Emitter, a: list[str], n: Any) -> str:
    # The factor n / (n - correction) in float64, then in v's dtype (v * n would overflow
    # float16), inf where n <= correction (a divisor clamped at 0, as torch.var's).
    x, correction = n.inputs[1], n.attrs["correction"]
    axes = tuple(range(x.ndim)) if n.attrs["axis"] is None else n.attrs["axis"]
    count = e.count(a[1], x, axes, torch.float64)
    divisor = e("Max", e("Sub", count, e.scalar(float(correction), torch.float64)), e.scalar(0.0, torch.float64))
    return e("Mul", a[0], e("Cast", e("Div", count, divisor), to=ELEM_TYPE[dtype_name(x.dtype)]))


def _batch_norm_backward(e: Emitter, a: list[str], n: Any) -> str:
    # w r (g - mean(g)) - w r d r r mean(g d), d = x - mean, means over the channel axes
    g, x, mean, var_, weight = n.inputs
    axes = (0, *range(2, x.ndim))
    shape = e.ints([1, -1] + [1] * (x.ndim - 2))

    def channel(v: str) -> str:
        return e("Reshape", v, shape)

    def average(v: str) -> str:
        return e.reduce("ReduceMean", v, x.ndim, axes, keepdims=True)
    rate = e("Reciprocal", e("Sqrt", e("Add", a[3], e.scalar(n.attrs["eps"], x.dtype))))
    scale = channel(e("Mul", a[4], rate))
    d = e("Sub", a[1], channel(a[2]))
    direct = e("Mul", scale, e("Sub", a[0], average(a[0])))
    # r into mean(g d) one factor at a time, as the kernel's VJP: a half dtype's r^3 overflows
    # for a constant channel, where mean(g d) is 0
    spread = e("Mul", channel(rate), e("Mul", channel(rate), average(e("Mul", a[0], d))))
    return e("Sub", direct, e("Mul", e("Mul", scale, d), spread))


def _layer_norm(e: Emitter, a: list[str], n: Any) -> str:
    x, w, _ = n.inputs
    eps = n.attrs["eps"]
    if e.opset >= 17:
        return e("LayerNormalization", *a, axis=-w.ndim, epsilon=eps)
    axes = tuple(range(x.ndim - w.ndim, x.ndim))
    centred = e("Sub", a[0], e.reduce("ReduceMean", a[0], x.ndim, axes, keepdims=True))
    variance = e.reduce("ReduceMean", e("Mul", centred, centred), x.ndim, axes, keepdims=True)
    std = e("Sqrt", e("Add", variance, e.scalar(eps, x.dtype)))
    return e("Add", e("Mul", e("Div", centred, std), a[1]), a[2])


def _dropout_mask(e: Emitter, a: list[str], n: Any) -> str:
    """graphdl.ops.random's splitmix64 hash, bit for bit: int64 arithmetic that wraps, and
    logical right shifts as unsigned shifts."""
    from .ops.random import _GOLDEN, _MIX1, _MIX2, _int64, keep_threshold
    _needs_opset(e, n, 18, "the bitwise ops its hash is made of")
    uint64, int64 = 13, INT64

    def shifted(z: str, bits: int) -> str:
        unsigned = e("Cast", z, to=uint64)
        amount = e("Constant", value=e.helper.make_tensor("", uint64, [], [bits]))
        return e("Cast", e("BitShift", unsigned, amount, direction="RIGHT"), to=int64)

    def mix(z: str) -> str:
        z = e("Mul", e("BitwiseXor", z, shifted(z, 30)), e.int64(_MIX1))
        z = e("Mul", e("BitwiseXor", z, shifted(z, 27)), e.int64(_MIX2))
        return e("BitwiseXor", z, shifted(z, 31))

    p, seed = n.attrs["p"], n.attrs["seed"]
    stream = mix(e("Add", e("Mul", e("Cast", a[0], to=int64), e.int64(_GOLDEN)), e.int64(_int64(seed % 2**64))))
    count = e("ReduceProd", e("Shape", a[1]), keepdims=0)
    places = e("Range", e.int64(1), e("Add", count, e.int64(1)), e.int64(1))
    bits = e("BitwiseAnd", mix(e("Add", e("Mul", places, e.int64(_GOLDEN)), stream)), e.int64((1 << 24) - 1))
    kept = e("Cast", e("GreaterOrEqual", bits, e.int64(keep_threshold(p))), to=ELEM_TYPE[dtype_name(n.out.dtype)])
    scaled = e("Mul", kept, e.scalar(0.0 if p == 1 else 1.0 / (1.0 - p), n.out.dtype))
    return e("Reshape", scaled, e("Shape", a[1]))


EXPORT.update({
    "conv1d": _conv, "conv2d": _conv,
    "conv_backward_input": _conv_backward_input, "conv_backward_weight": _conv_backward_weight,
    "max_pool2d": lambda e, a, n: e("MaxPool", a[0], **_pool_attrs(n)),
    "max_pool2d_backward": _max_pool_backward, "max_pool2d_select": _max_pool_select,
    "avg_pool2d": _avg_pool, "avg_pool2d_backward": _avg_pool_backward,
    "rsqrt": lambda e, a, n: e("Reciprocal", e("Sqrt", a[0])),
    "var": _var, "correct_var": _correct_var,
    "batch_norm": lambda e, a, n: e("BatchNormalization", a[0], a[3], a[4], a[1], a[2], epsilon=n.attrs["eps"]),
    "batch_norm_backward": _batch_norm_backward,
    "layer_norm": _layer_norm,
    "dropout_mask": _dropout_mask,
})


def export_onnx(model: Any, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> None:
    """Write a model's forward graph, or any graph, as an ONNX model.

    Args:
        model: a `gd.Sequential` (its forward graph: input "x", output the prediction)
            or a `gd.Graph` (a loss graph, a gradient graph from `gd.grad`, a compiled
            graph: every op graphdl has is mapped).
        path: the `.onnx` file to write; replaced atomically if it exists.
        opset: the ONNX opset to write, from 13 up to what the installed onnx knows.

    The graph's inputs keep their names and the symbolic batch dim stays symbolic
    (`dim_param` "N"); params become initializers under their own names; the outputs are
    named "output" (or "output0", "output1", ...).

    Raises:
        GraphError: an op has no ONNX mapping (named with its node), or the weights are
            too big for one ONNX file.
        ValueError: a bad `opset`.
        ImportError: the onnx package is missing.
    """
    onnx = require_onnx()
    opset = _checked_opset(onnx, opset)
    graph = _graph_of(model)
    path = as_path(path)
    graph.verify()
    if not graph.outputs:
        raise GraphError(f"export_onnx: graph {graph.name} has no outputs, so the ONNX model would compute "
                         "nothing; add them with graph.output(...)")
    proto = _to_proto(onnx, graph, opset)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # a wrong row in EXPORT, not a user error
        raise GraphError(f"export_onnx: the ONNX model built from graph {graph.name} is invalid ({e}); "
                         "this is a bug in graphdl's ONNX table") from None
    atomic_write(path, proto.SerializeToString())


def _checked_opset(onnx: Any, opset: Any) -> int:
    """`opset` as an int, if the installed onnx knows it and it is one graphdl writes."""
    newest = onnx.defs.onnx_opset_version()
    try:
        return whole("opset", opset, MIN_OPSET, newest)
    except ValueError:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {newest} (what the installed onnx knows), "
                         f"got {shown(opset)}") from None


def _graph_of(model: Any) -> Graph:
    """The graph to export: a model's forward graph, or a graph itself."""
    if not isinstance(model, Graph) and hasattr(model, "graph"):  # a model (graphdl.model imports this module)
        return model.graph()
    if isinstance(model, Graph):
        return model
    raise GraphError(f"export_onnx takes a gd.Sequential or gd.Graph, got {type(model).__name__}")


def _to_proto(onnx: Any, graph: Graph, opset: int) -> Any:
    helper = onnx.helper
    _check_size(graph)
    names = {id(v): v.name for v in (*graph.inputs.values(), *graph.params.values())}
    emit = Emitter(onnx, opset)
    _emit_nodes(emit, graph, names)
    outputs = _emit_outputs(emit, graph, names)
    body = helper.make_graph(emit.nodes, graph.name, [_value_info(helper, v.name, v) for v in graph.inputs.values()],
                             outputs, [_initializer(helper, v.name, v.data) for v in graph.params.values()])
    opsets = [helper.make_opsetid("", opset)]
    # The lowest IR version the opset allows, so that older runtimes load the file too.
    return helper.make_model(body, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                             producer_name="graphdl")


def _check_size(graph: Graph) -> None:
    size = sum(v.data.numel() * v.data.element_size() for v in graph.params.values())
    if size > MAX_FILE_BYTES - 2**20:
        raise GraphError(f"export_onnx: graph {graph.name}'s weights take {size} bytes; one ONNX file holds "
                         "under 2 GiB (ONNX's external-data format is not written by graphdl)")


def _emit_nodes(emit: Emitter, graph: Graph, names: dict[int, str]) -> None:
    """Each node's ONNX nodes, by its row of EXPORT; `names` gets each node's value's name (%k)."""
    for k, node in enumerate(graph.nodes):
        names[id(node.out)] = f"%{k}"
        row = EXPORT.get(node.op.name)
        if row is None:
            raise GraphError(f"export_onnx: node %{k} ({node.op.name}) has no ONNX mapping: "
                             f"`{format_node(node, names)}`, created at {node.where}\n"
                             f"  hint: add a row for {node.op.name!r} to graphdl.onnx_io.EXPORT")
        emit.start(names[id(node.out)], format_node(node, names))
        emit.finish(row(emit, [names[id(v)] for v in node.inputs], node))


def _emit_outputs(emit: Emitter, graph: Graph, names: dict[int, str]) -> list[Any]:
    """The graph's outputs as ONNX outputs named "output" (or "output0", ...; a name an input
    or param has gets a "_"), each an Identity of its value; returns their value infos."""
    taken = set(graph.inputs) | set(graph.params)
    outputs = []
    for i, v in enumerate(graph.outputs):
        name = "output" if len(graph.outputs) == 1 else f"output{i}"
        while name in taken:
            name += "_"
        taken.add(name)
        emit.start(name, f"output {i}")
        emit.finish(names[id(v)])
        outputs.append(_value_info(emit.helper, name, v))
    return outputs


def _value_info(helper: Any, name: str, v: Value) -> Any:
    return helper.make_tensor_value_info(name, ELEM_TYPE[dtype_name(v.dtype)], list(v.shape))


def _initializer(helper: Any, name: str, data: torch.Tensor) -> Any:
    if data.is_meta:
        raise GraphError(f"export_onnx: param {name} is on the meta device, which holds shapes but no values to "
                         "write; load or train real weights (on 'cpu' or 'cuda') before exporting")
    t = data.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: write its bits
        t = t.view(torch.int16)
    array = t.numpy()
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()  # ONNX raw data is little-endian
    return helper.make_tensor(name, ELEM_TYPE[dtype_name(data.dtype)], list(data.shape), raw, raw=True)
