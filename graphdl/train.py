"""The fit loop, predict and evaluate for Sequential models.

`fit` builds the training step (forward, loss, backward and update: a `TrainStep`,
see graphdl.step) once, then per epoch shuffles, runs the step on every batch and
records the metrics. The losses stay on the device until the epoch ends, so there is
one host sync per epoch, not per batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from . import distributed as dp
from .batches import Batches, OneProcess, Sharded
from .checkpoint import Resumed, read_checkpoint, write_checkpoint
from .checks import flag, real, shown, whole
from .compile import Compiled, compile
from .ir import tensor_problem
from .losses import MSE, Loss, checked_loss
from .optim import SGD, Schedule, check_apart, check_updatable, checked_optimizer
from .step import TrainStep

if TYPE_CHECKING:
    from .model import Sequential


class History(dict):
    """Per-epoch lists: "loss", one per metric ("accuracy", "mse", ...), "val_loss" and
    "val_<metric>" (empty without validation data), and "lr".

    "loss" is the mean training loss over the epoch's batches (as the optimizer saw them);
    the metrics are measured on the whole training set at the end of the epoch. A metric
    that was not measured reads as an empty list, as "val_loss" does without validation data.
    """

    def __init__(self, metrics: list[str] | tuple[str, ...] = ("accuracy",)) -> None:
        super().__init__(loss=[], **{m: [] for m in metrics}, val_loss=[], **{f"val_{m}": [] for m in metrics}, lr=[])

    def __missing__(self, key: str) -> list:
        if isinstance(key, str) and key.removeprefix("val_") in METRICS:
            return []
        raise KeyError(key)

    @property
    def epochs(self) -> int:
        return len(self["loss"])


def _predict_fn(model: Sequential) -> Compiled:
    return model.compiled(("predict",), lambda: compile(model.graph()))


def _eval_fn(model: Sequential, loss: Loss) -> Compiled:
    return model.compiled(("eval", loss), lambda: compile(model.graph(loss, prediction=True)))


# -- metrics: counted in int64 and summed in float64, whatever the model's dtype ----------


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


def _check_metrics(metrics: Any, Y: torch.Tensor, loss: Loss) -> list[str]:
    """The metrics to report: as asked, or by default accuracy when Y holds class labels."""
    if metrics is None:
        return ["accuracy"] if _is_class_labels(Y, loss.decision) else []
    return _check_metric_names(metrics)


def _check_metric_names(metrics: Any) -> list[str]:
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)) or not all(
            isinstance(m, str) and m in METRICS for m in metrics) or len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics must be a list of distinct metric names from {', '.join(map(repr, METRICS))}, "
                         f"e.g. metrics=['accuracy'], got {metrics!r}")
    return list(metrics)


def _measure(fn: Callable[..., tuple[torch.Tensor, ...]], X: torch.Tensor, Y: torch.Tensor, decision: str,
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


def _class_targets(model: Sequential, Y: Any, what: str = "") -> Any:
    """Integer class labels [N] as targets: one-hot rows for a model with several outputs,
    a 0/1 column for a model with one. Anything else is returned as given, for
    _check_data to judge."""
    if not isinstance(Y, torch.Tensor) or tensor_problem(Y) or Y.is_meta or Y.dtype.is_floating_point \
            or Y.is_complex() or Y.dtype == torch.bool or Y.dim() != 1:
        return Y
    classes = model.out_features
    top = max(classes, 2) - 1
    if len(Y) and not bool(((Y >= 0) & (Y <= top)).all()):
        bad = Y[(Y < 0) | (Y > top)][0].item()
        raise ValueError(f"Y{what} holds class label {bad}, but the model has {classes} output"
                         f"{'s' if classes > 1 else ''}, so labels run from 0 to {top}")
    if classes == 1:
        return Y.to(model._dtype()).unsqueeze(1)
    rows = torch.zeros(len(Y), classes, dtype=model._dtype(), device=Y.device)
    return rows.scatter_(1, Y.long().unsqueeze(1), 1.0)


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
    wanted = {"X": model.input_shape, "Y": model.output_shape}  # of one example
    for name, t in (("X", X), ("Y", Y)):
        if t.dim() != 1 + len(wanted[name]):
            dims = "2-d [examples, features]" if len(wanted[name]) == 1 else \
                f"{1 + len(wanted[name])}-d [examples{''.join(f', {d}' for d in wanted[name])}]"
            raise ValueError(f"{name}{what} must be {dims}, got shape {list(t.shape)}")
    if len(X) != len(Y):
        raise ValueError(f"X{what} has {len(X)} examples but Y{what} has {len(Y)}; give one target per example")
    if len(X) == 0:
        raise ValueError(f"X{what} and Y{what} have no examples")
    if len(wanted["X"]) == 1 and X.shape[1] != model.in_features:
        raise ValueError(f"X{what} has {X.shape[1]} features but the model takes {model.in_features}")
    if len(wanted["Y"]) == 1 and Y.shape[1] != model.out_features:
        raise ValueError(f"Y{what} has {Y.shape[1]} columns but the model outputs {model.out_features}")
    for name, t in (("X", X), ("Y", Y)):
        if tuple(t.shape[1:]) != wanted[name]:
            raise ValueError(f"{name}{what} holds examples of shape {list(t.shape[1:])} but the model "
                             f"{'takes' if name == 'X' else 'outputs'} {list(wanted[name])}")
    for name, t in (("X", X), ("Y", Y)):
        finite = torch.isfinite(t)
        if not bool(finite.all()):  # one pass over the data, once per call: cheap beside training on it
            where = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{name}{what} has NaN or inf values, first at {name}[{', '.join(map(str, where))}] = "
                             f"{t[tuple(where)].item()}; drop or repair those examples (e.g. with torch.isfinite)")


def _check_params(model: Sequential) -> None:
    """Training updates every param in place, so each must hold real values in memory of its own."""
    check_apart(model.state())
    for name, p in model.parameters().items():
        if p.is_meta:
            raise ValueError(f"param {name} is on the meta device, which holds no values to train; "
                             "build the model on 'cpu' or 'cuda' (or load real weights) first")
        check_updatable(f"param {name}", p)
        if not bool(p.isfinite().all()):
            raise ValueError(f"param {name} is NaN or inf before training; re-initialise the model")


@dataclass(frozen=True)
class FitSettings:
    """fit's settings, each checked once, where they are made (`FitSettings.check`), and
    passed on as one value. (`Sequential.fit` documents each.)"""

    loss: Loss
    optimizer: SGD
    schedule: Schedule | None
    epochs: int
    batch_size: int
    shuffle: bool
    validation_data: tuple[torch.Tensor, torch.Tensor] | None
    seed: int | None
    verbose: bool
    metrics: tuple[str, ...] | None  # None until the data chooses (`with_data`)
    threads: int | None
    distributed: bool  # data-parallel, over more than one rank
    checkpoint: str | os.PathLike[str] | None
    resume: str | os.PathLike[str] | None

    @classmethod
    def check(cls, model: Sequential, *, loss: Any, optimizer: Any, schedule: Any, epochs: Any, batch_size: Any,
              shuffle: Any, validation_data: Any, seed: Any, verbose: Any, metrics: Any, threads: Any,
              distributed: Any, checkpoint: Any, resume: Any) -> FitSettings:
        """The settings, after checking each (a ValueError naming the one that is wrong),
        before any data is looked at; defaults filled in (the model's loss, SGD())."""
        if seed is not None:  # the range torch.Generator.manual_seed takes
            seed = whole("seed", seed, -2**63, 2**64 - 1)
        if validation_data is not None and not (isinstance(validation_data, (tuple, list))
                                                and len(validation_data) == 2):
            length = f" of length {len(validation_data)}" if isinstance(validation_data, (tuple, list)) else ""
            raise ValueError(f"validation_data must be a pair (X_val, Y_val), got "
                             f"{type(validation_data).__name__}{length}")
        if schedule is not None and not callable(schedule):
            raise ValueError(f"schedule must be a graphdl schedule such as gd.StepDecay(every=10, factor=0.9), "
                             f"got {schedule!r}")
        for name, path in (("checkpoint", checkpoint), ("resume", resume)):
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"{name} must be a file path or None, got {type(path).__name__}")
        return cls(loss=_model_loss(model, loss),
                   optimizer=checked_optimizer(SGD() if optimizer is None else optimizer),
                   schedule=schedule, epochs=whole("epochs", epochs, 0),
                   batch_size=whole("batch_size", batch_size, 1), shuffle=flag("shuffle", shuffle),
                   validation_data=None if validation_data is None else tuple(validation_data), seed=seed,
                   verbose=flag("verbose", verbose),
                   metrics=None if metrics is None else tuple(_check_metric_names(metrics)),
                   threads=None if threads is None else whole("threads", threads, 1),
                   distributed=_check_distributed(distributed, "fit"), checkpoint=checkpoint, resume=resume)

    def with_data(self, model: Sequential, Y: torch.Tensor) -> FitSettings:
        """The settings for this data: validation targets as the model reads them, and the
        metrics chosen (by default accuracy when Y holds class labels)."""
        validation = self.validation_data
        if validation is not None:
            validation = (validation[0], _class_targets(model, validation[1], " (validation)"))
            _check_data(model, *validation, what=" (validation)")
        metrics = self.metrics if self.metrics is not None else tuple(_check_metrics(None, Y, self.loss))
        return replace(self, validation_data=validation, metrics=metrics)


