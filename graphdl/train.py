"""The fit loop, predict and evaluate for Sequential models.

`fit` builds the training step (forward, loss, backward and update: a `TrainStep`,
see graphdl.step) once, then per epoch shuffles, runs the step on every batch and
records the metrics (graphdl.metrics). The losses stay on the device until the epoch ends, so there is
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
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import distributed as dp
from .batches import Batches, OneProcess, Sharded
from .callbacks import Callback, CallbackList, check_callbacks
from .checkpoint import Resumed, read_checkpoint, write_checkpoint
from .checks import flag, real, shown, tensor_problem, whole
from .compile import Compiled, compile
from .losses import MSE, Loss, Weighted, checked_loss
from .metrics import METRICS as METRICS  # re-exported: gd.train.METRICS predates graphdl.metrics
from .metrics import accuracy as accuracy  # re-exported: gd.train.accuracy and .correct predate graphdl.metrics
from .metrics import check_metric_names, check_metrics_fit, choose_metrics, is_metric, measure
from .metrics import correct as correct
from .monitor import checked_monitor, epoch_values
from .optim import SGD, Optimizer, Schedule, check_apart, check_updatable, checked_optimizer
from .step import TrainStep

if TYPE_CHECKING:
    from .model import Sequential


class History(dict):
    """Per-epoch lists: "loss", one per metric ("accuracy", "mse", ...), "val_loss" and
    "val_<metric>" (empty without validation data), and "lr" (the epoch's rate; with a
    per-step schedule, the rate of the epoch's first step).

    "loss" is the mean training loss over the epoch's batches (as the optimizer saw them);
    the metrics are measured on the whole training set at the end of the epoch. A metric
    that was not measured reads as an empty list, as "val_loss" does without validation data.
    With `fit(..., monitor=[...])`, one list per monitored value and layer too, such as
    "grad_norm/2:Linear" (see graphdl.monitor).
    """

    def __init__(self, metrics: list[str] | tuple[str, ...] = ("accuracy",)) -> None:
        super().__init__(loss=[], **{m: [] for m in metrics}, val_loss=[], **{f"val_{m}": [] for m in metrics}, lr=[])

    def __missing__(self, key: str) -> list:
        if isinstance(key, str) and is_metric(key.removeprefix("val_")):
            return []
        raise KeyError(key)

    @property
    def epochs(self) -> int:
        return len(self["loss"])


def _predict_fn(model: Sequential) -> Compiled:
    return model.compiled(("predict",), lambda: compile(model.graph()))


def _eval_fn(model: Sequential, loss: Loss) -> Compiled:
    return model.compiled(("eval", loss), lambda: compile(model.graph(loss, prediction=True)))


def _class_targets(model: Sequential, Y: Any, what: str = "") -> Any:
    """Integer class labels [N] as targets: one-hot rows for a model with several outputs,
    a 0/1 column for a model with one. Anything else is returned as given, for
    _check_data to judge."""
    if not _is_label_vector(Y):
        return Y
    classes = model.out_features
    _check_labels(Y, classes, what)
    if classes == 1:
        return Y.to(model.dtype()).unsqueeze(1)
    rows = torch.zeros(len(Y), classes, dtype=model.dtype(), device=Y.device)
    return rows.scatter_(1, Y.long().unsqueeze(1), 1.0)


def _is_label_vector(Y: Any) -> bool:
    """Whether Y is a dense 1-d tensor of integers with values: class labels [N]."""
    return not (not isinstance(Y, torch.Tensor) or tensor_problem(Y) or Y.is_meta or Y.dtype.is_floating_point
                or Y.is_complex() or Y.dtype == torch.bool or Y.dim() != 1)


def _check_labels(Y: torch.Tensor, classes: int, what: str) -> None:
    """Each label names one of the model's `classes` outputs (0 or 1 for a single output)."""
    top = max(classes, 2) - 1
    if len(Y) and not bool(((Y >= 0) & (Y <= top)).all()):
        bad = Y[(Y < 0) | (Y > top)][0].item()
        raise ValueError(f"Y{what} holds class label {bad}, but the model has {classes} output"
                         f"{'s' if classes > 1 else ''}, so labels run from 0 to {top}")


def _check_data(model: Sequential, X: Any, Y: Any, what: str = "") -> None:
    for name, t in (("X", X), ("Y", Y)):
        _check_data_tensor(name, t, what)
    wanted = {"X": model.input_shape, "Y": model.output_shape}  # of one example
    for name, t in (("X", X), ("Y", Y)):
        _check_rank(name, t, what, wanted[name])
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
        _check_finite(name, t, what)


def _check_data_tensor(name: str, t: Any, what: str) -> None:
    """X or Y is a dense tensor of real values in memory."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}{what} must be a torch.Tensor, got {type(t).__name__}")
    problem = tensor_problem(t)
    if problem:
        raise ValueError(f"{name}{what} {problem}")
    if t.is_meta:
        raise ValueError(f"{name}{what} is on the meta device, which holds shapes but no values; "
                         "training and evaluating need real data (on 'cpu' or 'cuda')")


def _check_rank(name: str, t: torch.Tensor, what: str, example: tuple) -> None:
    """X or Y holds examples of the model's rank: rows [examples, features] for a 2-d model."""
    if t.dim() != 1 + len(example):
        dims = "2-d [examples, features]" if len(example) == 1 else \
            f"{1 + len(example)}-d [examples{''.join(f', {d}' for d in example)}]"
        raise ValueError(f"{name}{what} must be {dims}, got shape {list(t.shape)}")


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):  # one pass over the data, once per call: cheap beside training on it
        where = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name}{what} has NaN or inf values, first at {name}[{', '.join(map(str, where))}] = "
                         f"{t[tuple(where)].item()}; drop or repair those examples (e.g. with torch.isfinite)")


