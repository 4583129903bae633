"""The fit loop, predict and evaluate for Sequential models.

`fit` builds the training step (forward, loss, backward and update: a `TrainStep`,
see graphdl.step) once, then per epoch shuffles, runs the step on every batch and
records the metrics. The losses stay on the device until the epoch ends, so there is
one host sync per epoch, not per batch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .compile import Compiled, compile
from .ir import tensor_problem
from .losses import MSE, Loss
from .optim import SGD, Schedule, check_updatable
from .step import TrainStep

if TYPE_CHECKING:
    from .layers import Sequential


class History(dict):
    """Per-epoch metrics: history["loss"], ["accuracy"], ["val_loss"], ["val_accuracy"], ["lr"].

    "loss" is the mean training loss over the epoch's batches (as the optimizer saw them);
    "accuracy" is measured on the whole training set at the end of the epoch.
    """

    def __init__(self) -> None:
        super().__init__(loss=[], accuracy=[], val_loss=[], val_accuracy=[], lr=[])

    @property
    def epochs(self) -> int:
        return len(self["loss"])


def _eval_fn(model: Sequential, loss: Loss) -> Compiled:
    return model.compiled(("eval", loss), lambda: compile(model.graph(loss, prediction=True)))


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction classified right: a single output thresholded at 0.5 against 0/1 labels;
    several outputs by argmax against one-hot labels."""
    if pred.shape[-1] == 1:
        return ((pred > 0.5) == (target > 0.5)).to(pred.dtype).mean()
    return (pred.argmax(-1) == target.argmax(-1)).to(pred.dtype).mean()


def _check_data(model: Sequential, X: Any, Y: Any, what: str = "") -> None:
    for name, t in (("X", X), ("Y", Y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}{what} must be a torch.Tensor, got {type(t).__name__}")
        problem = tensor_problem(t)
        if problem:
            raise ValueError(f"{name}{what} {problem}")
        if t.is_meta:
            raise ValueError(f"{name}{what} is on the meta device, which holds shapes but no values; "
                             "training and evaluating need real data (on 'cpu' or 'cuda')")
        if t.dim() != 2:
            raise ValueError(f"{name}{what} must be 2-d [examples, features], got shape {list(t.shape)}")
    if len(X) != len(Y):
        raise ValueError(f"X{what} has {len(X)} examples but Y{what} has {len(Y)}; give one target per example")
    if len(X) == 0:
        raise ValueError(f"X{what} and Y{what} have no examples")
    if X.shape[1] != model.in_features:
        raise ValueError(f"X{what} has {X.shape[1]} features but the model takes {model.in_features}")
    if Y.shape[1] != model.out_features:
        raise ValueError(f"Y{what} has {Y.shape[1]} columns but the model outputs {model.out_features}")
    for name, t in (("X", X), ("Y", Y)):
        finite = torch.isfinite(t)
        if not bool(finite.all()):  # one pass over the data, once per call: cheap beside training on it
            row, col = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{name}{what} has NaN or inf values, first at {name}[{row}, {col}] = "
                             f"{t[row, col].item()}; drop or repair those examples (e.g. with torch.isfinite)")


def _check_params(model: Sequential) -> None:
    """Training updates every param in place, so each must hold real values in memory of its own."""
    for name, p in model.parameters().items():
        if p.is_meta:
            raise ValueError(f"param {name} is on the meta device, which holds no values to train; "
                             "build the model on 'cpu' or 'cuda' (or load real weights) first")
        check_updatable(f"param {name}", p)
        if not bool(p.isfinite().all()):
            raise ValueError(f"param {name} is NaN or inf before training; re-initialise the model")


def _check_settings(validation_data: Any, seed: Any, schedule: Any, shuffle: Any, verbose: Any) -> None:
    for name, flag in (("shuffle", shuffle), ("verbose", verbose)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if validation_data is not None and not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
        raise ValueError(f"validation_data must be a pair (X_val, Y_val), got {type(validation_data).__name__}"
                         + (f" of length {len(validation_data)}" if isinstance(validation_data, (tuple, list)) else ""))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be a whole number or None, got {seed!r}")
    if schedule is not None and not callable(schedule):
        raise ValueError(f"schedule must be a graphdl schedule such as gd.StepDecay(every=10, factor=0.9), "
                         f"got {schedule!r}")


def _scheduled_lr(schedule: Schedule | None, epoch: int, base_lr: float) -> float:
    if schedule is None:
        return base_lr
    try:
        lr = schedule(epoch, base_lr)
    except TypeError as e:
        raise ValueError(f"schedule {schedule!r} cannot be called as schedule(epoch, base_lr): {e}") from e
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"schedule {schedule!r} gave lr={lr!r} for epoch {epoch + 1}; "
                         "a learning rate must be a finite number >= 0")
    return lr


