"""fit's settings, checked once into one `FitSettings`, and the checks of the data, the
targets (integer labels made one-hot rows) and the examples' weights that fit, predict
and evaluate share."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from . import distributed as dp
from .callbacks import Callback, check_callbacks
from .checks import all_finite, finite_mask, flag, real, shown, tensor_problem, whole
from .losses import MSE, Loss, adds_up_by_rows, checked_loss
from .metrics import check_metric_names, check_metrics_fit, choose_metrics
from .monitor import checked_monitor
from .optim import SGD, Optimizer, Schedule, check_apart, check_updatable, checked_optimizer

if TYPE_CHECKING:
    from .model import Sequential


def class_targets(model: Sequential, Y: Any, what: str = "") -> Any:
    """Integer class labels [N] as targets: one-hot rows for a model with several outputs,
    a 0/1 column for a model with one. Anything else is returned as given, for
    check_data to judge."""
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


def check_data(model: Sequential, X: Any, Y: Any, what: str = "") -> None:
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
    if not all_finite(t):  # one pass over the data, once per call (the first bad value is found after)
        where = (~finite_mask(t)).nonzero()[0].tolist()
        raise ValueError(f"{name}{what} has NaN or inf values, first at {name}[{', '.join(map(str, where))}] = "
                         f"{t[tuple(where)].item()}; drop or repair those examples (e.g. with torch.isfinite)")


def check_params(model: Sequential) -> None:
    """Training updates every param in place, so each must hold real values in memory of its own."""
    check_apart(model.state())
    trained = model.parameters()
    for name, t in model.state().items():  # buffers too: a NaN std would read as a diverged learning rate
        if not t.is_meta and t.dtype.is_floating_point and not all_finite(t):
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
        distributed = check_distributed(distributed, "fit")
        check_shares(model_loss(model, loss), distributed, "fit")
        if monitor and distributed:  # a rank's dead units are of its share: the History would differ by rank
            raise ValueError("monitor= is not available with distributed=True yet; monitor a one-process run")
        return cls(loss=model_loss(model, loss),
                   optimizer=checked_optimizer(SGD() if optimizer is None else optimizer),
                   schedule=schedule, epochs=whole("epochs", epochs, 0),
                   batch_size=whole("batch_size", batch_size, 1), shuffle=flag("shuffle", shuffle),
                   validation_data=None if validation_data is None else tuple(validation_data[:2]), seed=seed,
                   verbose=flag("verbose", verbose),
                   metrics=None if metrics is None else tuple(check_metric_names(metrics)),
                   threads=None if threads is None else whole("threads", threads, 1),
                   distributed=distributed, checkpoint=checkpoint, resume=resume,
                   callbacks=check_callbacks(callbacks), validation_split=validation_split,
                   sample_weight=check_sample_weight(sample_weight), class_weight=_check_class_weight(class_weight),
                   validation_weights=None if validation_data is None or len(validation_data) == 2 else
                   check_sample_weight(validation_data[2], "validation_data's sample weights"),
                   clip_norm=_clip("clip_norm", clip_norm), clip_value=_clip("clip_value", clip_value),
                   accumulate=whole("accumulate", accumulate, 1), monitor=monitor)

    def with_data(self, model: Sequential, Y: torch.Tensor) -> FitSettings:
        """The settings for this data: validation targets as the model reads them, and the
        metrics chosen (by default accuracy when Y holds class labels)."""
        validation = self.validation_data
        if validation is not None:
            validation = (validation[0], class_targets(model, validation[1], " (validation)"))
            check_data(model, *validation, what=" (validation)")
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


def check_sample_weight(weights: Any, what: str = "sample_weight") -> torch.Tensor | None:
    """A 1-d tensor of finite weights >= 0 (one per example; its length is checked with the data)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or not weights.dtype.is_floating_point:
        raise ValueError(f"{what} must be a 1-d float tensor, one weight per example, got "
                         f"{_shown_data(weights)}")
    problem = "is on the meta device, which holds no values" if weights.is_meta else tensor_problem(weights)
    if problem:
        raise ValueError(f"{what} {problem}")
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
    """Each example's weight in Y's dtype (sample_weight times its class's class_weight;
    a class without one weighs 1), shaped as Y with a last dim of 1 (so that it rides
    beside Y as a last column, `losses.Weighted`), or None without either."""
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
    cast = weights.to(Y.dtype)
    if not bool(cast.isfinite().all()):  # 1e39 is finite in float64, inf in float32
        raise ValueError(f"sample_weight{what} holds a weight of {float(weights.max()):.3g}, beyond what the "
                         f"targets' {Y.dtype} holds; scale the weights down")
    return cast.reshape(-1, *[1] * (Y.dim() - 1)).expand(*Y.shape[:-1], 1)


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


def model_loss(model: Sequential, loss: Any) -> Loss:
    return checked_loss((model.loss or MSE()) if loss is None else loss)


def check_distributed(distributed: Any, what: str) -> bool:
    """Whether to run data-parallel: asked for, and more than one rank (see `dp.spans_processes`)."""
    return flag("distributed", distributed) and dp.spans_processes(f"{what}(distributed=True)")


def check_shares(loss: Loss, distributed: bool, what: str) -> None:
    """Data-parallel, each rank's loss counts by its share of the rows: right only for a
    loss that is a mean over the examples (`Loss.mean_over_rows`)."""
    if distributed and not adds_up_by_rows(loss):
        raise ValueError(f"{what}(distributed=True) adds up the ranks' losses weighted by their shares of the rows, "
                         f"which gives the loss of all the rows only for a mean over the examples, and {loss!r} does "
                         "not say it is one; if it is (such as k * mse), set mean_over_rows = True on its class, "
                         "else run it in one process")