def _check_params(model: Sequential) -> None:
    """Training updates every param in place, so each must hold real values in memory of its own."""
    check_apart(model.state())
    trained = model.parameters()
    for name, t in model.state().items():  # buffers too: a NaN std would read as a diverged learning rate
        if not t.is_meta and t.dtype.is_floating_point and not bool(t.isfinite().all()):
            kind = "param" if name in trained else "buffer"
            raise ValueError(f"{kind} {name} is NaN or inf before training; re-initialise the model"
                             + ("" if kind == "param" else " (for Standardize: adapt it again)"))
    for name, p in model.parameters().items():
        if p.is_meta:
            raise ValueError(f"param {name} is on the meta device, which holds no values to train; "
                             "build the model on 'cpu' or 'cuda' (or load real weights) first")
        check_updatable(f"param {name}", p)


@dataclass(frozen=True)
class FitSettings:
    """fit's settings, each checked once, where they are made (`FitSettings.check`), and
    passed on as one value. (`Sequential.fit` documents each.)"""

    loss: Loss
    optimizer: Optimizer
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
    callbacks: tuple[Callback, ...] = ()
    sample_weight: torch.Tensor | None = None  # each training example's weight in the loss, [N]
    class_weight: dict[int, float] | None = None  # each class's weight in the loss (times sample_weight)
    validation_weights: torch.Tensor | None = None  # validation_data's third member, if it has one
    validation_split: float = 0.0  # the last fraction of the rows, held out (`with_data` does it)
    clip_norm: float | None = None  # the gradients' global L2 norm at most this (torch's clip_grad_norm_)
    clip_value: float | None = None  # each gradient element within +-this
    accumulate: int = 1  # batches per update
    monitor: tuple[str, ...] = ()  # graphdl.monitor's names: per-layer gradient health in History

    @classmethod
    def check(cls, model: Sequential, *, loss: Any, optimizer: Any, schedule: Any, epochs: Any, batch_size: Any,
              shuffle: Any, validation_data: Any, seed: Any, verbose: Any, metrics: Any, threads: Any,
              distributed: Any, checkpoint: Any, resume: Any, callbacks: Any = None,
              validation_split: Any = 0.0, clip_norm: Any = None, clip_value: Any = None,
              accumulate: Any = 1, sample_weight: Any = None, class_weight: Any = None,
              monitor: Any = None) -> FitSettings:
        """The settings, after checking each (a ValueError naming the one that is wrong),
        before any data is looked at; defaults filled in (the model's loss, SGD())."""
        if seed is not None:  # the range torch.Generator.manual_seed takes
            seed = whole("seed", seed, -2**63, 2**64 - 1)
        _check_validation_data(validation_data)
        if schedule is not None and not callable(schedule):
            raise ValueError(f"schedule must be a graphdl schedule such as gd.StepDecay(every=10, factor=0.9), "
                             f"got {schedule!r}")
        validation_split = real("validation_split", validation_split, 0.0, 1.0, high_open=True)
        if validation_split and validation_data is not None:
            raise ValueError("give validation_data or validation_split, not both: validation_split holds out the last "
                             f"{validation_split:.0%} of X and Y as the validation data")
        for name, path in (("checkpoint", checkpoint), ("resume", resume)):
            _check_path(name, path)
        monitor = checked_monitor(monitor)
        distributed = _check_distributed(distributed, "fit")
        if monitor and distributed:  # a rank's dead units are of its share: the History would differ by rank
            raise ValueError("monitor= is not available with distributed=True yet; monitor a one-process run")
        return cls(loss=_model_loss(model, loss),
                   optimizer=checked_optimizer(SGD() if optimizer is None else optimizer),
                   schedule=schedule, epochs=whole("epochs", epochs, 0),
                   batch_size=whole("batch_size", batch_size, 1), shuffle=flag("shuffle", shuffle),
                   validation_data=None if validation_data is None else tuple(validation_data[:2]), seed=seed,
                   verbose=flag("verbose", verbose),
                   metrics=None if metrics is None else tuple(check_metric_names(metrics)),
                   threads=None if threads is None else whole("threads", threads, 1),
                   distributed=distributed, checkpoint=checkpoint, resume=resume,
                   callbacks=check_callbacks(callbacks), validation_split=validation_split,
                   sample_weight=_check_sample_weight(sample_weight), class_weight=_check_class_weight(class_weight),
                   validation_weights=None if validation_data is None or len(validation_data) == 2 else
                   _check_sample_weight(validation_data[2], "validation_data's sample weights"),
                   clip_norm=_clip("clip_norm", clip_norm), clip_value=_clip("clip_value", clip_value),
                   accumulate=whole("accumulate", accumulate, 1), monitor=monitor)

    def with_data(self, model: Sequential, Y: torch.Tensor) -> FitSettings:
        """The settings for this data: validation targets as the model reads them, and the
        metrics chosen (by default accuracy when Y holds class labels)."""
        validation = self.validation_data
        if validation is not None:
            validation = (validation[0], _class_targets(model, validation[1], " (validation)"))
            _check_data(model, *validation, what=" (validation)")
        metrics = self.metrics if self.metrics is not None else tuple(choose_metrics(None, Y, self.loss))
        check_metrics_fit(list(metrics), Y, "Y", self.loss.decision)
        if validation is not None:
            check_metrics_fit(list(metrics), validation[1], "the validation targets", self.loss.decision)
        settings = replace(self, validation_data=validation, metrics=metrics)
        if not self.monitor:  # (with monitor, once the step names its layers: _Run)
            settings.check_callbacks()
        return settings

    def check_callbacks(self, monitored: list[str] | tuple[str, ...] = ()) -> None:
        """Each callback's check against the keys the epochs' logs will have (the metrics
        chosen: after `with_data`), and the monitor's per-layer keys `monitored`."""
        metrics = self.metrics or ()
        keys = ["loss", *metrics, *(["val_loss", *(f"val_{m}" for m in metrics)]
                                    if self.validation_data is not None else []), "lr", *monitored]
        for c in self.callbacks:
            c.check(keys)