class DivergedError(FloatingPointError):
    """`fit` stopped because the loss (or a param) stopped being finite.

    The model keeps its last finite params. `history` holds the completed epochs (it is
    also `model.history`); `epoch` and `batch` count from 1, as the progress lines do.
    """

    def __init__(self, message: str, history: History, epoch: int, batch: int | None) -> None:
        super().__init__(message)
        self.history, self.epoch, self.batch = history, epoch, batch


# Divergence is found without a host sync per batch. Reading each batch's loss
# (`.item()`) would cost ~10 us a step, as much as the step itself on a tiny net. Instead
# fit copies the params and optimizer state at each epoch's start (a few small copies
# per epoch), checks the epoch's mean loss and the params once, at the sync the epoch
# already pays for its loss, and only after a divergence replays that epoch from the
# copy one batch at a time, reading every loss, to name the batch and stop at the last
# finite params. The replay runs the same kernels on the same batches in the same order,
# so it meets the same non-finite value.


class _Snapshot:
    """Copies of tensors (params, optimizer state) taken by `save` and put back by `restore`."""

    def __init__(self, tensors: Callable[[], list[torch.Tensor]]) -> None:
        self.tensors = tensors
        self.copies = [t.clone() for t in tensors()]

    def save(self) -> None:
        if self.copies:  # one multi-tensor copy: 3 µs for the disk net's 16 tensors, 6 µs one by one
            torch._foreach_copy_(self.copies, self.tensors())

    def restore(self) -> None:
        if self.copies:
            torch._foreach_copy_(self.tensors(), self.copies)


