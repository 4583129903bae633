"""ONNX export and import: `export_onnx(model_or_graph, path)` and `import_onnx(path)`.

Two tables, in the spirit of the op registry: `EXPORT` (graphdl.onnx_export) gives each
graphdl op the ONNX nodes that compute it (every op in `OPS`, the adjoints and fused ops
included, so a gradient graph or a compiled graph exports too), and `IMPORT`
(graphdl.onnx_rows, read by graphdl.onnx_import) gives each ONNX op the graphdl IR it becomes, built with the same
functional ops users call. The symbolic batch dim "N" is a `dim_param` in the file, so
one file serves every batch size. What both share (opsets, dtype numbers, the onnx
package) is in graphdl.onnx_format.

The onnx package is imported only when these functions run (`pip install graphdl[onnx]`).
Import reads the file's bytes and parses them itself (never `onnx.load`, which would
follow external-data paths), checks every tensor's declared size against the bytes it
holds before copying it, and turns anything it cannot read into a `GraphError`.
"""

from __future__ import annotations

from .onnx_export import EXPORT, export_onnx
from .onnx_format import DEFAULT_OPSET, ELEM_TYPE, INSTALL_HINT, INT64, MAX_FILE_BYTES, MIN_OPSET
from .onnx_import import IMPORT, import_onnx

__all__ = ["DEFAULT_OPSET", "ELEM_TYPE", "EXPORT", "IMPORT", "INSTALL_HINT", "INT64", "MAX_FILE_BYTES", "MIN_OPSET",
           "export_onnx", "import_onnx"]