def _check_sample_weight(weights: Any, what: str = "sample_weight") -> torch.Tensor | None:
    """A 1-d tensor of finite weights >= 0 (one per example; its length is checked with the data)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or not weights.dtype.is_floating_point:
        raise ValueError(f"{what} must be a 1-d float tensor, one weight per example, got "
                         f"{_shown_data(weights)}")
    if not bool((weights.isfinite() & (weights >= 0)).all()):
        raise ValueError(f"{what} must be finite and >= 0 (a weight of 0 leaves an example out)")
    return weights


def _check_class_weight(weights: Any) -> dict[int, float] | None:
    """{class: weight}: whole classes >= 0 (checked against the model's with the data), finite weights >= 0."""
    if weights is None:
        return None
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"class_weight must be a dict {{class: weight}} such as {{0: 1.0, 1: 5.0}}, got {weights!r}")
    return {whole("a class_weight key (a class)", k, 0): real(f"class_weight[{k!r}]", v, 0.0)
            for k, v in weights.items()}


def _shown_data(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-d {value.dtype} tensor"
    return type(value).__name__


def example_weights(Y: torch.Tensor, decision: str, sample_weight: torch.Tensor | None,
                    class_weight: dict[int, float] | None, what: str = "") -> torch.Tensor | None:
    """Each example's weight [N, 1] in Y's dtype (sample_weight times its class's
    class_weight; a class without one weighs 1), or None without either."""
    if sample_weight is None and class_weight is None:
        return None
    weights = torch.ones(len(Y), dtype=torch.float64, device=Y.device)
    if sample_weight is not None:
        if len(sample_weight) != len(Y):
            raise ValueError(f"sample_weight{what} has {len(sample_weight)} weights for {len(Y)} examples; give one "
                             "per example")
        weights = weights * sample_weight.to(Y.device, torch.float64)
    if class_weight is not None:
        weights = weights * _class_weights(Y, decision, class_weight, what)
    return weights.to(Y.dtype).reshape(-1, 1)


def _class_weights(Y: torch.Tensor, decision: str, class_weight: dict[int, float], what: str) -> torch.Tensor:
    if decision == "logit" and Y.shape[-1] > 1:
        raise ValueError("class_weight weighs one class per example, but these outputs are independent yes/no labels "
                         "(BCEWithLogits); give sample_weight instead")
    classes = max(Y.shape[-1], 2)  # one output: classes 0 and 1
    unknown = sorted(k for k in class_weight if k >= classes)
    if unknown:
        raise ValueError(f"class_weight has a weight for class {unknown[0]}, but the model has classes 0 to "
                         f"{classes - 1}")
    labels = Y.argmax(-1) if Y.shape[-1] > 1 else (Y[:, 0] > 0.5).long()
    table = torch.ones(classes, dtype=torch.float64, device=Y.device)
    for k, w in class_weight.items():
        table[k] = w
    return table[labels]


def _check_validation_data(validation_data: Any) -> None:
    if validation_data is not None and not (isinstance(validation_data, (tuple, list))
                                            and len(validation_data) in (2, 3)):
        length = f" of length {len(validation_data)}" if isinstance(validation_data, (tuple, list)) else ""
        raise ValueError(f"validation_data must be a pair (X_val, Y_val) or a triple (X_val, Y_val, weights), got "
                         f"{type(validation_data).__name__}{length}")


def _check_path(name: str, path: Any) -> None:
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} must be a file path or None, got {type(path).__name__}")


