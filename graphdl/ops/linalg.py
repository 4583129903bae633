"""Linear algebra: the matrix product (of matrices, or of batches of them) and the transpose."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from . import products  # noqa: F401 - the products' kernels, which the code calls
from .reductions import unbroadcast
from .registry import broadcast_shapes, defop, same_dtype


def matmul_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    """[m,k] @ [k,n] -> [m,n]; with more dims, the leading ones are batch dims that
    broadcast as torch.matmul's do: [N,L,k] @ [k,n] -> [N,L,n]."""
    a, b = inputs
    dtype = same_dtype(inputs)
    product = f"{format_shape(a.shape)} @ {format_shape(b.shape)}"
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(f"{product}: matmul takes matrices (2-d) or batches of them (more dims)",
                         "reshape the inputs to [rows, cols] (or [..., rows, cols])")
    if a.shape[-1] != b.shape[-2]:
        hint = ""
        if a.shape[-1] == b.shape[-1]:
            hint = f"did you mean to transpose {b.label}?"
        elif a.shape[-2] == b.shape[-2]:
            hint = f"did you mean to transpose {a.label}?"
        raise ShapeError(f"{product}: inner dims differ ({a.shape[-1]} vs {b.shape[-2]})", hint)
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if batch is None:
        raise ShapeError(f"{product}: the batch dims {format_shape(a.shape[:-2])} and {format_shape(b.shape[:-2])} "
                         "do not broadcast", "batch dims broadcast as in add: from the right, equal or 1")
    return (*batch, a.shape[-2], b.shape[-1]), dtype


def transpose_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    (x,) = inputs
    if x.ndim < 2:
        raise ShapeError(f"transpose needs at least 2 dims, got {format_shape(x.shape)}")
    return (*x.shape[:-2], x.shape[-1], x.shape[-2]), x.dtype


def _matmul_code(out: bool) -> Any:
    """graphdl.ops.products' mm for two matrices (the fast path fit's 2-d nets take:
    MKL's or oneDNN's kernel, by measurement), torch.matmul for batches."""
    def lower(args: list[str], attrs: dict, inputs: list[Value]) -> str:
        fn = "products.mm" if _matrices(inputs) else "torch.matmul"
        tail = f", out={attrs['out']}" if out else ""
        return f"{fn}({args[0]}, {args[1]}{tail})"
    return lower


def _matrices(inputs: Sequence[Value]) -> bool:
    return inputs[0].ndim == inputs[1].ndim == 2


def _matmul_vjp(g: Value, out: Value, a: Value, b: Value) -> list[Value]:
    # unbroadcast sums the batch dims a or b was broadcast along (none for matrices).
    return [unbroadcast(matmul(g, transpose(b)), a), unbroadcast(matmul(transpose(a), g), b)]


matmul = defop("matmul", _matmul_code(False), matmul_rule, _matmul_vjp, arity=2, out=_matmul_code(True),
               new_storage=True, chosen=lambda inputs: "mm" if _matrices(inputs) else None,
               doc="Matrix product: [m,k] @ [k,n] -> [m,n]; leading batch dims broadcast, as torch.matmul's.")

transpose = defop("transpose", "torch.transpose({0}, -2, -1)", transpose_rule,
                  lambda g, out, x: [transpose(g)], doc="Swap the last two dims.")
