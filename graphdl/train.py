"""The fit loop, predict and evaluate, for any model with Sequential's methods.

`fit` builds the training step (forward, loss, backward and update: a `TrainStep`,
see graphdl.step) once, then per epoch shuffles, runs the step on every batch and
records the metrics (graphdl.metrics). The losses stay on the device until the epoch
ends, so there is one host sync per epoch, not per batch. Its settings and the data's
checks are graphdl.settings'; a diverged epoch's replay is graphdl.divergence's.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from . import distributed as dp
from .batches import Batches, OneProcess, Sharded
from .callbacks import CallbackList
from .checkpoint import Resumed, read_checkpoint, write_checkpoint
from .checks import real, shown, whole
from .compile import Compiled, compile
from .divergence import DivergedError as DivergedError  # re-exported: gd.train.DivergedError predates it
from .divergence import Snapshot, diverged, find_source, magnitude, replay
from .losses import Loss, Weighted, adds_up_by_rows
from .metrics import METRICS as METRICS  # re-exported: gd.train.METRICS predates graphdl.metrics
from .metrics import accuracy as accuracy  # re-exported: gd.train.accuracy and .correct predate graphdl.metrics
from .metrics import check_metrics_fit, choose_metrics, is_metric, measure
from .metrics import correct as correct
from .monitor import epoch_values
from .optim import Schedule
from .settings import FitSettings as FitSettings  # re-exported: Sequential.fit builds it as train.FitSettings
from .settings import (
    check_data,
    check_distributed,
    check_params,
    check_sample_weight,
    check_shares,
    class_targets,
    example_weights,
    model_loss,
)
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


# Whole data sets (fit's metrics and validation, evaluate, predict) run through the
# compiled graph in chunks of rows whose widest value takes about CHUNK_BYTES, so that a
# chunk's values stay in the core's caches and reuse freed memory, where a whole set's
# are each fresh memory, touched page by page. One thread of the Zen 5 EPYC (the script in
# docs/performance.md, "Whole data sets in chunks"): the digits CNN's prediction of 20,000
# rows 5.7-6.1x as fast, a 784-512-512-10 MLP's of 60,000 1.22-1.29x, the 1024-wide bench
# net's of 4,096 0.96-1.10x. 2 MiB: 512-row chunks of the CNN and 1,024 of the MLP were
# the fastest sizes tried. Below MIN_CHUNK_ROWS, a chunk's own calls would cost more.
CHUNK_BYTES = 2 << 20
MIN_CHUNK_ROWS = 16


def chunk_rows(model: Any, compiled: Compiled) -> int | None:
    """How many rows of a data set `compiled` (one of `model`'s inference graphs) takes at
    a time, or None for all at once: where the model does not say its rows are apart
    (`Sequential.rows_apart`), its graph has no symbolic batch dim, or it runs on a GPU
    (whose caching allocator reuses memory, and which takes large batches best; not
    measured there)."""
    graph = compiled.graph
    if not getattr(model, "rows_apart", False) or not graph.inputs:
        return None
    if compiled.device is not None and compiled.device.type != "cpu":
        return None
    batch = next(iter(graph.inputs.values())).shape[0]
    if not isinstance(batch, str):
        return None
    widest = max((math.prod(v.shape[1:]) * v.dtype.itemsize for v in (node.out for node in graph.nodes)
                  if v.shape and v.shape[0] == batch and all(isinstance(d, int) for d in v.shape[1:])), default=0)
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // widest) if widest else None


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
def threads_for(model: Sequential, batch: int, threads: int | None) -> Iterator[None]:
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


# Nothing fit makes reaches the user as a tensor (it hands back floats and updates the
# params in place), so the whole loop runs in inference mode: no autograd bookkeeping,
# and params or data that require grad (from a torch model) are fine.
@torch.inference_mode()
def fit(model: Sequential, X: torch.Tensor, Y: torch.Tensor, settings: FitSettings) -> History:
    """`Sequential.fit`, which documents the arguments, with its settings checked."""
    if settings.validation_split:
        X, Y, held_out = _split_off_validation(X, Y, settings.validation_split)
        settings = replace(settings, validation_data=held_out)
        w = settings.sample_weight
        if w is not None and isinstance(Y, torch.Tensor) and len(w) == len(Y) + len(held_out[1]):
            # the weights are split with the rows (as Keras): the held-out ones weigh val_loss
            settings = replace(settings, sample_weight=w[:len(Y)], validation_weights=w[len(Y):])
    Y = class_targets(model, Y)
    check_data(model, X, Y)
    settings = settings.with_data(model, Y)
    weights = example_weights(Y, settings.loss.decision, settings.sample_weight, settings.class_weight)
    check_params(model)
    _check_steps(model, len(X), settings)
    with threads_for(model, settings.batch_size, settings.threads):
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
        return X, Y, (X, Y)  # check_data names what is wrong with them
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
        self.chunks = (chunk_rows(model, self.predicting),  # rows at a time (a loss only if it adds up by rows)
                       None if self.scoring is None or not adds_up_by_rows(self.validation[3]) else
                       chunk_rows(model, self.scoring))
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
        self.start = Snapshot(lambda: [*self.step.params, *self.step.state, *s.optimizer.state_tensors()])

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
        epoch_loss, params_magnitude, *values = torch.cat([v.reshape(-1).double() for v in scores.values()]).tolist()
        if not (math.isfinite(epoch_loss) and math.isfinite(params_magnitude)):
            found = replay(self.step, self.start, self.batches.feeds(self.X, self.Y, order), self.batches.batch_loss,
                            lr, self.batches.sizes)
            # Data-parallel, a rank's first non-finite node may differ from another's, and the
            # search would run collectives a rank that stopped early never joins: not searched.
            source = None if s.distributed else find_source(self.step, found)
            raise diverged(found, epoch, s.epochs, len(self.batches), first, self.history, source)
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
        scores = {"loss": self.batches.loss_and_finite(losses, magnitude(self.step.params, self.X.device))}
        decision, metrics = s.loss.decision, list(s.metrics)
        if metrics:
            measured = measure(self.predicting.fn, self.X, self.targets, decision, metrics, s.distributed,
                               with_loss=False, rows=self.chunks[0])
            scores.update((m, measured[m]) for m in metrics)
        if self.validation is not None:
            X_val, fed, targets, _ = self.validation
            measured = measure(self.scoring.fn, X_val, fed, decision, metrics, s.distributed, targets=targets,
                               rows=self.chunks[1])
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
    with threads_for(model, len(X) if isinstance(X, torch.Tensor) and X.dim() else 1, threads):
        if not check_distributed(distributed, "predict"):
            return _in_chunks(model, fn, X)
        first, count = dp.shard(len(X))
        mine = _in_chunks(model, fn, X[first:first + count] if count else X[:1])  # an empty share still gathers
        return dp.gather_rows(mine, len(X))


def _in_chunks(model: Sequential, fn: Compiled, X: torch.Tensor) -> torch.Tensor:
    """fn's prediction of every row of X, `chunk_rows` rows at a time (X checked whole
    first, so that an error names X's shape, not a chunk's)."""
    rows = chunk_rows(model, fn) if isinstance(X, torch.Tensor) and X.dim() else None
    if rows is None or len(X) <= rows:
        return fn(x=X)[0]
    fn.check_feeds((), {"x": X})
    return torch.cat([fn(x=X[lo:lo + rows])[0] for lo in range(0, len(X), rows)])


def evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
             metrics: list[str] | None = None, threads: int | None = None,
             distributed: bool = False, sample_weight: torch.Tensor | None = None) -> dict[str, float]:
    """`Sequential.evaluate`, which documents the arguments."""
    loss = model_loss(model, loss)
    distributed = check_distributed(distributed, "evaluate")
    check_shares(loss, distributed, "evaluate")
    Y = class_targets(model, Y)
    check_data(model, X, Y)
    metrics = choose_metrics(metrics, Y, loss)
    check_metrics_fit(metrics, Y, "Y", loss.decision)
    weights = example_weights(Y, loss.decision, check_sample_weight(sample_weight), None)
    with threads_for(model, len(X), threads):
        if weights is None:
            return _evaluate(model, X, Y, loss, metrics, distributed)
        fed = torch.cat([Y, weights], -1)
        fn = _eval_fn(model, Weighted(loss))
        scores = measure(fn, X, fed, loss.decision, metrics, distributed, targets=Y, rows=_loss_chunks(model, fn, loss))
        return dict(zip(scores, torch.stack(list(scores.values())).tolist(), strict=True))


def _evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss, metrics: list[str],
              distributed: bool = False) -> dict[str, float]:
    fn = _eval_fn(model, loss)
    scores = measure(fn, X, Y, loss.decision, metrics, distributed, rows=_loss_chunks(model, fn, loss))
    return dict(zip(scores, torch.stack(list(scores.values())).tolist(), strict=True))


def _loss_chunks(model: Sequential, fn: Compiled, loss: Loss) -> int | None:
    """`chunk_rows` for a graph of `loss`: None (the data set whole) unless the loss adds up by rows."""
    return chunk_rows(model, fn) if adds_up_by_rows(loss) else None