def _clip(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if real(name, value, 0.0) == 0:
        raise ValueError(f"{name} must be > 0, or None for no clipping; got {shown(value)}")
    return float(value)


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


def _scheduled_lr(schedule: Schedule | None, epoch: int, base_lr: float, unit: str = "epoch") -> float:
    if schedule is None:
        return base_lr
    try:
        lr = schedule(epoch, base_lr)
    except TypeError as e:
        raise ValueError(f"schedule {schedule!r} cannot be called as schedule({unit}, base_lr): {e}") from e
    except OverflowError as e:  # float ** int overflows rather than giving inf
        raise ValueError(f"schedule {schedule!r} overflowed computing the lr for {unit} {epoch + 1} ({e}); "
                         "a learning rate must be a finite number >= 0") from None
    try:
        return real("lr", lr, 0.0)
    except ValueError:
        raise ValueError(f"schedule {schedule!r} gave lr={shown(lr)} for {unit} {epoch + 1}; "
                         "a learning rate must be a finite number >= 0") from None


def _epoch_lr(schedule: Schedule | None, epoch: int, steps: int, base_lr: float) -> float | list[float]:
    """The epoch's rate, or for a per-step schedule (`per == "step"`) each of its steps'."""
    if getattr(schedule, "per", "epoch") != "step":
        return _scheduled_lr(schedule, epoch, base_lr)
    return [_scheduled_lr(schedule, epoch * steps + k, base_lr, "step") for k in range(steps)]


class DivergedError(FloatingPointError):
    """`fit` stopped because the loss (or a param) stopped being finite.

    The model keeps its last finite params. `history` holds the completed epochs (it is
    also `model.history`); `epoch` and `batch` count from 1, as the progress lines do.
    `node` (`"%12"`), `op`, `layer` and `where` name the first non-finite value, found
    by replaying the batch node by node (`source`, a `graphdl.numerics.NonFinite`, has
    its inputs' ranges too); None where it is not known (data-parallel runs, or a
    replay that stayed finite).
    """

    def __init__(self, message: str, history: History, epoch: int, batch: int | None,
                 source: Any = None) -> None:
        super().__init__(message)
        self.history, self.epoch, self.batch, self.source = history, epoch, batch, source
        self.node = None if source is None or source.node < 0 else f"%{source.node}"
        self.op = None if source is None else source.op
        self.layer = None if source is None else source.layer or None
        self.where = None if source is None else source.where or None


# Divergence is found without a host sync per batch. Reading each batch's loss
# (`.item()`) would cost ~10 us a step, as much as the step itself on a tiny net. Instead
# fit copies the params and optimizer state at each epoch's start (a few small copies
# per epoch), checks the epoch's mean loss and the params once, at the sync the epoch
# already pays for its loss, and only after a divergence replays that epoch from the
# copy one batch at a time, reading every loss, to name the batch and stop at the last
# finite params. The replay runs the same kernels on the same batches in the same order,
# so it meets the same non-finite value. That batch is then run once more through the
# step's graph with a check after every node (graphdl.numerics), to name the node.


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


class _Found(NamedTuple):
    """The batch a replay found: its index, its loss, whether it was its update that made
    params non-finite (then `bad` lists them by index), its feed and its rate."""

    batch: int
    loss: float
    update: bool
    feed: tuple[torch.Tensor, ...]
    bad: tuple[int, ...] = ()
    lr: float = 0.0


def _replay(step: TrainStep, start: _Snapshot, feeds: Iterator[tuple[torch.Tensor, ...]],
            batch_loss: Callable[[torch.Tensor], float], lr: float | list[float],
            sizes: list[int]) -> _Found | None:
    """Replay an epoch that diverged from its starting state, one checked batch at a time.

    Returns the batch found, with the model at the last finite params (those the batch
    started from), or None if the replay stayed finite (the model is then back at the
    epoch's start).
    """
    start.restore()
    step.discard_accumulated()
    before = _Snapshot(start.tensors)
    update = 0
    for b, (feed, mark) in enumerate(zip(feeds, step.marks(sizes))):
        rate = lr[update] if isinstance(lr, list) else lr
        loss = batch_loss(step.forward_backward(*feed))
        if not math.isfinite(loss):  # the params that gave it are finite: the last update was checked
            return _Found(b, loss, False, feed, (), rate)
        before.save()
        step.apply(rate, mark)
        update += mark[1]
        if not math.isfinite(float(_largest(step.params))):
            bad = tuple(i for i, p in enumerate(step.params) if not bool(p.isfinite().all()))
            before.restore()
            return _Found(b, loss, True, feed, bad, rate)
    start.restore()
    return None


def _source(step: TrainStep, found: _Found | None) -> Any:
    """The first non-finite value of the batch `found`, replayed node by node from the
    params (and buffers) it started from (graphdl.numerics); for an update that
    overflowed from finite gradients, the gradient of the first param it made non-finite.
    None if not found."""
    if found is None:
        return None
    from . import numerics  # only after a divergence
    graph = step.compiled.graph
    source, outputs = numerics.first_nonfinite(graph, found.feed)
    if source is None and found.bad and outputs:
        names = list(step.model.parameters())
        source = numerics.overflowed_update(graph, outputs, names[found.bad[0]], found.lr,
                                            type(step.optimizer).__name__, step.accumulate)
    return source


def _diverged(found: _Found | None, epoch: int, epochs: int, batches: int, lr: float,
              history: History, source: Any = None) -> DivergedError:
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
    origin = f"\n  {source.describe()}." if source is not None else ""
    specific = f"\n  hint: {source.hint}" if source is not None and source.hint else ""
    message = (f"{what}.{origin}\n  {done} on this error's .history and on model.history.{specific}"
               f"\n  hint: lower the learning rate (e.g. lr={lr / 10:g}) or scale the inputs and targets "
               "to about [-1, 1]")
    return DivergedError(message, history, epoch + 1, None if found is None else found[0] + 1, source)


def _model_loss(model: Sequential, loss: Any) -> Loss:
    return checked_loss((model.loss or MSE()) if loss is None else loss)


# Nothing fit makes reaches the user as a tensor (it hands back floats and updates the
# params in place), so the whole loop runs in inference mode: no autograd bookkeeping,
# and params or data that require grad (from a torch model) are fine.
@torch.inference_mode()
def fit(model: Sequential, X: torch.Tensor, Y: torch.Tensor, settings: FitSettings) -> History:
    """`Sequential.fit`, which documents the arguments, with its settings checked."""
    if settings.validation_split:
        X, Y, held_out = _split_off_validation(X, Y, settings.validation_split)
        settings = replace(settings, validation_data=held_out)
    Y = _class_targets(model, Y)
    _check_data(model, X, Y)
    settings = settings.with_data(model, Y)
    weights = example_weights(Y, settings.loss.decision, settings.sample_weight, settings.class_weight)
    _check_params(model)
    _check_steps(model, len(X), settings)
    with _threads_for(model, settings.batch_size, settings.threads):
        model.loss = settings.loss
        return _Run(model, X, Y, settings, weights).epochs()


def _check_steps(model: Sequential, n: int, s: FitSettings) -> None:
    """Name a layer that cannot train on the smallest step fit will take (BatchNorm on one
    value per channel), before training: the last batch, or data-parallel a rank's share
    of it (an empty share feeds one row of zeros)."""
    world = dp.world_size() if s.distributed else 1
    sizes = {min(s.batch_size, n), n % s.batch_size or s.batch_size}
    rows = min(max(part, 1) for size in sizes for part in dp.split(size, world))
    for k, layer, shape in model.layer_inputs():
        problem = layer.batch_error(rows, shape)
        if problem:
            where = f" (each rank's share of a batch of {min(sizes)})" if world > 1 else \
                f" (the last batch of the {n} rows)" if n % s.batch_size else ""
            raise ValueError(f"layer {k} ({layer!r}) {problem}{where}; choose a batch_size that leaves no such step, "
                             f"or drop a few rows")


def _split_off_validation(X: Any, Y: Any, fraction: float) -> tuple[Any, Any, tuple[Any, Any]]:
    """(X_train, Y_train, (X_val, Y_val)): the last `fraction` of the rows held out, as
    Keras does (unshuffled: shuffle the data first if its order means something)."""
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor) or not X.dim() or not Y.dim() \
            or len(X) != len(Y):
        return X, Y, (X, Y)  # _check_data names what is wrong with them
    keep = math.floor(len(X) * (1.0 - fraction))
    if keep == 0 or keep == len(X):
        raise ValueError(f"validation_split={fraction} of {len(X)} rows leaves {keep} to train on and "
                         f"{len(X) - keep} to validate; each needs at least one")
    return X[:keep], Y[:keep], (X[keep:], Y[keep:])


