"""Metrics, as statistics that add up: counted in int64 and summed in float64, whatever
the model's dtype.

Each metric (`METRICS`) is a vector of statistics of the rows it has seen (a count of
right answers and of rows; per class, the true positives, the predicted and the actual
positives; sums of squares), and a function of those statistics. Statistics of several
data-parallel ranks, or of several chunks of rows, add up, and the metric of their sum is
the metric of all the rows: accuracy comes from an exact count of right answers
(bfloat16 would round 0.991 to 0.98828125), and `measure` gives fit an epoch's loss and
metrics as tensors it reads in one host sync.

ROC AUC is the exception: it ranks every score against every other, so no fixed set of
sums determines it. Data-parallel, each rank's (score, label) rows are gathered to every
rank (one all-gather, of 2 numbers a row), which computes the exact AUC of all of them.

Each metric equals scikit-learn's, but for accuracy of several independent yes/no outputs
(BCEWithLogits), which is the fraction of right elements (Keras' binary_accuracy), not
scikit-learn's fraction of rows right in every label. precision, recall and f1 are binary (positive class 1)
for a model with one output, the macro average over the classes for several (the classes
present in the targets or the predictions, as scikit-learn counts them; every column for
several independent yes/no outputs under BCEWithLogits), 0 where a class has nothing to
divide by (scikit-learn's zero_division default); r2 is the uniform average over the
outputs; top_k_accuracy counts a row right when its class is among the k highest scores
(k=2, scikit-learn's default; "top_5_accuracy" and so on name other k).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed as dp
from .losses import Loss

Tensor = torch.Tensor


def correct(pred: Tensor, target: Tensor, decision: str = "threshold") -> tuple[int, int]:
    """How many predictions are right, and of how many, read as the loss says
    (`Loss.decision`): "argmax" (the largest output is the class, against one-hot or
    probability rows), "logit" (each output above 0 means 1, against 0/1 labels), or
    "threshold" (a single output above 0.5 means 1; several outputs: the argmax).

    Counts, not a mean in the model's dtype: bfloat16 would round 0.991 to 0.98828125.
    """
    right = _right(pred, target, decision)
    return int(right.sum()), right.numel()


def _multiclass(pred: Tensor, decision: str) -> bool:
    """Whether the outputs are one class among several (else independent yes/no columns)."""
    return decision == "argmax" or (decision == "threshold" and pred.shape[-1] > 1)


def _right(pred: Tensor, target: Tensor, decision: str) -> Tensor:
    """Which predictions are right (a bool tensor), read as `correct` says."""
    if _multiclass(pred, decision):
        return pred.argmax(-1) == target.argmax(-1)
    return _yes(pred, decision) == (target > 0.5)


def _yes(pred: Tensor, decision: str) -> Tensor:
    return pred > (0.0 if decision == "logit" else 0.5)


def accuracy(pred: Tensor, target: Tensor, decision: str = "threshold") -> float:
    """The fraction `correct` counts."""
    right, total = correct(pred, target, decision)
    return right / total


@dataclass(frozen=True)
class Metric:
    """A metric as statistics that add up.

    stats(pred, y, decision, origin): the statistics of these rows, a float64 vector of
    `size(C)` numbers for C outputs (`origin`: the first row of all the targets, the
    same on every rank, for statistics that must not be measured from 0).
    value(stats, multiclass): the metric of summed statistics, a 0-d float64 tensor.
    higher_is_better: its direction (callbacks' mode="auto").
    """

    stats: Callable[[Tensor, Tensor, str, Tensor], Tensor]
    value: Callable[[Tensor, bool], Tensor]
    size: Callable[[int], int]
    higher_is_better: bool = True


def _count(pred: Tensor, y: Tensor, decision: str, origin: Tensor) -> Tensor:
    right = _right(pred, y, decision)
    return torch.stack([right.sum().double(), right.new_full((), right.numel(), dtype=torch.float64)])


def _mean_of(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def stats(pred: Tensor, y: Tensor, decision: str, origin: Tensor) -> Tensor:
        total = fn(pred.double(), y.double()).sum()
        return torch.stack([total, total.new_full((), float(pred.numel()))])
    return stats


def _quotient(s: Tensor, multiclass: bool) -> Tensor:
    return s[0] / s[1]


def _confusion(pred: Tensor, y: Tensor, decision: str, origin: Tensor) -> Tensor:
    """Per class: [true positives, predicted positives, actual positives], flattened. One
    class for a single yes/no output (its positives), C for several columns."""
    if _multiclass(pred, decision):
        classes = torch.arange(pred.shape[-1], device=pred.device)
        guess = pred.argmax(-1, keepdim=True) == classes  # one-hot rows of the predicted class
        truth = y.argmax(-1, keepdim=True) == classes
    else:
        guess, truth = _yes(pred, decision), y > 0.5
    return torch.stack([(guess & truth).sum(0), guess.sum(0), truth.sum(0)]).double().reshape(-1)


def _per_class(score: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> Callable[[Tensor, bool], Tensor]:
    """The macro average of a per-class score num/den (0 where den is 0), over the classes
    present in the targets or predictions for one class among several (scikit-learn's
    labels), over every column otherwise."""
    def value(s: Tensor, multiclass: bool) -> Tensor:
        tp, predicted, actual = s.reshape(3, -1)
        num, den = score(tp, predicted, actual)
        per = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
        counted = (predicted + actual > 0) if multiclass else torch.ones_like(tp, dtype=torch.bool)
        return per[counted].mean() if bool(counted.any()) else per.new_zeros(())
    return value


def _r2_stats(pred: Tensor, y: Tensor, decision: str, origin: Tensor) -> Tensor:
    """Per output: [rows, sum of y - origin, sum of (y - origin)², sum of squared errors].
    Measured from `origin` (the first row of all the targets, which every rank holds), the
    spread Σ(y - o)² - (Σ(y - o))²/n keeps its digits: from 0 it would cancel for targets
    of a large mean (1e8 + noise gave r2 0.0 for scikit-learn's 0.73)."""
    p, t = pred.double(), y.double()
    rows = t.new_full((t.shape[-1],), float(t.shape[0]))
    centred = t - origin.double()
    return torch.stack([rows, centred.sum(0), centred.square().sum(0), (t - p).square().sum(0)]).reshape(-1)


def _r2(s: Tensor, multiclass: bool) -> Tensor:
    """1 - SS_res / SS_tot per output (1 where both are 0, 0 where only SS_tot is:
    scikit-learn's force_finite), averaged over the outputs."""
    n, total, squares, residual = s.reshape(4, -1)
    spread = (squares - total.square() / n).clamp(min=0)
    score = 1 - residual / torch.where(spread > 0, spread, torch.ones_like(spread))
    score = torch.where(spread > 0, score, (residual == 0).double())
    return score.mean() if bool((n >= 2).all()) else score.new_full((), math.nan)  # sklearn: nan below 2 rows


def _top_k(k: int) -> Callable[..., Tensor]:
    """Rows whose class is among the k highest scores, ties broken as scikit-learn breaks
    them (a stable sort, the later class first). One output is a yes/no score: top-1 is
    its accuracy, and any k >= 2 holds both classes."""
    def stats(pred: Tensor, y: Tensor, decision: str, origin: Tensor) -> Tensor:
        rows = pred.shape[0]
        if pred.shape[-1] == 1:
            hits = _right(pred, y, decision).sum().double() if k == 1 else \
                pred.new_full((), float(rows), dtype=torch.float64)
        else:
            best = pred.argsort(dim=-1, stable=True)[:, -k:]
            hits = (best == y.argmax(-1, keepdim=True)).any(-1).sum().double()
        return torch.stack([hits, hits.new_full((), float(rows))])
    return stats


def _precision(tp: Tensor, predicted: Tensor, actual: Tensor) -> tuple[Tensor, Tensor]:
    return tp, predicted


def _recall(tp: Tensor, predicted: Tensor, actual: Tensor) -> tuple[Tensor, Tensor]:
    return tp, actual


def _f1(tp: Tensor, predicted: Tensor, actual: Tensor) -> tuple[Tensor, Tensor]:
    return 2 * tp, predicted + actual  # 2PR / (P + R)


def _two(classes: int) -> int:
    return 2


def _three_per_class(classes: int) -> int:
    return 3 * classes


METRICS: dict[str, Metric] = {
    "accuracy": Metric(_count, _quotient, _two),
    "mse": Metric(_mean_of(lambda p, y: (p - y).square()), _quotient, _two, higher_is_better=False),
    "mae": Metric(_mean_of(lambda p, y: (p - y).abs()), _quotient, _two, higher_is_better=False),
    "precision": Metric(_confusion, _per_class(_precision), _three_per_class),
    "recall": Metric(_confusion, _per_class(_recall), _three_per_class),
    "f1": Metric(_confusion, _per_class(_f1), _three_per_class),
    "r2": Metric(_r2_stats, _r2, lambda classes: 4 * classes),
    "top_k_accuracy": Metric(_top_k(2), _quotient, _two),
}
GATHERED = ("auc",)  # metrics that need every row, not sums (see the module's docstring)
_TOP_K = re.compile(r"top_([1-9][0-9]*)_accuracy")


def metric(name: str) -> Metric:
    """The metric called `name` ("top_5_accuracy" and so on included)."""
    found = METRICS.get(name)
    if found is None and (m := _TOP_K.fullmatch(name)):
        found = Metric(_top_k(int(m[1])), _quotient, _two)
    if found is None:
        raise KeyError(name)
    return found


def is_metric(name: object) -> bool:
    return isinstance(name, str) and (name in METRICS or name in GATHERED or _TOP_K.fullmatch(name) is not None)


def higher_is_better(name: str) -> bool:
    return name in GATHERED or metric(name).higher_is_better


def auc(scores: Tensor, labels: Tensor) -> Tensor:
    """Binary ROC AUC of `scores` [N] against 0/1 `labels` [N], exactly, as scikit-learn's
    roc_auc_score: the probability that a positive row scores above a negative one, ties
    counting a half (the Mann-Whitney U statistic, from average ranks)."""
    scores, positive = scores.double(), labels > 0.5
    if bool(scores.isnan().any()):  # no order to rank (scikit-learn refuses such input)
        return scores.new_full((), math.nan)
    values, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2.0)[inverse]  # 1-based average ranks of ties
    pos = positive.sum().double()
    neg = positive.numel() - pos
    return (ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg)


def _is_class_labels(Y: Tensor, decision: str) -> bool:
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


def choose_metrics(metrics: Any, Y: Tensor, loss: Loss) -> list[str]:
    """The metrics to report: as asked, or by default accuracy when Y holds class labels."""
    if metrics is None:
        return ["accuracy"] if _is_class_labels(Y, loss.decision) else []
    return check_metric_names(metrics)


def check_metric_names(metrics: Any) -> list[str]:
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)) or not all(
            is_metric(m) for m in metrics) or len(set(metrics)) != len(metrics):
        names = ", ".join(map(repr, [*METRICS, *GATHERED]))
        raise ValueError(f"metrics must be a list of distinct metric names from {names} (or 'top_5_accuracy' and "
                         f"so on), e.g. metrics=['accuracy'], got {metrics!r}")
    return list(metrics)