def _largest(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest |x| over every element, a 0-d tensor: inf or NaN once any element is,
    so one number tells whether all are finite. One multi-tensor call, ~8 µs for the
    disk net's params against 94 µs for isfinite().all() tensor by tensor."""
    tensors = [t for t in tensors if t.numel()]  # an empty tensor has no largest element
    if not tensors:
        return torch.tensor(0.0)
    return torch.stack(torch._foreach_norm(tensors, math.inf)).max()


def _replay(step: TrainStep, start: _Snapshot, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None,
            batch_size: int, lr: float) -> tuple[int, float, bool] | None:
    """Replay an epoch that diverged from its starting state, one checked batch at a time.

    Returns (batch index, its loss, whether it was its update that made params non-finite)
    with the model at the last finite params, or None if the replay stayed finite (the
    model is then back at the epoch's start).
    """
    start.restore()
    before = _Snapshot(start.tensors)
    if order is not None:
        X, Y = X.index_select(0, order.to(X.device)), Y.index_select(0, order.to(Y.device))
    for b, (x, y) in enumerate(zip(X.split(batch_size), Y.split(batch_size))):
        loss = float(step.forward_backward(x, y))
        if not math.isfinite(loss):
            return b, loss, False  # the params that gave it are finite: the previous update was checked
        before.save()
        step.apply(lr)
        if not math.isfinite(float(_largest(step.params))):
            before.restore()
            return b, loss, True
    start.restore()
    return None


def _diverged(found: tuple[int, float, bool] | None, epoch: int, epochs: int, batches: int, lr: float,
              history: History) -> DivergedError:
    where = f"epoch {epoch + 1}/{epochs}"
    if found is None:
        what = (f"training diverged in {where} (lr={lr:g}), but replaying it one batch at a time stayed finite, "
                "so the batch is unknown; the model keeps its params from the start of that epoch")
    elif found[2]:
        what = (f"training diverged: the update of {where}, batch {found[0] + 1}/{batches} (lr={lr:g}) made params "
                f"NaN or inf (the gradients overflowed; the loss was {found[1]:g}); the model keeps its params "
                "from before that update")
    else:
        what = (f"training diverged: the loss became {found[1]} in {where}, batch {found[0] + 1}/{batches} "
                f"(lr={lr:g}); the model keeps its last finite params, from before that batch")
    done = (f"The history of the {epoch} completed epoch{'s' if epoch != 1 else ''} is"
            if epoch else "No epoch completed; the empty history is")
    message = (f"{what}.\n  {done} on this error's .history and on model.history."
               f"\n  hint: lower the learning rate (e.g. lr={lr / 10:g}) or scale the inputs and targets "
               "to about [-1, 1]")
    return DivergedError(message, history, epoch + 1, None if found is None else found[0] + 1)


# Nothing fit makes reaches the user as a tensor (it hands back floats and updates the
# params in place), so the whole loop runs in inference mode: no autograd bookkeeping,
# and params or data that require grad (from a torch model) are fine.
@torch.inference_mode()
def fit(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
        optimizer: SGD | None = None, schedule: Schedule | None = None, epochs: int = 1,
        batch_size: int = 32, shuffle: bool = True,
        validation_data: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int | None = None,
        verbose: bool = True) -> History:
    """Train `model` in place with minibatch SGD.

    Args:
        X, Y: training inputs [N, in_features] and targets [N, out_features].
        loss: a graphdl loss (default `MSE()`).
        optimizer: an `SGD` (default `SGD(lr=0.01)`).
        schedule: sets the learning rate each epoch from the optimizer's base rate.
        epochs: passes over the data (>= 0).
        batch_size: examples per step (>= 1); the last batch may be smaller.
        shuffle: reshuffle the examples every epoch.
        validation_data: (X_val, Y_val), evaluated after every epoch.
        seed: seeds the shuffling; None draws one from torch's global RNG.
        verbose: print one line per epoch.

    Returns:
        The `History` of per-epoch metrics.
    """
    loss = MSE() if loss is None else loss
    optimizer = SGD() if optimizer is None else optimizer
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a whole number >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not isinstance(loss, Loss):
        raise ValueError(f"loss must be a graphdl loss such as gd.MSE(), got {loss!r}")
    if not isinstance(optimizer, SGD):
        raise ValueError(f"optimizer must be a graphdl optimizer such as gd.SGD(lr=0.01), got {optimizer!r}")
    _check_settings(validation_data, seed, schedule, shuffle, verbose)
    _check_data(model, X, Y)
    if validation_data is not None:
        _check_data(model, *validation_data, what=" (validation)")

    _check_params(model)
    step = TrainStep(model, loss, optimizer)
    step.compiled.check_feeds((X, Y), {})  # dtype and device, once, with graphdl's messages
    predicting, scoring = _predict_fn(model), _eval_fn(model, loss)
    predicting.check_feeds((X,), {})  # so that each epoch calls their unchecked entries (.fn)
    if validation_data is not None:
        scoring.check_feeds(tuple(validation_data), {})
    params = step.params
    n = len(X)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    gen = torch.Generator().manual_seed(seed)
    # Each batch's share of the epoch's mean loss, so one dot product gives the mean.
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    weights = torch.tensor(sizes, dtype=X.dtype, device=X.device) / max(n, 1)
    history = History()
    model.history = history  # what fit has recorded so far, kept if it stops early
    start = _Snapshot(lambda: [*params, *optimizer.buffers])

    for epoch in range(epochs):
        started = time.perf_counter()
        lr = _scheduled_lr(schedule, epoch, optimizer.lr)
        order = torch.randperm(n, generator=gen) if shuffle else None
        start.save()
        losses = step.epoch(X, Y, batch_size, order, lr)
        # The mean loss, the params' largest magnitude (not finite once any param is not)
        # and the metrics, read in the epoch's one host sync.
        scores = [losses @ weights, _largest(params), accuracy(predicting.fn(X)[0], Y)]
        if validation_data is not None:
            scores += _scores(scoring.fn(*validation_data), validation_data[1])
        epoch_loss, largest, *metrics = torch.stack(scores).tolist()
        if not (math.isfinite(epoch_loss) and math.isfinite(largest)):
            found = _replay(step, start, X, Y, order, batch_size, lr)
            raise _diverged(found, epoch, epochs, len(sizes), lr, history)
        history["loss"].append(epoch_loss)
        history["accuracy"].append(metrics[0])
        if validation_data is not None:
            history["val_loss"].append(metrics[1])
            history["val_accuracy"].append(metrics[2])
        history["lr"].append(lr)
        if verbose:
            _report(epoch, epochs, history, time.perf_counter() - started)
    return history


def _report(epoch: int, epochs: int, history: History, seconds: float) -> None:
    parts = [f"Epoch {epoch + 1}/{epochs}", f"{seconds * 1000:.0f}ms"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if history[key]:
            parts.append(f"{key}: {history[key][-1]:.4f}")
    parts.append(f"lr: {history['lr'][-1]:.4g}")
    print(" - ".join(parts), file=sys.stdout, flush=True)


def predict(model: Sequential, X: torch.Tensor) -> torch.Tensor:
    """The model's output for X [N, in_features]."""
    return _predict_fn(model)(x=X)[0]


def _predict_fn(model: Sequential) -> Compiled:
    return model.compiled(("predict",), lambda: compile(model.graph()))


def evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
             _checked: bool = False) -> dict[str, float]:
    """{"loss": the loss, "accuracy": fraction right (see `accuracy`), "error": 1 - accuracy}."""
    loss = MSE() if loss is None else loss
    if not isinstance(loss, Loss):
        raise ValueError(f"loss must be a graphdl loss such as gd.MSE(), got {loss!r}")
    if not _checked:
        _check_data(model, X, Y)
    value, acc = (float(s) for s in _scores(_eval_fn(model, loss)(x=X, y=Y), Y))
    return {"loss": value, "accuracy": acc, "error": 1.0 - acc}


def _scores(outputs: tuple[torch.Tensor, ...], Y: torch.Tensor) -> list[torch.Tensor]:
    """[loss, accuracy] from the eval graph's outputs (loss, prediction) for targets Y, as
    tensors on the device (no host sync)."""
    value, pred = outputs
    return [value, accuracy(pred, Y)]
