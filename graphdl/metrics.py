"""Metrics: counted in int64 and summed in float64, whatever the model's dtype.

Each metric (`METRICS`) is a sum and how many things it sums, so the sums and counts of
data-parallel ranks add up and the metric is their quotient: accuracy comes from an
exact count of right answers (bfloat16 would round 0.991 to 0.98828125), and `measure`
gives fit an epoch's loss and metrics as tensors it reads in one host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import distributed as dp
from .losses import Loss


def correct(pred: torch.Tensor, target: torch.Tensor, decision: str = "threshold") -> tuple[int, int]:
    """How many predictions are right, and of how many, read as the loss says
    (`Loss.decision`): "argmax" (the largest output is the class, against one-hot or
    probability rows), "logit" (each output above 0 means 1, against 0/1 labels), or
    "threshold" (a single output above 0.5 means 1; several outputs: the argmax).

    Counts, not a mean in the model's dtype: bfloat16 would round 0.991 to 0.98828125.
    """
    right = _right(pred, target, decision)
    return int(right.sum()), right.numel()


def _right(pred: torch.Tensor, target: torch.Tensor, decision: str) -> torch.Tensor:
    """Which predictions are right (a bool tensor), read as `correct` says."""
    if decision == "argmax" or (decision == "threshold" and pred.shape[-1] > 1):
        return pred.argmax(-1) == target.argmax(-1)
    return (pred > (0.0 if decision == "logit" else 0.5)) == (target > 0.5)


def accuracy(pred: torch.Tensor, target: torch.Tensor, decision: str = "threshold") -> float:
    """The fraction `correct` counts."""
    right, total = correct(pred, target, decision)
    return right / total


def _right_count(pred: torch.Tensor, y: torch.Tensor, decision: str) -> tuple[torch.Tensor, int]:
    right = _right(pred, y, decision)
    return right.sum().double(), right.numel()


# Each metric is (a sum, how many things it sums): a float64 0-d tensor on the data's
# device and an int. Sums and counts add up over data-parallel ranks, and the metric is
# their quotient; so accuracy comes from an exact count of right answers, and fit reads
# an epoch's loss, finiteness and metrics in one host sync.
METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, str], tuple[torch.Tensor, int]]] = {
    "accuracy": _right_count,
    "mse": lambda pred, y, decision: ((pred.double() - y.double()).square().sum(), pred.numel()),
    "mae": lambda pred, y, decision: ((pred.double() - y.double()).abs().sum(), pred.numel()),
}


def _is_class_labels(Y: torch.Tensor, decision: str) -> bool:
    """Whether targets [N, C] are class labels, so that accuracy means something:
    0/1 values (one column, or any number with BCEWithLogits), one-hot rows, or, for
    CrossEntropy, rows of probabilities."""
    binary = bool(((Y == 0) | (Y == 1)).all())
    if decision == "argmax":
        rows = Y.double().sum(-1)
        return bool((Y >= 0).all()) and bool(((rows - 1).abs() <= 1e-3).all())
    if decision == "logit" or Y.shape[1] == 1:
        return binary
    return binary and bool((Y.sum(-1) == 1).all())


def choose_metrics(metrics: Any, Y: torch.Tensor, loss: Loss) -> list[str]:
    """The metrics to report: as asked, or by default accuracy when Y holds class labels."""
    if metrics is None:
        return ["accuracy"] if _is_class_labels(Y, loss.decision) else []
    return check_metric_names(metrics)


def check_metric_names(metrics: Any) -> list[str]:
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)) or not all(
            isinstance(m, str) and m in METRICS for m in metrics) or len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics must be a list of distinct metric names from {', '.join(map(repr, METRICS))}, "
                         f"e.g. metrics=['accuracy'], got {metrics!r}")
    return list(metrics)


def measure(fn: Callable[..., tuple[torch.Tensor, ...]], X: torch.Tensor, Y: torch.Tensor, decision: str,
             metrics: list[str], distributed: bool, with_loss: bool = True) -> dict[str, torch.Tensor]:
    """The loss, the metrics and (with accuracy) the error of a model on X, Y, as float64
    0-d tensors on the data's device, not yet read: reading them is the host sync. `fn`
    is the compiled scoring graph, (x, y) -> (loss, prediction), or with `with_loss=False`
    the prediction graph, x -> (prediction,), and the loss reads 0 (fit's metrics on the
    training data need no loss: the disk net's 1000 rows score in 365 µs without, 372 with).
    Data-parallel, each rank measures its share of the rows (`dp.shard`) and one
    collective adds up the shares' sums and counts, so every rank gets one process's numbers."""
    n = len(X)
    first, count = dp.shard(n) if distributed else (0, n)
    sums = torch.zeros(1 + 2 * len(metrics), dtype=torch.float64, device=X.device)  # loss, then (sum, count)s
    if count:  # an empty share adds nothing, but still joins the collective
        x, y = X[first:first + count], Y[first:first + count]
        if with_loss:
            value, pred = fn(x, y)
            parts = [value.double() * (count / n)]  # the shares' loss means, weighted by their sizes
        else:
            pred, parts = fn(x)[0], [sums[0]]
        for m in metrics:
            total, things = METRICS[m](pred, y, decision)
            parts += [total, total.new_full((), float(things))]  # a fill: on CUDA torch.tensor(n) would sync
        sums = torch.stack(parts)
    if distributed:
        dp.sum_over_ranks(sums, "summing the loss and metrics")
    scores = {"loss": sums[0], **{m: sums[1 + 2 * k] / sums[2 + 2 * k] for k, m in enumerate(metrics)}}
    if "accuracy" in metrics:
        k = metrics.index("accuracy")
        scores["error"] = (sums[2 + 2 * k] - sums[1 + 2 * k]) / sums[2 + 2 * k]  # exactly, not 1 - accuracy's rounding
    return scores
