"""Fused ops, one torch call where the primitives took several.

Nobody builds these by hand: graphdl.passes.fuse rewrites primitive patterns into them.
Each is an ordinary registered op (it prints, parses and draws) whose VJP is written
with the primitives, so grad of an optimised graph still works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from . import products  # noqa: F401 - the products' kernels, which the code calls
from .elementwise import greater
from .linalg import matmul, matmul_rule, transpose
from .reductions import broadcast_like, reduce_mean, unbroadcast
from .registry import all_axes, broadcast_shapes, defop, same_dtype


def addmm_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    bias, a, b = inputs
    if a.ndim != 2 or b.ndim != 2:
        raise ShapeError(f"{format_shape(a.shape)} @ {format_shape(b.shape)}: addmm takes two matrices (2-d)")
    shape, dtype = matmul_rule([a, b], attrs)
    if broadcast_shapes(bias.shape, shape) != shape:
        raise ShapeError(f"bias {format_shape(bias.shape)} does not broadcast to the product's "
                         f"{format_shape(shape)}")
    return shape, same_dtype(inputs)


def _transposed_rule(ta: bool, tb: bool) -> Callable[[list[Value], dict], tuple[Shape, torch.dtype]]:
    """matmul's rule for a product whose first (ta) or second (tb) input is read transposed."""
    def rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
        a, b = inputs
        for v in inputs:
            if v.ndim != 2:
                raise ShapeError(f"{format_shape(v.shape)}: takes two matrices (2-d)")
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        k2, n = (b.shape[1], b.shape[0]) if tb else b.shape
        if k != k2:
            product = f"{format_shape(a.shape)}{'^T' if ta else ''} @ {format_shape(b.shape)}{'^T' if tb else ''}"
            raise ShapeError(f"inner dims differ ({k} vs {k2}) for {product}")
        return (m, n), same_dtype(inputs)
    return rule


def same_shape(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    """Elementwise without broadcasting (what torch's *_backward kernels take)."""
    dtype = same_dtype(inputs)
    if any(v.shape != inputs[0].shape for v in inputs):
        raise ShapeError("shapes differ (" + ", ".join(format_shape(v.shape) for v in inputs) + ")",
                         "the inputs of a fused backward op must have one shape")
    return inputs[0].shape, dtype


def mse_backward_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    g, a, b = inputs
    if g.shape != ():
        raise ShapeError(f"the cotangent {format_shape(g.shape)} must be a scalar")
    return same_shape([a, b], attrs)[0], same_dtype(inputs)



# The products call graphdl.ops.products' kernels: torch's (MKL) or oneDNN's, by measurement.
def _addmm_vjp(g: Value, bias: Value, a: Value, b: Value) -> list[Value | None]:
    return [unbroadcast(g, bias), matmul(g, transpose(b)), matmul(transpose(a), g)]


addmm = defop("addmm", "", addmm_rule, arity=3, out=True, chosen="addmm",
              vjp=lambda g, out, bias, a, b: _addmm_vjp(g, bias, a, b),
              new_storage=True,
              doc="bias + a @ b in one call (fused from add(matmul(a, b), bias)).")

addmm_tanh = defop("addmm_tanh", "", addmm_rule, arity=3, out=True, chosen="addmm_tanh",
                   vjp=lambda g, out, bias, a, b: _addmm_vjp(g * (1.0 - out * out), bias, a, b),
                   new_storage=True,
                   doc="tanh(bias + a @ b) in one call (fused from tanh(addmm(bias, a, b))).")

matmul_tn = defop("matmul_tn", "", _transposed_rule(True, False), arity=2, transposed=(0,), out=True, chosen="mm",
                  vjp=lambda g, out, a, b: [matmul(b, transpose(g)), matmul(a, g)],
                  new_storage=True,
                  doc="transpose(a) @ b without a transpose node (fused from matmul(transpose(a), b)).")

matmul_nt = defop("matmul_nt", "", _transposed_rule(False, True), arity=2, transposed=(1,), out=True, chosen="mm",
                  vjp=lambda g, out, a, b: [matmul(g, b), matmul(transpose(g), a)],
                  new_storage=True,
                  doc="a @ transpose(b) without a transpose node (fused from matmul(a, transpose(b))).")

relu_backward = defop("relu_backward", "aten.threshold_backward.default({0}, {1}, 0.0)", same_shape, arity=2,
                      vjp=lambda gc, out, g, y: [gc * greater(y, 0.0), None],
                      new_storage=True,
                      inplace={0: "aten.threshold_backward.grad_input({0}, {1}, 0.0, grad_input={0})"},
                      out="aten.threshold_backward.grad_input({0}, {1}, 0.0, grad_input={out})",
                      doc="g where y > 0 else 0: relu's VJP given its output y (fused from mul(g, greater(y, 0))).")

tanh_backward = defop("tanh_backward", "aten.tanh_backward.default({0}, {1})", same_shape, arity=2,
                      vjp=lambda gc, out, g, y: [gc * (1.0 - y * y), gc * g * y * -2.0],
                      new_storage=True, inplace={0: "aten.tanh_backward.grad_input({0}, {1}, grad_input={0})"},
                      out="aten.tanh_backward.grad_input({0}, {1}, grad_input={out})",
                      doc="g * (1 - y*y): tanh's VJP given its output y (fused from mul(g, sub(1, mul(y, y)))).")

sigmoid_backward = defop("sigmoid_backward", "aten.sigmoid_backward.default({0}, {1})", same_shape, arity=2,
                         vjp=lambda gc, out, g, y: [gc * (y * (1.0 - y)), gc * g * (1.0 - y * 2.0)],
                         new_storage=True, inplace={0: "aten.sigmoid_backward.grad_input({0}, {1}, grad_input={0})"},
                         out="aten.sigmoid_backward.grad_input({0}, {1}, grad_input={out})",
                         doc="g * y * (1 - y): sigmoid's VJP given its output y "
                             "(fused from mul(g, mul(y, sub(1, y)))).")

mse_backward = defop(
    "mse_backward", "aten.mse_loss_backward.default({0}, {1}, {2}, 1)", mse_backward_rule, arity=3,
    out="aten.mse_loss_backward.grad_input({0}, {1}, {2}, 1, grad_input={out})",
    vjp=lambda gc, out, g, a, b: [
        reduce_mean(gc * (a - b)) * 2.0,
        broadcast_like(g, a, axis=all_axes(a), mean=True) * gc * 2.0,
        broadcast_like(g, b, axis=all_axes(b), mean=True) * gc * -2.0,
    ],
    new_storage=True,
    doc="g * 2 * (a - b) / numel: mse's VJP for a in one call (fused from the chain mse's VJP builds).",
)

