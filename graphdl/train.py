"""The fit loop, predict and evaluate for Sequential models.

`fit` compiles the training step (forward, loss, backward) once, then per batch does
only what must be done per batch: slice the (once-per-epoch shuffled) data, call the
compiled step, apply the optimizer's multi-tensor update. The loss stays on the device
until the epoch ends, so there is one host sync per epoch, not per batch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .autodiff import grad
from .compile import Compiled, compile
from .losses import MSE, Loss
from .optim import SGD, Schedule

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


def _compiled(model: Sequential, key: Any, build: Callable[[], Compiled]) -> Compiled:
    """Compile once per model structure and device; `add` and `to` clear the cache."""
    fn = model._cache.get(key)
    if fn is None:
        fn = model._cache[key] = build()
    return fn


def _step_fn(model: Sequential, loss: Loss) -> Compiled:
    names = list(model.parameters())
    return _compiled(model, ("step", loss), lambda: compile(grad(model.graph(loss), names)))


def _eval_fn(model: Sequential, loss: Loss) -> Compiled:
    def build() -> Compiled:
        g = model.graph(loss)
        g.output(g.outputs[0].node.inputs[0])  # the prediction, beside the loss
        return compile(g)
    return _compiled(model, ("eval", loss), build)


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
        if t.dim() != 2:
            raise ValueError(f"{name}{what} must be 2-d [examples, features], got shape {list(t.shape)}")
    if len(X) != len(Y):
        raise ValueError(f"X{what} has {len(X)} examples but Y{what} has {len(Y)}; give one target per example")
    if X.shape[1] != model.in_features:
        raise ValueError(f"X{what} has {X.shape[1]} features but the model takes {model.in_features}")
    if Y.shape[1] != model.out_features:
        raise ValueError(f"Y{what} has {Y.shape[1]} columns but the model outputs {model.out_features}")


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
    _check_data(model, X, Y)
    if validation_data is not None:
        _check_data(model, *validation_data, what=" (validation)")

    step = _step_fn(model, loss)
    step.check_feeds((X[:1], Y[:1]), {})  # dtype and device, once, with graphdl's messages
    run = step.fn  # the unchecked entry: every batch has the shape just checked
    params = list(model.parameters().values())
    optimizer.reset(params)
    n = len(X)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    gen = torch.Generator().manual_seed(seed)
    # Each batch's share of the epoch's mean loss, so one dot product gives the mean.
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    weights = torch.tensor(sizes, dtype=X.dtype, device=X.device) / max(n, 1)
    history = History()

    for epoch in range(epochs):
        started = time.perf_counter()
        lr = schedule(epoch, optimizer.lr) if schedule is not None else optimizer.lr
        if shuffle:
            order = torch.randperm(n, generator=gen).to(X.device)
            Xe, Ye = X.index_select(0, order), Y.index_select(0, order)
        else:
            Xe, Ye = X, Y
        losses = []
        for start in range(0, n, batch_size):
            out = run(Xe[start:start + batch_size], Ye[start:start + batch_size])
            optimizer.step(params, out[1:], lr)
            losses.append(out[0])
        epoch_loss = float(torch.stack(losses) @ weights) if losses else float("nan")
        history["loss"].append(epoch_loss)
        history["accuracy"].append(evaluate(model, X, Y, loss, _checked=True)["accuracy"])
        if validation_data is not None:
            scores = evaluate(model, *validation_data, loss, _checked=True)
            history["val_loss"].append(scores["loss"])
            history["val_accuracy"].append(scores["accuracy"])
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
    fn = _compiled(model, ("predict",), lambda: compile(model.graph()))
    return fn(x=X)[0]


def evaluate(model: Sequential, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
             _checked: bool = False) -> dict[str, float]:
    """{"loss": the loss, "accuracy": fraction right (see `accuracy`), "error": 1 - accuracy}."""
    loss = MSE() if loss is None else loss
    if not _checked:
        _check_data(model, X, Y)
    value, pred = _eval_fn(model, loss)(x=X, y=Y)
    acc = float(accuracy(pred, Y))
    return {"loss": float(value), "accuracy": acc, "error": 1.0 - acc}
