"""Linear algebra: the matrix product and the transpose."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from .registry import defop, same_dtype


def matmul_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    a, b = inputs
    dtype = same_dtype(inputs)
    if a.ndim != 2 or b.ndim != 2:
        raise ShapeError(
            f"{format_shape(a.shape)} @ {format_shape(b.shape)}: matmul takes two matrices (2-d)",
            "reshape the inputs to [rows, cols]",
        )
    if a.shape[1] != b.shape[0]:
        hint = ""
        if a.shape[1] == b.shape[1]:
            hint = f"did you mean to transpose {b.label}?"
        elif a.shape[0] == b.shape[0]:
            hint = f"did you mean to transpose {a.label}?"
        raise ShapeError(
            f"{format_shape(a.shape)} @ {format_shape(b.shape)}: inner dims differ ({a.shape[1]} vs {b.shape[0]})",
            hint,
        )
    return (a.shape[0], b.shape[1]), dtype


def transpose_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    (x,) = inputs
    if x.ndim < 2:
        raise ShapeError(f"transpose needs at least 2 dims, got {format_shape(x.shape)}")
    return (*x.shape[:-2], x.shape[-1], x.shape[-2]), x.dtype


matmul = defop("matmul", "torch.mm({0}, {1})", matmul_rule, arity=2, out=True,
               vjp=lambda g, out, a, b: [matmul(g, transpose(b)), matmul(transpose(a), g)],
               new_storage=True,
               doc="Matrix product of two 2-d values: [m,k] @ [k,n] -> [m,n].")

transpose = defop("transpose", "torch.transpose({0}, -2, -1)", transpose_rule,
                  lambda g, out, x: [transpose(g)], doc="Swap the last two dims.")