class _Run:
    """One fit: the step, the epoch's batches, the scoring functions, the History and the
    shuffling generator, set up (and, with `resume`, restored) once; then the epochs.

    Each epoch runs the step on every batch, then reads the mean loss, the params'
    finiteness and the metrics in one host sync (data-parallel, after one collective for
    the loss and one per data set scored)."""

    def __init__(self, model: Sequential, X: torch.Tensor, Y: torch.Tensor, settings: FitSettings,
                 weights: torch.Tensor | None = None) -> None:
        # Weighted, the step's targets carry each example's weight as a last column (losses.Weighted),
        # so the batches, ranks and replays carry them; the metrics compare with the targets alone.
        self.targets = Y
        loss = settings.loss if weights is None else Weighted(settings.loss)
        Y = Y if weights is None else torch.cat([Y, weights], -1)
        self.model, self.X, self.Y, self.settings = model, X, Y, settings
        s = settings
        self.validation = None if s.validation_data is None else _validation(model, s)
        self.step = TrainStep(model, loss, s.optimizer, distributed=s.distributed, clip_norm=s.clip_norm,
                              clip_value=s.clip_value, accumulate=s.accumulate, monitor=s.monitor)
        self.batches: Batches = Sharded(len(X), s.batch_size, X, Y) if s.distributed else \
            OneProcess(len(X), s.batch_size, Y)  # Y: the loss's dtype (X may hold indices)
        self.predicting = _predict_fn(model)
        self.scoring = None if self.validation is None else _eval_fn(model, self.validation[3])
        self._check_feeds()
        self.history = History(s.metrics)
        if s.monitor:  # its per-layer series, such as "grad_norm/2:Linear"
            monitored = self.step.take_monitored().keys(s.monitor)
            s.check_callbacks(monitored)
            self.history.update((key, []) for key in monitored)
        resumed = None if s.resume is None else read_checkpoint(s.resume, model, s.optimizer, list(self.history),
                                                                s.validation_data is not None)
        self.generator = self._generator(resumed)
        self.first = 0
        if resumed is not None:
            self.generator.set_state(resumed.rng)
            self.history.update(resumed.history)
            self.first = resumed.epoch
        model.history = self.history  # what fit has recorded so far, kept if it stops early
        self.callbacks = CallbackList(s.callbacks, model, s.optimizer, self.batches.is_main)
        self.resumed = resumed
        if resumed is not None:  # before any callback opens a file or forgets a state
            self.callbacks.check_resumable(resumed.callbacks, str(s.resume))
        self.updates = -(-len(self.batches) // s.accumulate)  # per epoch: what a per-step schedule counts
        if getattr(s.schedule, "per", "epoch") == "step" and s.epochs > self.first:  # its last rate, before any epoch
            _scheduled_lr(s.schedule, s.epochs * self.updates - 1, s.optimizer.lr, "step")
        # (called at each save: the step binds again if the tensors move; its state is the buffers it
        # updates, BatchNorm's running statistics and Dropout's key)
        self.start = _Snapshot(lambda: [*self.step.params, *self.step.state, *s.optimizer.state_tensors()])

    def _check_feeds(self) -> None:
        """Dtype and device once, with the graphs' messages, so that each epoch calls the
        compiled functions' unchecked entries (.fn)."""
        self.step.compiled.check_feeds(next(iter(self.batches.feeds(self.X, self.Y, None))), {})
        self.predicting.check_feeds((self.X,), {})
        if self.validation is not None:
            self.scoring.check_feeds(self.validation[:2], {})

    def _generator(self, resumed: Resumed | None) -> torch.Generator:
        """The shuffling generator, from the seed every rank shares (rank 0's)."""
        s = self.settings
        seed = s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item())
        agreed = _fit_settings(self.model, self.X, s, resumed)
        seed = self.batches.common_start([*self.model.state().values(), *s.optimizer.state_tensors()], seed, agreed)
        return torch.Generator().manual_seed(seed)

    def epochs(self) -> History:
        self.model.stop_training = False
        r = self.resumed
        self.callbacks.train_begin(self.logs(), *((r.callbacks, r.callback_tensors, str(self.settings.resume))
                                                  if r is not None else ()))
        try:
            for epoch in range(self.first, self.settings.epochs):
                if self.model.stop_training:  # after an epoch, or as a resumed callback said (EarlyStopping)
                    break
                self.callbacks.epoch_begin(epoch, self.logs())
                self.epoch(epoch)
                self.callbacks.epoch_end(epoch, self.logs())
                if self.settings.checkpoint is not None:  # after the callbacks: their state of this epoch too
                    write_checkpoint(self.settings.checkpoint, self.model, self.settings.optimizer, epoch + 1,
                                     self.generator, self.history, self.callbacks.states())
        except DivergedError:
            # The callbacks end training as after a last epoch: EarlyStopping(restore_best_weights=True)
            # puts back its best epoch's weights, which are better than the last finite ones.
            self.callbacks.train_end(self.logs())
            raise
        finally:
            self.callbacks.close()  # a CSV file, a TensorBoard writer: closed however fit ends
        self.callbacks.train_end(self.logs())
        return self.history

    def logs(self) -> dict[str, float]:
        """The last epoch's numbers, as the callbacks see them ({} before the first)."""
        return {key: values[-1] for key, values in self.history.items() if values}

    def epoch(self, epoch: int) -> None:
        """Run one epoch, read its numbers in one sync, check them, record them."""
        s, started = self.settings, time.perf_counter()
        lr = _epoch_lr(s.schedule, epoch, self.updates, s.optimizer.lr)
        first = lr[0] if isinstance(lr, list) else lr  # what History["lr"] records of a per-step schedule
        order = torch.randperm(len(self.X), generator=self.generator) if s.shuffle else None
        self.start.save()
        losses = self._logged(order, lr) if self.callbacks.batch_logs else \
            self.batches.run(self.step, self.X, self.Y, order, lr)
        scores = self._scores(losses)
        if s.monitor:  # read in the same sync as the loss
            scores.update(epoch_values(self.step.take_monitored(), s.monitor))
        epoch_loss, largest, *values = torch.cat([v.reshape(-1).double() for v in scores.values()]).tolist()
        if not (math.isfinite(epoch_loss) and math.isfinite(largest)):
            found = _replay(self.step, self.start, self.batches.feeds(self.X, self.Y, order), self.batches.batch_loss,
                            lr, self.batches.sizes)
            # Data-parallel, a rank's first non-finite node may differ from another's, and the
            # search would run collectives a rank that stopped early never joins: not searched.
            source = None if s.distributed else _source(self.step, found)
            raise _diverged(found, epoch, s.epochs, len(self.batches), first, self.history, source)
        self.history["loss"].append(epoch_loss)
        for key, value in zip(list(scores)[1:], values, strict=True):
            self.history[key].append(value)
        self.history["lr"].append(first)
        if s.verbose and self.batches.is_main:
            _report(epoch, s.epochs, self.history, time.perf_counter() - started)


    def _logged(self, order: torch.Tensor | None, lr: float | list[float]) -> torch.Tensor:
        """The epoch's steps (uncaptured), each batch's loss read after its step and given
        to the callbacks that asked for batch logs (a host sync per step)."""
        def log(k: int, loss: torch.Tensor) -> None:
            self.callbacks.batch_end(k, {"loss": self.batches.batch_loss(loss)})
        feeds = self.batches.feeds(self.X, self.Y, order)
        return torch.stack(self.step.steps(feeds, lr, self.batches.sizes, after=log))

    def _scores(self, losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """What an epoch reads in its one host sync: {"loss": [mean loss, a number that is
        finite only while every param is (`Batches.loss_and_finite`)], each metric on the
        training data, "val_loss" and "val_<metric>"}, as tensors on the device."""
        s = self.settings
        scores = {"loss": self.batches.loss_and_finite(losses, _largest(self.step.params, self.X.device))}
        decision, metrics = s.loss.decision, list(s.metrics)
        if metrics:
            measured = measure(self.predicting.fn, self.X, self.targets, decision, metrics, s.distributed,
                               with_loss=False)
            scores.update((m, measured[m]) for m in metrics)
        if self.validation is not None:
            X_val, fed, targets, _ = self.validation
            measured = measure(self.scoring.fn, X_val, fed, decision, metrics, s.distributed, targets=targets)
            scores.update((f"val_{k}", measured[k]) for k in ("loss", *metrics))
        return scores


def _validation(model: Sequential, s: FitSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Loss]:
    """(X_val, what the scoring graph is fed, the targets, its loss): weighted by
    validation_data's third member if it has one (as Keras, not by the training weights)."""
    X_val, targets = s.validation_data
    weights = example_weights(targets, s.loss.decision, s.validation_weights, None, " (validation)")
    if weights is None:
        return X_val, targets, targets, s.loss
    return X_val, torch.cat([targets, weights], -1), targets, Weighted(s.loss)


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
        if key != "lr" and "/" not in key and history[key]:  # a monitor's per-layer series are left out
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
             distributed: bool = False, sample_weight: torch.Tensor | None = None) -> dict[str, float]:
    """`Sequential.evaluate`, which documents the arguments."""
    loss = _model_loss(model, loss)
    distributed = _check_distributed(distributed, "evaluate")
    Y = _class_targets(model, Y)
    _check_data(model, X, Y)
    metrics = choose_metrics(metrics, Y, loss)
    check_metrics_fit(metrics, Y, "Y", loss.decision)
    weights = example_weights(Y, loss.decision, _check_sample_weight(sample_weight), None)
    with _threads_for(model, len(X), threads):
        if weights is None:
            return _evaluate(model, X, Y, loss, metrics, distributed)
        fed = torch.cat([Y, weights], -1)
        scores = measure(_eval_fn(model, Weighted(loss)), X, fed, loss.decision, metrics, distributed, targets=Y)
        return dict(zip(scores, torch.stack(list(scores.values())).tolist(), strict=True))


def _evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss, metrics: list[str],
              distributed: bool = False) -> dict[str, float]:
    scores = measure(_eval_fn(model, loss), X, Y, loss.decision, metrics, distributed)
    return dict(zip(scores, torch.stack(list(scores.values())).tolist(), strict=True))


def _check_distributed(distributed: Any, what: str) -> bool:
    """Whether to run data-parallel: asked for, and more than one rank (see `dp.spans_processes`)."""
    return flag("distributed", distributed) and dp.spans_processes(f"{what}(distributed=True)")
