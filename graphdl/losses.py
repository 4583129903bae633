"""Losses as IR builders: each builds one scalar loss node from the prediction and target.

MSE, MAE and MBE average a function of pred - target over every element; BCEWithLogits
and CrossEntropy take logits (the raw outputs of a final Linear, no sigmoid or softmax)
and say how `fit` and `evaluate` read a prediction as a class (`decision`).
"""

from __future__ import annotations

from typing import Any

from .checks import Shape, declared_with
from .ir import Value
from .ops import (
    absolute,
    bce_with_logits,
    cross_entropy,
    exp,
    log,
    mae,
    mbe,
    mse,
    neg,
    reduce_mean,
    relu,
    slice_,
    sub,
)


class Loss:
    """A loss: called on the prediction and target values, it builds one scalar IR node."""

    name = "loss"
    # How accuracy reads a prediction: "threshold" (one output: above 0.5 is class 1;
    # several: the argmax), "logit" (above 0 is class 1, per output) or "argmax".
    decision = "threshold"
    # Whether the loss is the mean over the examples of a term of each (every built-in one
    # is). Then the loss of a data set is its parts' losses weighted by their rows: so
    # evaluate and fit's validation may run a data set in chunks of rows, and data-parallel
    # fit and evaluate add up the ranks' shares. It counts where it is said alongside
    # `__call__` (`adds_up_by_rows`): a loss of one's own, or a subclass of a built-in one
    # that overrides its `__call__`, that is a mean over rows (such as k * mse) says True
    # there; one that is not (an RMSE, a sum) runs on the whole data set, in one process.
    mean_over_rows = False

    def __call__(self, pred: Value, target: Value) -> Value:
        raise NotImplementedError

    def weighted(self, pred: Value, target: Value, weight: Value) -> Value:
        """The loss with each example's terms times its weight [N, 1] (Keras' sample
        weights: the mean over every element of weight * term, not divided by the
        weights' sum)."""
        raise NotImplementedError(f"{type(self).__name__} takes no sample weights")

    def target_shape(self, shape: Shape) -> Shape:
        """The target's shape for a prediction of `shape` (`Weighted` adds a column)."""
        return shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # Equal losses build the same IR, so fit and evaluate reuse one compiled function
    # for them: same class and same settings.
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


def checked_loss(loss: Any) -> Loss:
    """`loss` if it is a graphdl loss; otherwise a ValueError saying what to pass."""
    if not isinstance(loss, Loss):
        raise ValueError(f"loss must be a graphdl loss such as gd.MSE(), got {loss!r}")
    return loss


class MSE(Loss):
    """Mean squared error, mean((pred - y)**2)."""

    name = "mse"
    mean_over_rows = True

    def __call__(self, pred: Value, target: Value) -> Value:
        return mse(pred, target)

    def weighted(self, pred: Value, target: Value, weight: Value) -> Value:
        d = sub(pred, target)
        return reduce_mean(weight * (d * d))


class MAE(Loss):
    """Mean absolute error, mean(|pred - y|)."""

    name = "mae"
    mean_over_rows = True

    def __call__(self, pred: Value, target: Value) -> Value:
        return mae(pred, target)

    def weighted(self, pred: Value, target: Value, weight: Value) -> Value:
        return reduce_mean(weight * absolute(sub(pred, target)))


class MBE(Loss):
    """Mean bias error, mean(pred - y): signed, so it shows a systematic over- or under-shoot.
    It is unbounded below, so it measures a model rather than trains one."""

    name = "mbe"
    mean_over_rows = True

    def __call__(self, pred: Value, target: Value) -> Value:
        return mbe(pred, target)

    def weighted(self, pred: Value, target: Value, weight: Value) -> Value:
        return reduce_mean(weight * sub(pred, target))


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits, mean(log(1 + e**z) - z*y) over every element, with
    targets y in [0, 1], as PyTorch's BCEWithLogitsLoss. Stable for logits of any size. Each
    output is one yes/no question (several outputs: multi-label); a logit above 0 means yes."""

    name = "bce_with_logits"
    mean_over_rows = True
    decision = "logit"

    def __call__(self, pred: Value, target: Value) -> Value:
        return bce_with_logits(pred, target)

    def weighted(self, pred: Value, target: Value, weight: Value) -> Value:
        # log(1 + e**z) - z*y, stably: max(z, 0) - z*y + log(1 + e**-|z|)
        terms = relu(pred) - pred * target + log(exp(neg(absolute(pred))) + 1.0)
        return reduce_mean(weight * terms)


class CrossEntropy(Loss):
    """Cross-entropy of logits [N, C] against one-hot or probability rows [N, C]: the mean
    over rows of -sum(y * log_softmax(z)), as PyTorch's CrossEntropyLoss. (`fit` and
    `evaluate` also take integer class labels [N], 0 to C-1, as one-hot rows.) The predicted
    class is the argmax; add gd.Softmax() after training to output probabilities."""

    name = "cross_entropy"
    mean_over_rows = True
    decision = "argmax"

    def __call__(self, pred: Value, target: Value) -> Value:
        return cross_entropy(pred, target)

    def weighted(self, pred: Value, target: Value, weight: Value) -> Value:
        return cross_entropy(pred, target * weight)  # linear in the target rows: each row's loss times its weight


class Weighted(Loss):
    """`loss` with a weight per example, which its target carries as a last column: fit
    and evaluate put `sample_weight` (times `class_weight`) there, so that the batches,
    the ranks' shares and checkpoints carry the weights with the targets unchanged."""

    def __init__(self, loss: Loss) -> None:
        self.loss = checked_loss(loss)
        self.name, self.decision = loss.name, loss.decision
        cls = type(loss)
        call, weigh = (next(k for k in cls.__mro__ if name in vars(k)) for name in ("__call__", "weighted"))
        if weigh is not Loss and call is not weigh and issubclass(call, weigh):
            raise ValueError(f"{cls.__name__} defines its own __call__ but inherits weighted() from {weigh.__name__}, "
                             f"which weighs {weigh.__name__}'s loss, not this one; give {cls.__name__} a "
                             "weighted(pred, target, weight) of its own to take sample or class weights")


    def target_shape(self, shape: Shape) -> Shape:
        return (*shape[:-1], shape[-1] + 1) if isinstance(shape[-1], int) else shape

    def __call__(self, pred: Value, target: Value) -> Value:
        columns = pred.shape[-1]
        y = slice_(target, axis=-1, start=0, stop=columns)
        w = slice_(target, axis=-1, start=columns, stop=columns + 1)
        return self.loss.weighted(pred, y, w)

    def __repr__(self) -> str:
        return f"Weighted({self.loss!r})"


def adds_up_by_rows(loss: Loss) -> bool:
    """Whether `loss` is a mean over the examples (`Loss.mean_over_rows`, as said alongside
    its `__call__`); a Weighted loss is its loss's (the weights are terms of each example's,
    as Keras', not a sum's divisor)."""
    return adds_up_by_rows(loss.loss) if isinstance(loss, Weighted) else declared_with(loss, "mean_over_rows",
                                                                                       "__call__")


LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (MSE, MAE, MBE, BCEWithLogits, CrossEntropy)}