# Threads. torch splits each op over every core by default, which costs a synchronisation
# per op, and on a busy machine a wait for a core as well. Measured on this project's
# 2-core machine (fit's time per step, 1 vs 2 threads alternated, medians of 9; a tanh
# net 2-w-w-w-1, work = multiply-adds per batch):
#   w=25 batch 20 (the disk net, 26,500):  120 vs 152 us idle; 272 vs 379, 615 vs 1,648 busy
#   w=64 batch 64 (537,000):                211 vs 218 us idle; 505 vs 175,816 (!) busy
#   w=64 batch 256 (2.1 M), w=128 batch 64: 0.87x and 1.15x the 1-thread time, lightly busy
#   w=128 batch 128 (4.2 M):                646 vs 488 us idle (0.75x)
#   w=1024 batch 512 (1.1 G):               91 vs 52 ms idle (0.57x); 131 vs 401 ms busy
# So below SMALL_WORK two threads gain at most ~13 % on an idle machine and lose up to
# hundreds of times on a busy one: `fit`, `predict` and `evaluate` use one thread there,
# and torch's setting above it (`threads=` overrides either), restoring it afterwards.
SMALL_WORK = 4_000_000


def _work(model: Sequential, batch: int) -> int:
    """Multiply-adds of a forward pass over `batch` examples (the matmuls, which dominate).
    Kept with the model's compiled functions, as it depends on what they do: predict pays
    ~20 µs less a call than when it summed the params every time."""
    per_example = model.compiled(("work",), lambda: sum(
        math.prod(t.shape) for t in model.parameters().values() if t.dim() == 2))
    return batch * per_example