def check_metrics_fit(metrics: list[str], Y: Tensor, what: str = "Y", decision: str = "threshold") -> None:
    """Refuse, before any work, a metric these targets cannot give: AUC of several
    outputs, or of targets with one class only, top-k of several yes/no outputs
    (scikit-learn refuses each too)."""
    top_k = [m for m in metrics if m == "top_k_accuracy" or _TOP_K.fullmatch(m)]
    if top_k and decision == "logit" and Y.shape[-1] > 1:
        raise ValueError(f"metric {top_k[0]!r} ranks one class per row, but these {Y.shape[-1]} outputs are "
                         "independent yes/no labels (BCEWithLogits); use precision, recall or f1")
    if "auc" in metrics:
        if Y.shape[-1] != 1:
            raise ValueError(f"metric 'auc' is binary ROC AUC, of a model with one output; {what} has "
                             f"{Y.shape[-1]} columns")
        if len(Y) and bool((Y > 0.5).all() | (Y <= 0.5).all()):
            raise ValueError(f"metric 'auc' needs both classes in {what}, which holds only "
                             f"{int(bool((Y > 0.5).all()))}s: ROC AUC is not defined for one class")


def measure(fn: Callable[..., tuple[Tensor, ...]], X: Tensor, Y: Tensor, decision: str,
            metrics: list[str], distributed: bool, with_loss: bool = True,
            targets: Tensor | None = None, rows: int | None = None) -> dict[str, Tensor]:
    """The loss, the metrics and (with accuracy) the error of a model on X, Y, as float64
    0-d tensors on the data's device, not yet read: reading them is the host sync. `fn`
    is the compiled scoring graph, (x, y) -> (loss, prediction), or with `with_loss=False`
    the prediction graph, x -> (prediction,), and the loss reads 0 (fit's metrics on the
    training data need no loss: the disk net's 1000 rows score in 365 µs without, 372 with).
    Data-parallel, each rank measures its share of the rows (`dp.shard`) and one
    collective adds up the shares' statistics, so every rank gets one process's numbers.
    `targets`: what the metrics compare with, where the loss is fed more than the targets
    (Y with each example's weight as a last column); by default Y. `rows`: run `fn` on
    this many rows at a time (`train.chunk_rows`) and add up the chunks' statistics as the
    ranks' are added; None: all at once."""
    targets = Y if targets is None else targets
    n, classes = len(X), targets.shape[-1]
    first, count = dp.shard(n) if distributed else (0, n)
    summed = [m for m in metrics if m not in GATHERED]
    sizes = [metric(m).size(classes) for m in summed]
    sums, kept = None, []  # kept: the predictions, for what needs every row's (auc)
    step = max(1, count if rows is None else rows)
    for lo in range(first, first + count, step):
        hi = min(lo + step, first + count)
        x, y, t = X[lo:hi], Y[lo:hi], targets[lo:hi]
        if with_loss:
            value, pred = fn(x, y)
            parts = [value.double().reshape(1) * ((hi - lo) / n)]  # the chunks' loss means, weighted by their sizes
        else:
            pred, parts = fn(x)[0], [torch.zeros(1, dtype=torch.float64, device=X.device)]
        parts += [metric(m).stats(pred, t, decision, targets[:1]) for m in summed]
        sums = torch.cat(parts) if sums is None else sums + torch.cat(parts)
        if "auc" in metrics:
            kept.append(pred)
    if sums is None:  # an empty share adds nothing, but still joins the collective
        sums = torch.zeros(1 + sum(sizes), dtype=torch.float64, device=X.device)
    if distributed:
        dp.sum_over_ranks(sums, "summing the loss and metrics")
    stats = sums[1:].split(sizes)
    multiclass = _multiclass(targets, decision)
    scores = {"loss": sums[0], **{m: metric(m).value(s, multiclass) for m, s in zip(summed, stats, strict=True)}}
    if "auc" in metrics:
        pred = (kept[0] if len(kept) == 1 else torch.cat(kept)) if kept else None
        scores["auc"] = _gathered_auc(pred, targets, first, count, n, distributed)
    if "accuracy" in metrics:
        right, total = stats[summed.index("accuracy")]
        scores["error"] = (total - right) / total  # exactly, not 1 - accuracy's rounding
    return {m: scores[m] for m in ("loss", *metrics, *(["error"] if "accuracy" in metrics else []))}


def _gathered_auc(pred: Tensor | None, Y: Tensor, first: int, count: int, n: int, distributed: bool) -> Tensor:
    """AUC of every row: this share's scores and labels, gathered from every rank."""
    mine = torch.zeros(count, 2, dtype=torch.float64, device=Y.device)
    if count:
        mine = torch.stack([pred[:, 0].double(), Y[first:first + count, 0].double()], 1)
    rows = dp.gather_rows(mine, n) if distributed else mine
    return auc(rows[:, 0], rows[:, 1])
