"""Callbacks: code fit runs at the edges of training, epochs and (when asked) batches.

A callback sees each epoch's logs, the History's numbers of that epoch ({"loss": ...,
"accuracy": ..., "val_loss": ..., "lr": ...}), and may stop the run by setting
`self.model.stop_training = True`, as in Keras. fit checks before any epoch runs that
every key a callback monitors is one the logs will have.

Callbacks cost nothing per batch: the epoch's numbers are read in its one host sync.
Only a callback whose `batch_logs` is True gets `on_batch_end` with the batch's loss,
which reads it from the device after every step (~10 µs a step on CPU, as much as a
small net's whole step).

In a data-parallel fit every rank runs the callbacks on the same logs, so they decide
alike; the ones that write files (`ModelCheckpoint`, `CSVLogger`, `TensorBoard`) write
on rank 0 only.

A callback's state (EarlyStopping's best value, wait and best weights, the rate
ReduceLROnPlateau lowered, ...) is part of fit's checkpoints (`state`, `tensors`,
`load_state`), so a resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checks import GraphError, all_finite, flag, read_float, read_int, real, whole
from .metrics import higher_is_better, is_metric

if TYPE_CHECKING:
    from .model import Sequential

Logs = dict[str, float]



class Callback:
    """The hooks fit calls; each does nothing unless overridden.

    Attributes set by fit before `on_train_begin`: `model` (the model being trained),
    `optimizer` and `is_main` (False on every data-parallel rank but rank 0).
    """

    batch_logs = False  # True: on_batch_end is called with {"loss": ...} after every step
    model: Sequential
    optimizer: Any
    is_main = True

    def monitors(self) -> Sequence[str]:
        """The log keys this callback reads; fit refuses a key the logs will not have."""
        return ()

    def check(self, keys: Sequence[str]) -> None:
        """Refuse, before any epoch runs, what the epochs' logs (with these keys) cannot give."""
        for key in self.monitors():
            if key not in keys:
                hint = ""
                if key.startswith("val_") and not any(k.startswith("val_") for k in keys):
                    hint = "; there is no validation data: give fit validation_data= or validation_split="
                raise ValueError(f"{type(self).__name__} monitors {key!r}, which the logs will not have (they "
                                 f"have {', '.join(keys)}){hint}")

    def state(self) -> dict[str, Any]:
        """What fit's checkpoint keeps of this callback (JSON numbers), to resume it."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the checkpoint keeps of this callback (EarlyStopping's best weights)."""
        return {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        """Continue from a checkpoint's `state()` and `tensors()` (called after
        `on_train_begin`): check every value read back (GraphError naming `where`)."""

    def on_train_begin(self, logs: Logs) -> None: ...

    def on_train_end(self, logs: Logs) -> None: ...

    def close(self) -> None:
        """Release what it holds open (a file, a writer): fit calls it however it ends,
        a divergence included, so it must be safe to call more than once."""

    def on_epoch_begin(self, epoch: int, logs: Logs) -> None: ...

    def on_epoch_end(self, epoch: int, logs: Logs) -> None: ...

    def on_batch_end(self, batch: int, logs: Logs) -> None: ...


def check_callbacks(callbacks: Any) -> tuple[Callback, ...]:
    """fit's `callbacks=` as a tuple of Callbacks (a ValueError naming what else was given)."""
    if callbacks is None:
        return ()
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise ValueError(f"callbacks must be a list of graphdl callbacks, got {type(callbacks).__name__}")
    for i, c in enumerate(callbacks):
        if not isinstance(c, Callback):
            raise ValueError(f"callbacks[{i}] is a {type(c).__name__}, not a gd.Callback; subclass gd.Callback "
                             "or wrap functions in gd.LambdaCallback(on_epoch_end=...)")
    return tuple(callbacks)


class _Monitor:
    """Whether a monitored value improved on the best: its mode and minimum change."""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a log key such as 'val_loss', got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":  # maximise accuracy-like metrics, minimise losses and errors
            name = monitor.removeprefix("val_")
            mode = "max" if is_metric(name) and higher_is_better(name) else "min"
        self.monitor, self.mode = monitor, mode
        self.min_delta = abs(real("min_delta", min_delta))

    def worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    def saved(self, best: float) -> float | None:
        return None if math.isinf(best) else best  # JSON has no inf: None is "nothing yet"

    def read(self, value: Any, field: str) -> float:
        best = self.worst() if value is None else read_float(value, field, torch.float64)
        if math.isnan(best):
            raise GraphError(f"{field} is NaN; it is corrupt")
        return best

    def improved(self, current: float, best: float) -> bool:
        if self.mode == "min":
            return current + self.min_delta < best
        return current - self.min_delta > best


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in tensors.items()}


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs (Keras' EarlyStopping).

    Args:
        monitor: the log key to watch, e.g. "val_loss" or "val_accuracy".
        min_delta: a change smaller than this is no improvement.
        patience: epochs without improvement before stopping.
        mode: "min", "max", or "auto" (max for accuracy-like metrics, else min).
        baseline: the value to beat; until it is beaten, epochs count as no improvement.
        restore_best_weights: at the end of training, put back the weights (all of
            `model.state()`) of the best epoch.
        start_from_epoch: epochs to let pass before watching (a warm-up).
        verbose: print when it stops and when it restores.

    After the run, `stopped_epoch` is the (0-based) epoch it stopped after (0 if it did
    not), `best` the best value and `best_epoch` its epoch.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, mode: str = "auto",
                 baseline: float | None = None, restore_best_weights: bool = False, start_from_epoch: int = 0,
                 verbose: bool = False) -> None:
        self._watch = _Monitor(monitor, mode, min_delta)
        self.monitor = monitor
        self.patience = whole("patience", patience, 0)
        self.baseline = None if baseline is None else real("baseline", baseline)
        self.restore_best_weights = flag("restore_best_weights", restore_best_weights)
        self.start_from_epoch = whole("start_from_epoch", start_from_epoch, 0)
        self.verbose = flag("verbose", verbose)
        self._reset()

    def _reset(self) -> None:
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best = self._watch.worst()
        self.best_weights: dict[str, torch.Tensor] | None = None

    def monitors(self) -> Sequence[str]:
        return (self.monitor,)

    def on_train_begin(self, logs: Logs) -> None:
        self._reset()

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        current = logs[self.monitor]
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = _copy(self.model.state())  # no improvement yet: the first watched epoch's
        self.wait += 1
        if self._watch.improved(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = _copy(self.model.state())
            if self.baseline is None or self._watch.improved(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def state(self) -> dict[str, Any]:
        return {"wait": self.wait, "stopped_epoch": self.stopped_epoch, "best_epoch": self.best_epoch,
                "best": self._watch.saved(self.best)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.best_weights) if self.best_weights is not None else {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        counts = {key: read_int(state.get(key), f"{where}: EarlyStopping's {key}")
                  for key in ("wait", "stopped_epoch", "best_epoch")}
        best = self._watch.read(state.get("best"), f"{where}: EarlyStopping's best {self.monitor}")
        weights = None
        if tensors:
            mine = self.model.state()
            for name, t in mine.items():
                got = tensors.get(name)
                if got is None or got.shape != t.shape or got.dtype != t.dtype or not all_finite(got):
                    raise GraphError(f"{where}: EarlyStopping's best weights do not fit the model's {name} (or are "
                                     "not finite); it is corrupt or of another model")
            weights = {name: tensors[name].to(t.device) for name, t in mine.items()}
        self.wait, self.stopped_epoch, self.best_epoch = counts["wait"], counts["stopped_epoch"], counts["best_epoch"]
        self.best, self.best_weights = best, weights
        if self.stopped_epoch > 0:  # it had stopped the run the checkpoint comes from: no more epochs
            self.model.stop_training = True

    def on_train_end(self, logs: Logs) -> None:
        if self.stopped_epoch > 0 and self.verbose and self.is_main:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose and self.is_main:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}")
            with torch.no_grad():
                for name, t in self.model.state().items():
                    t.copy_(self.best_weights[name])


class ModelCheckpoint(Callback):
    """Save the model (`model.save`, atomically) after epochs (Keras' ModelCheckpoint).

    Args:
        filepath: where to save; may hold `{epoch}` (1-based) and any log key, e.g.
            "model-{epoch:02d}-{val_loss:.3f}.gdl".
        monitor: the log key that decides which epoch is best.
        save_best_only: save only when `monitor` improves on the best so far.
        mode: "min", "max" or "auto", as for EarlyStopping.
        verbose: print a line at each save.

    A model file holds the weights and architecture; to resume training exactly use
    fit's own `checkpoint=` (which also holds the optimizer and shuffling state).
    """

    def __init__(self, filepath: str | os.PathLike[str], monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto", verbose: bool = False) -> None:
        if not isinstance(filepath, (str, os.PathLike)):
            raise ValueError(f"filepath must be a file path, got {type(filepath).__name__}")
        self.filepath = os.fspath(filepath)
        self._watch = _Monitor(monitor, mode, 0.0)
        self.monitor = monitor
        self.save_best_only = flag("save_best_only", save_best_only)
        self.verbose = flag("verbose", verbose)
        self.best = self._watch.worst()

    def monitors(self) -> Sequence[str]:
        return (self.monitor,) if self.save_best_only else ()

    def check(self, keys: Sequence[str]) -> None:
        super().check(keys)
        self._path(0, dict.fromkeys(keys, 0.0))  # a filepath that cannot be formatted fails now

    def on_train_begin(self, logs: Logs) -> None:
        self.best = self._watch.worst()

    def state(self) -> dict[str, Any]:
        return {"best": self._watch.saved(self.best)}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        self.best = self._watch.read(state.get("best"), f"{where}: ModelCheckpoint's best {self.monitor}")

    def _path(self, epoch: int, logs: Logs) -> str:
        try:
            return self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ValueError(f"ModelCheckpoint filepath {self.filepath!r} cannot be formatted with epoch and "
                             f"the log keys ({e!r}); use names such as {{epoch:02d}} or {{val_loss:.3f}}") from None

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        if self.save_best_only:
            current = logs[self.monitor]
            if not self._watch.improved(current, self.best):
                return
            self.best = current
        if self.is_main:
            path = self._path(epoch, logs)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.model.save(path)
            if self.verbose:
                print(f"Epoch {epoch + 1}: saved the model to {path}")


class ReduceLROnPlateau(Callback):
    """Scale the learning rate by `factor` when `monitor` stops improving, with
    PyTorch's ReduceLROnPlateau rules.

    Args:
        monitor: the log key to watch.
        factor: new rate = rate * factor, in (0, 1).
        patience: epochs without improvement that are tolerated; the rate drops after
            patience + 1 of them.
        threshold: the least change that counts, relative ("rel": best * (1 - threshold)
            for min) or absolute ("abs": best - threshold).
        threshold_mode: "rel" or "abs".
        cooldown: epochs to wait after a drop before counting again.
        min_lr: the rate never drops below this.
        eps: a drop smaller than this is not made.
        mode: "min", "max" or "auto".
        verbose: print each drop.

    It sets the optimizer's base rate (`optimizer.lr`), which a schedule then scales.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                 threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8,
                 mode: str = "auto", verbose: bool = False) -> None:
        self._watch = _Monitor(monitor, mode, 0.0)
        self.monitor = monitor
        self.factor = real("factor", factor, 0.0, 1.0, high_open=True)
        if self.factor == 0.0:
            raise ValueError("factor must be in (0, 1): the rate is multiplied by it; got 0")
        self.patience = whole("patience", patience, 0)
        self.threshold = real("threshold", threshold, 0.0)
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.threshold_mode = threshold_mode
        self.cooldown = whole("cooldown", cooldown, 0)
        self.min_lr = real("min_lr", min_lr, 0.0)
        self.eps = real("eps", eps, 0.0)
        self.verbose = flag("verbose", verbose)
        self._reset()

    def _reset(self) -> None:
        self.best = self._watch.worst()
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def monitors(self) -> Sequence[str]:
        return (self.monitor,)

    def on_train_begin(self, logs: Logs) -> None:
        self._reset()

    def state(self) -> dict[str, Any]:
        return {"best": self._watch.saved(self.best), "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter, "lr": self.optimizer.lr}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        best = self._watch.read(state.get("best"), f"{where}: ReduceLROnPlateau's best {self.monitor}")
        bad = read_int(state.get("num_bad_epochs"), f"{where}: ReduceLROnPlateau's num_bad_epochs")
        cooldown = read_int(state.get("cooldown_counter"), f"{where}: ReduceLROnPlateau's cooldown_counter")
        lr = read_float(state.get("lr"), f"{where}: ReduceLROnPlateau's lr", torch.float64)
        if not (math.isfinite(lr) and lr >= 0):
            raise GraphError(f"{where}: ReduceLROnPlateau's lr is {lr!r}, not a rate; it is corrupt")
        self.best, self.num_bad_epochs, self.cooldown_counter = best, bad, cooldown
        self.optimizer.lr = lr  # the rate it lowered to, which the checkpoint's optimizer record does not restore

    def is_better(self, current: float, best: float) -> bool:
        rel, mode, t = self.threshold_mode == "rel", self._watch.mode, self.threshold
        if mode == "min":
            return current < (best * (1.0 - t) if rel else best - t)
        return current > (best * (1.0 + t) if rel else best + t)

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        current = logs[self.monitor]
        if self.is_better(current, self.best):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = self.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.optimizer.lr = new
                if self.verbose and self.is_main:
                    print(f"Epoch {epoch + 1}: reducing the learning rate to {new:.4g}")
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0


class CSVLogger(Callback):
    """Write each epoch's logs as a row of a CSV file (Keras' CSVLogger): a header of
    "epoch" and the log keys, then one row per epoch, flushed as it is written.

    Args:
        filename: the file.
        separator: the field separator.
        append: add to an existing file (no second header) instead of overwriting it.
    """

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False) -> None:
        if not isinstance(filename, (str, os.PathLike)):
            raise ValueError(f"filename must be a file path, got {type(filename).__name__}")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator must be one character, got {separator!r}")
        self.filename, self.separator, self.append = os.fspath(filename), separator, flag("append", append)
        self._resumed = False
        self._file: Any = None
        self._writer: Any = None

    def on_train_begin(self, logs: Logs) -> None:
        self._resumed = False

    def state(self) -> dict[str, Any]:
        return {"started": True}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        self._resumed = True  # a resumed run adds its rows to the file the run so far wrote

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        if not self.is_main:
            return
        if self._file is None:  # opened at the first row, so that a resumed run appends
            append = self.append or self._resumed
            exists = append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0
            self._file = open(self.filename, "a" if append else "w", newline="")  # noqa: SIM115 - kept open
            self._writer = csv.writer(self._file, delimiter=self.separator) if exists else None
        if self._writer is None:
            self._writer = csv.writer(self._file, delimiter=self.separator)
            self._writer.writerow(["epoch", *logs])
        self._writer.writerow([epoch, *(repr(v) for v in logs.values())])
        self._file.flush()

    def on_train_end(self, logs: Logs) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


class LambdaCallback(Callback):
    """A callback made of functions: `LambdaCallback(on_epoch_end=lambda epoch, logs: ...)`.

    Each argument is called as its hook is: on_train_begin(logs), on_train_end(logs),
    on_epoch_begin(epoch, logs), on_epoch_end(epoch, logs), on_batch_end(batch, logs)
    (giving on_batch_end asks for batch logs: a host sync per step).
    """

    def __init__(self, on_train_begin: Callable | None = None, on_train_end: Callable | None = None,
                 on_epoch_begin: Callable | None = None, on_epoch_end: Callable | None = None,
                 on_batch_end: Callable | None = None) -> None:
        given = {"on_train_begin": on_train_begin, "on_train_end": on_train_end, "on_epoch_begin": on_epoch_begin,
                 "on_epoch_end": on_epoch_end, "on_batch_end": on_batch_end}
        for name, fn in given.items():
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a function, got {type(fn).__name__}")
            if fn is not None:
                setattr(self, name, fn)
        self.batch_logs = on_batch_end is not None


class TensorBoard(Callback):
    """Write each epoch's logs as TensorBoard scalars (through torch.utils.tensorboard,
    which needs the `tensorboard` package: `pip install graphdl[tensorboard]`).

    Args:
        log_dir: the directory TensorBoard reads (`tensorboard --logdir log_dir`).
    """

    def __init__(self, log_dir: str | os.PathLike[str] = "logs") -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a directory path, got {type(log_dir).__name__}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("gd.TensorBoard needs the tensorboard package: pip install graphdl[tensorboard] "
                              f"(or pip install tensorboard); importing it failed: {e}") from None
        self.log_dir = os.fspath(log_dir)
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def on_train_begin(self, logs: Logs) -> None:
        if self.is_main:
            self._writer = self._writer_class(log_dir=self.log_dir)

    def on_epoch_end(self, epoch: int, logs: Logs) -> None:
        if self._writer is not None:
            for key, value in logs.items():
                self._writer.add_scalar(key, value, epoch + 1)
            self._writer.flush()

    def on_train_end(self, logs: Logs) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CallbackList:
    """fit's callbacks, called in the order given."""

    def __init__(self, callbacks: Sequence[Callback], model: Sequential, optimizer: Any, is_main: bool) -> None:
        self.callbacks = list(callbacks)
        for c in self.callbacks:
            c.model, c.optimizer, c.is_main = model, optimizer, is_main
        self.batch_logs = any(c.batch_logs for c in self.callbacks)

    def train_begin(self, logs: Logs, saved: list[dict[str, Any]] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, where: str = "") -> None:
        """on_train_begin, then, resuming, each callback's state from the checkpoint."""
        for c in self.callbacks:
            c.on_train_begin(logs)
        for i, (c, record) in enumerate(zip(self.callbacks, saved or [])):
            prefix = f"{i}/"
            mine = {k.removeprefix(prefix): t for k, t in (tensors or {}).items() if k.startswith(prefix)}
            state = record.get("state")
            if not isinstance(state, dict):
                raise GraphError(f"{where}: the state of its callback {i} is malformed; it is corrupt")
            c.load_state(state, mine, where)

    def check_resumable(self, saved: list[dict[str, Any]], where: str) -> None:
        """A checkpoint written with callbacks resumes with the same ones, in order, so
        that each continues its own state (a fresh EarlyStopping would forget its best)."""
        if not saved:
            return
        theirs = [record.get("class") if isinstance(record, dict) else None for record in saved]
        mine = [type(c).__name__ for c in self.callbacks]
        if theirs != mine:
            raise ValueError(f"resume: {where} was written by a fit with callbacks {theirs}, but this fit has {mine}; "
                             "give the same callbacks, in the same order, so that each continues its state")

    def states(self) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        """What fit's checkpoint keeps of the callbacks: their records and tensors."""
        records = [{"class": type(c).__name__, "state": c.state()} for c in self.callbacks]
        tensors = {f"{i}/{k}": t for i, c in enumerate(self.callbacks) for k, t in c.tensors().items()}
        return records, tensors

    def close(self) -> None:
        """End what the callbacks hold open (a CSV file), however fit ends."""
        for c in self.callbacks:
            c.close()

    def train_end(self, logs: Logs) -> None:
        for c in self.callbacks:
            c.on_train_end(logs)

    def epoch_begin(self, epoch: int, logs: Logs) -> None:
        for c in self.callbacks:
            c.on_epoch_begin(epoch, logs)

    def epoch_end(self, epoch: int, logs: Logs) -> None:
        for c in self.callbacks:
            c.on_epoch_end(epoch, logs)

    def batch_end(self, batch: int, logs: Logs) -> None:
        for c in self.callbacks:
            if c.batch_logs:
                c.on_batch_end(batch, logs)