@contextlib.contextmanager
def _threads_for(model: Sequential, batch: int, threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (None: one for small work, else torch's setting)."""
    if threads is not None:
        threads = whole("threads", threads, 1)
    elif _work(model, batch) < SMALL_WORK:
        threads = 1
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scheduled_lr(schedule: Schedule | None, epoch: int, base_lr: float) -> float:
    if schedule is None:
        return base_lr
    try:
        lr = schedule(epoch, base_lr)
    except TypeError as e:
        raise ValueError(f"schedule {schedule!r} cannot be called as schedule(epoch, base_lr): {e}") from e
    except OverflowError as e:  # float ** int overflows rather than giving inf
        raise ValueError(f"schedule {schedule!r} overflowed computing the lr for epoch {epoch + 1} ({e}); "
                         "a learning rate must be a finite number >= 0") from None
    try:
        return real("lr", lr, 0.0)
    except ValueError:
        raise ValueError(f"schedule {schedule!r} gave lr={shown(lr)} for epoch {epoch + 1}; "
                         "a learning rate must be a finite number >= 0") from None


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


def _largest(tensors: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """The largest |x| over every element, a 0-d tensor on `device` (0 when there are no
    elements): inf or NaN once any element is, so one number tells whether all are
    finite. One multi-tensor call, ~8 µs for the disk net's params against 94 µs for
    isfinite().all() tensor by tensor."""
    tensors = [t for t in tensors if t.numel()]  # an empty tensor has no largest element
    if not tensors:
        return torch.zeros((), device=device)  # made there: a CPU 0 moved to CUDA would be a host sync
    return torch.stack(torch._foreach_norm(tensors, math.inf)).max()


def _replay(step: TrainStep, start: _Snapshot, feeds: Iterator[tuple[torch.Tensor, ...]],
            batch_loss: Callable[[torch.Tensor], float], lr: float) -> tuple[int, float, bool] | None:
    """Replay an epoch that diverged from its starting state, one checked batch at a time.

    Returns (batch index, its loss, whether it was its update that made params non-finite)
    with the model at the last finite params, or None if the replay stayed finite (the
    model is then back at the epoch's start).
    """
    start.restore()
    before = _Snapshot(start.tensors)
    for b, feed in enumerate(feeds):
        loss = batch_loss(step.forward_backward(*feed))
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


def _model_loss(model: Sequential, loss: Any) -> Loss:
    return checked_loss((model.loss or MSE()) if loss is None else loss)


# Nothing fit makes reaches the user as a tensor (it hands back floats and updates the
# params in place), so the whole loop runs in inference mode: no autograd bookkeeping,
# and params or data that require grad (from a torch model) are fine.
@torch.inference_mode()
def fit(model: Sequential, X: torch.Tensor, Y: torch.Tensor, settings: FitSettings) -> History:
    """`Sequential.fit`, which documents the arguments, with its settings checked."""
    Y = _class_targets(model, Y)
    _check_data(model, X, Y)
    settings = settings.with_data(model, Y)
    _check_params(model)
    with _threads_for(model, settings.batch_size, settings.threads):
        model.loss = settings.loss
        return _Run(model, X, Y, settings).epochs()


class _Run:
    """One fit: the step, the epoch's batches, the scoring functions, the History and the
    shuffling generator, set up (and, with `resume`, restored) once; then the epochs.

    Each epoch runs the step on every batch, then reads the mean loss, the params'
    finiteness and the metrics in one host sync (data-parallel, after one collective for
    the loss and one per data set scored)."""

    def __init__(self, model: Sequential, X: torch.Tensor, Y: torch.Tensor, settings: FitSettings) -> None:
        self.model, self.X, self.Y, self.settings = model, X, Y, settings
        s = settings
        self.step = TrainStep(model, s.loss, s.optimizer, distributed=s.distributed)
        self.batches: Batches = Sharded(len(X), s.batch_size, X, Y) if s.distributed else \
            OneProcess(len(X), s.batch_size, Y)  # Y: the loss's dtype (X may hold indices)
        self.predicting, self.scoring = _predict_fn(model), _eval_fn(model, s.loss)
        self._check_feeds()
        self.history = History(s.metrics)
        resumed = None if s.resume is None else read_checkpoint(s.resume, model, s.optimizer, list(self.history),
                                                                s.validation_data is not None)
        self.generator = self._generator(resumed)
        self.first = 0
        if resumed is not None:
            self.generator.set_state(resumed.rng)
            self.history.update(resumed.history)
            self.first = resumed.epoch
        model.history = self.history  # what fit has recorded so far, kept if it stops early
        # the step binds again if they move; its state is the buffers it updates (BatchNorm's statistics)
        self.start = _Snapshot(lambda: [*self.step.params, *self.step.state, *s.optimizer.buffers])

    def _check_feeds(self) -> None:
        """Dtype and device once, with the graphs' messages, so that each epoch calls the
        compiled functions' unchecked entries (.fn)."""
        self.step.compiled.check_feeds(next(iter(self.batches.feeds(self.X, self.Y, None))), {})
        self.predicting.check_feeds((self.X,), {})
        if self.settings.validation_data is not None:
            self.scoring.check_feeds(tuple(self.settings.validation_data), {})

    def _generator(self, resumed: Resumed | None) -> torch.Generator:
        """The shuffling generator, from the seed every rank shares (rank 0's)."""
        s = self.settings
        seed = s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item())
        agreed = _fit_settings(self.model, self.X, s, resumed)
        seed = self.batches.common_start([*self.model.state().values(), *s.optimizer.buffers], seed, agreed)
        return torch.Generator().manual_seed(seed)

    def epochs(self) -> History:
        for epoch in range(self.first, self.settings.epochs):
            self.epoch(epoch)
        return self.history

    def epoch(self, epoch: int) -> None:
        """Run one epoch, read its numbers in one sync, check them, record them."""
        s, started = self.settings, time.perf_counter()
        lr = _scheduled_lr(s.schedule, epoch, s.optimizer.lr)
        order = torch.randperm(len(self.X), generator=self.generator) if s.shuffle else None
        self.start.save()
        losses = self.batches.run(self.step, self.X, self.Y, order, lr)
        scores = self._scores(losses)
        epoch_loss, largest, *values = torch.cat([v.reshape(-1).double() for v in scores.values()]).tolist()
        if not (math.isfinite(epoch_loss) and math.isfinite(largest)):
            found = _replay(self.step, self.start, self.batches.feeds(self.X, self.Y, order), self.batches.batch_loss,
                            lr)
            raise _diverged(found, epoch, s.epochs, len(self.batches), lr, self.history)
        self.history["loss"].append(epoch_loss)
        for key, value in zip(list(scores)[1:], values, strict=True):
            self.history[key].append(value)
        self.history["lr"].append(lr)
        if s.verbose and self.batches.is_main:
            _report(epoch, s.epochs, self.history, time.perf_counter() - started)
        if s.checkpoint is not None:
            write_checkpoint(s.checkpoint, self.model, s.optimizer, epoch + 1, self.generator, self.history)

    def _scores(self, losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """What an epoch reads in its one host sync: {"loss": [mean loss, a number that is
        finite only while every param is (`Batches.loss_and_finite`)], each metric on the
        training data, "val_loss" and "val_<metric>"}, as tensors on the device."""
        s = self.settings
        scores = {"loss": self.batches.loss_and_finite(losses, _largest(self.step.params, self.X.device))}
        decision, metrics = s.loss.decision, list(s.metrics)
        if metrics:
            measured = _measure(self.predicting.fn, self.X, self.Y, decision, metrics, s.distributed, with_loss=False)
            scores.update((m, measured[m]) for m in metrics)
        if s.validation_data is not None:
            measured = _measure(self.scoring.fn, *s.validation_data, decision, metrics, s.distributed)
            scores.update((f"val_{k}", measured[k]) for k in ("loss", *metrics))
        return scores


def _fit_settings(model: Sequential, X: torch.Tensor, s: FitSettings, resumed: Resumed | None) -> dict[str, int]:
    """What every rank of a data-parallel fit must agree on (else their collectives would not match)."""
    return {"len(X)": len(X), "batch_size": s.batch_size, "epochs": s.epochs, "shuffle": int(s.shuffle),
            "epochs done by the checkpoint": 0 if resumed is None else resumed.epoch,
            "len(validation_data[0])": -1 if s.validation_data is None else len(s.validation_data[0]),
            "number of params": len(model.parameters()),
            "param elements": sum(p.numel() for p in model.parameters().values())}


def _report(epoch: int, epochs: int, history: History, seconds: float) -> None:
    parts = [f"Epoch {epoch + 1}/{epochs}", f"{seconds * 1000:.0f}ms"]
    for key in history:
        if key != "lr" and history[key]:
            parts.append(f"{key}: {history[key][-1]:.4f}")
    parts.append(f"lr: {history['lr'][-1]:.4g}")
    print(" - ".join(parts), file=sys.stdout, flush=True)


def predict(model: Sequential, X: torch.Tensor, threads: int | None = None, distributed: bool = False) -> torch.Tensor:
    """`Sequential.predict`."""
    fn = _predict_fn(model)
    with _threads_for(model, len(X) if isinstance(X, torch.Tensor) and X.dim() else 1, threads):
        if not _check_distributed(distributed, "predict"):
            return fn(x=X)[0]
        first, count = dp.shard(len(X))
        mine = fn(x=X[first:first + count] if count else X[:1])[0]  # an empty share still takes part in the gather
        return dp.gather_rows(mine, len(X))


def evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
             metrics: list[str] | None = None, threads: int | None = None,
             distributed: bool = False) -> dict[str, float]:
    """`Sequential.evaluate`, which documents the arguments."""
    loss = _model_loss(model, loss)
    distributed = _check_distributed(distributed, "evaluate")
    Y = _class_targets(model, Y)
    _check_data(model, X, Y)
    metrics = _check_metrics(metrics, Y, loss)
    with _threads_for(model, len(X), threads):
        return _evaluate(model, X, Y, loss, metrics, distributed)


def _evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss, metrics: list[str],
              distributed: bool = False) -> dict[str, float]:
    scores = _measure(_eval_fn(model, loss), X, Y, loss.decision, metrics, distributed)
    return dict(zip(scores, torch.stack(list(scores.values())).tolist(), strict=True))


def _check_distributed(distributed: Any, what: str) -> bool:
    """Whether to run data-parallel: asked for, and more than one rank (see `dp.spans_processes`)."""
    return flag("distributed", distributed) and dp.spans_processes(f"{what}(distributed=True)")
