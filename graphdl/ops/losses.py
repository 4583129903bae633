"""Losses: each a scalar mean over the batch, with a VJP written in the primitives."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from .elementwise import log_softmax, neg, sigmoid, sign, softmax
from .reductions import broadcast_like, reduce_sum, unbroadcast
from .registry import all_axes, broadcast_shapes, defop, same_dtype


def loss_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    a, b = inputs
    same_dtype(inputs)
    both = broadcast_shapes(a.shape, b.shape)
    if both != a.shape:  # a target may broadcast to the prediction, never enlarge it
        grown = f" (they broadcast to {format_shape(both)}, averaging every pair)" if both is not None else ""
        raise ShapeError(
            f"prediction {format_shape(a.shape)} and target {format_shape(b.shape)} differ{grown}",
            f"give the target the prediction's shape, {format_shape(a.shape)}"
            + (": declare it with shape (None, 1), or reshape it with y.reshape(-1, 1)"
               if a.ndim == 2 and a.shape[1] == 1 else ""),
        )
    return (), a.dtype


def cross_entropy_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    logits, target = inputs
    same_dtype(inputs)
    if logits.ndim != 2:
        raise ShapeError(f"logits {format_shape(logits.shape)} must be 2-d, [examples, classes]")
    if isinstance(logits.shape[1], int) and logits.shape[1] < 2:  # softmax over one class is 1: the loss is 0
        raise ShapeError(f"logits {format_shape(logits.shape)} have {logits.shape[1]} class; cross-entropy needs "
                         "at least 2", "for a yes/no target with one output, use bce_with_logits (gd.BCEWithLogits())")
    if target.shape != logits.shape:
        raise ShapeError(
            f"logits {format_shape(logits.shape)} and target {format_shape(target.shape)} differ",
            f"give one row of class probabilities per example, {format_shape(logits.shape)}: one-hot rows "
            "for class labels (fit and evaluate turn integer labels [N] into them)",
        )
    return (), logits.dtype


def _loss_vjp(local: Callable[[Value], Value | None]) -> Callable[..., list]:
    """VJP of a mean-over-elements loss of d = a - b, given d's elementwise derivative."""
    def vjp(g: Value, out: Value, a: Value, b: Value) -> list[Value | None]:
        d = a - b
        gd = broadcast_like(g, d, axis=tuple(range(d.ndim)), mean=True)
        factor = local(d)
        if factor is not None:
            gd = gd * factor
        return [unbroadcast(gd, a), unbroadcast(neg(gd), b)]
    return vjp


mse = defop("mse", "aten.mse_loss.default({0}, {1}, 1)", loss_rule, arity=2,  # 1: reduction="mean"
            vjp=_loss_vjp(lambda d: d * 2.0), new_storage=True,
                                              doc="mean((a - b)**2) over every element.")

mae = defop("mae", "torch.mean(torch.abs(torch.sub({0}, {1})))", loss_rule, arity=2,
            vjp=_loss_vjp(sign), new_storage=True,
                                 doc="mean(|a - b|) over every element.")

mbe = defop("mbe", "torch.mean(torch.sub({0}, {1}))", loss_rule, arity=2,
            vjp=_loss_vjp(lambda d: None), new_storage=True,
                                           doc="mean(a - b) over every element (mean bias error).")


def _bce_with_logits_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    x, y = inputs
    target = args[1] if y.shape == x.shape else f"{args[1]}.expand_as({args[0]})"  # the kernel does not broadcast
    return f"aten.binary_cross_entropy_with_logits.default({args[0]}, {target}, None, None, 1)"


# The two classification losses' VJPs stay primitives, with no fused backward op: fusing
# either chain into one line of torch calls measured 1-2.5 us faster at batch 20 (cross-
# entropy, 3 classes: 18.5 -> 17.2 us median, 14.0 -> 11.6 us best; BCE: 11.0 -> 9.8 us;
# one thread, the variants alternated, 15 x 2000 calls each, on the 2-core machine), about
# 1 % of a ~150 us training step: not worth an op, a fusion pattern and their tests.


def _bce_with_logits_vjp(g: Value, out: Value, x: Value, y: Value) -> list[Value | None]:
    # loss = mean(softplus(x) - x*y): d/dx = sigmoid(x) - y, d/dy = -x, each over the element count.
    spread = broadcast_like(g, x, axis=all_axes(x), mean=True)
    return [spread * (sigmoid(x) - y), unbroadcast(neg(spread * x), y)]


bce_with_logits = defop(
    "bce_with_logits", _bce_with_logits_code, loss_rule, _bce_with_logits_vjp, arity=2, new_storage=True,
    doc="mean(log(1 + e**x) - x*y) over every element: binary cross-entropy of the logits x against "
        "targets y in [0, 1], computed stably for logits of any size (torch's BCEWithLogitsLoss).",
)


def _cross_entropy_vjp(g: Value, out: Value, x: Value, y: Value) -> list[Value | None]:
    # loss = -mean over rows of sum(y * logsoftmax(x)): d/dx = softmax(x) * sum(y) - y (softmax - y for
    # rows that sum to 1), d/dy = -logsoftmax(x), each over the number of rows. Each row's
    # share g/N is spread over [N, 1], the shape of the row sums of y, and broadcasts from there.
    row_sums = reduce_sum(y, axis=-1, keepdims=True)
    per_row = broadcast_like(g, row_sums, axis=all_axes(row_sums), mean=True)
    return [per_row * (softmax(x) * row_sums - y), neg(per_row * log_softmax(x))]


# Per-row losses, then their mean: with reduction=mean torch sums the rows in the model's
# dtype before dividing, which overflows float16 past a sum of 65,504 (100,000 rows at
# loss 1.25 read inf); torch.mean accumulates in float32.
cross_entropy = defop(
    "cross_entropy", "torch.mean(aten.cross_entropy_loss.default({0}, {1}, None, 0, -100, 0.0))", cross_entropy_rule,
    _cross_entropy_vjp, arity=2, new_storage=True,
    doc="-mean over rows of sum(y * logsoftmax(x)): cross-entropy of logits x [N, C] against one-hot or "
        "probability rows y [N, C] (torch's CrossEntropyLoss with probability targets).",
)

