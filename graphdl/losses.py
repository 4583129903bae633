"""Losses as IR builders: each is a mean over every element of pred - target."""

from __future__ import annotations

from .ir import Value
from .ops import mae, mbe, mse


class Loss:
    """A loss: called on the prediction and target values, it builds one scalar IR node."""

    name = "loss"

    def __call__(self, pred: Value, target: Value) -> Value:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # Equal losses build the same IR, so fit and evaluate reuse one compiled function
    # for them: same class and same settings.
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


class MSE(Loss):
    """Mean squared error, mean((pred - y)**2)."""

    name = "mse"

    def __call__(self, pred: Value, target: Value) -> Value:
        return mse(pred, target)


class MAE(Loss):
    """Mean absolute error, mean(|pred - y|)."""

    name = "mae"

    def __call__(self, pred: Value, target: Value) -> Value:
        return mae(pred, target)


class MBE(Loss):
    """Mean bias error, mean(pred - y): signed, so it shows a systematic over- or under-shoot.
    It is unbounded below, so it measures a model rather than trains one."""

    name = "mbe"

    def __call__(self, pred: Value, target: Value) -> Value:
        return mbe(pred, target)


LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (MSE, MAE, MBE)}
