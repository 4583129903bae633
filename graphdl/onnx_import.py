"""ONNX import: `import_onnx(path)`, through one table, `IMPORT`.

`IMPORT` (graphdl.onnx_rows) gives each ONNX op the graphdl IR it becomes, built with
the same functional ops users call. Import reads the file's bytes and parses them itself (never
`onnx.load`, which would follow external-data paths), checks every tensor's declared
size against the bytes it holds before copying it, and turns anything it cannot read
into a `GraphError`. (graphdl.onnx_io is the front door of both directions;
graphdl.onnx_export writes files.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .checks import DTYPE_NAMES, DTYPES, GraphError, format_shape, read_int
from .files import as_path, read_bytes
from .ir import Graph, Value, is_identifier
from .onnx_format import ELEM_TYPE, INT64, MAX_FILE_BYTES, require_onnx
from .onnx_rows import IMPORT, ImportRow, NodeReader, Static


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
