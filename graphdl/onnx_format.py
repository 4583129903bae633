"""What ONNX export and import share: the opsets graphdl writes, the size of one file,
ONNX's numbers for the dtypes graphdl holds, and the onnx package itself, imported only
when an export or import runs (`pip install graphdl[onnx]`)."""

from __future__ import annotations

from typing import Any

DEFAULT_OPSET = 17
MIN_OPSET = 13  # from 13 on, ReduceSum and Unsqueeze take their axes as an input; older forms are import-only
MAX_FILE_BYTES = 2**31 - 1  # protobuf cannot parse a bigger message, so a bigger file is not one model
INSTALL_HINT = "install it with `pip install graphdl[onnx]`"

# ONNX's TensorProto.DataType numbers (fixed by the spec) for the dtypes graphdl holds.
INT64 = 7
ELEM_TYPE = {"f32": 1, "f16": 10, "f64": 11, "bf16": 16, "i64": INT64}  # i64: indices, as graph inputs


def require_onnx() -> Any:
    """The onnx package, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"ONNX export and import need the onnx package ({e}); {INSTALL_HINT}") from None
    return onnx
