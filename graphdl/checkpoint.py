"""Checkpoints: a model file that also holds fit's state, so that a run can resume.

`fit(..., checkpoint=path)` writes one after every epoch (rank 0 only, atomically, so a
crash leaves the previous one whole); `fit(..., resume=path)` continues from it. The
weights, the optimizer's state (its `state_dict`: velocities, moments, step counts, each
checked as it is read), the shuffling generator's state, the History and the number of
epochs done come back exactly, so the resumed run takes the very steps the
uninterrupted run would have. The checkpoint records the optimizer's class and
settings (`config`); resuming with another class is refused. `gd.load(path)` reads a
checkpoint as a plain model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .checks import GraphError, all_finite, format_type, read_float, read_int
from .files import read_json
from .io import load_model, save_model

if TYPE_CHECKING:
    from .model import Sequential
    from .optim import Optimizer

FORMAT = "graphdl.fit.v2"  # v1 (SGD's velocities only, no optimizer record) is read too
_V1 = "graphdl.fit.v1"
CALLBACK = "callback/"  # the prefix of the callbacks' tensors among the checkpoint's state


@dataclass
class Resumed:
    """What `read_checkpoint` gives back beside the weights and optimizer state it restores."""

    epoch: int  # epochs done
    history: dict[str, list[float]]
    rng: torch.Tensor  # the shuffling generator's state after those epochs
    optimizer: dict[str, Any]  # the optimizer that wrote it: {"class", "settings", "groups"}
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # each callback's {"class", "state"}
    callback_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "{i}/{name}": their tensors


def write_checkpoint(path: str | os.PathLike[str], model: Sequential, optimizer: Optimizer, epoch: int,
                     generator: torch.Generator, history: dict[str, list[float]],
                     callbacks: tuple[list[dict[str, Any]], dict[str, torch.Tensor]] = ([], {})) -> None:
    """Save the model and fit's state after `epoch` epochs (on rank 0 only); `callbacks`
    are the callbacks' records and tensors (`CallbackList.states`)."""
    if not distributed.is_main():
        return
    records, tensors = callbacks
    info = json.dumps({"format": FORMAT, "epoch": epoch, "history": {k: list(v) for k, v in history.items()},
                       "rng": bytes(generator.get_state().tolist()).hex(),  # model files hold float tensors only
                       "optimizer": optimizer.config(), "callbacks": records})
    save_model(model, path, {**optimizer.state_dict(), **{f"{CALLBACK}{k}": t for k, t in tensors.items()}}, info)


def read_checkpoint(path: str | os.PathLike[str], model: Sequential, optimizer: Optimizer,
                    history_keys: list[str], validation: bool) -> Resumed:
    """Put a checkpoint's weights into `model` and its optimizer state into `optimizer`
    (after checking that they fit), and return the rest of fit's state.

    Raises:
        GraphError: the file is not a checkpoint, or is corrupt.
        ValueError: the checkpoint is of another model, another optimizer class or other
            optimizer settings (kinds of state).
    """
    saved, info, state = load_model(path, type(model))
    resumed = _parse(path, info, history_keys)
    resumed.callback_tensors = {k.removeprefix(CALLBACK): t for k, t in state.items() if k.startswith(CALLBACK)}
    state = {k: t for k, t in state.items() if not k.startswith(CALLBACK)}
    _check_validation(path, resumed, validation)
    mine, theirs = model.state(), saved.state()  # trainable params and fixed ones (Standardize's statistics)
    _check_same_model(path, mine, theirs)
    _check_same_settings(path, model, saved)
    _check_finite(path, theirs)
    _check_optimizer(path, resumed.optimizer, optimizer)
    trained = model.parameters()
    if optimizer.names != list(trained):  # not yet bound to this model (fit's TrainStep binds it)
        optimizer.reset(list(trained.values()), list(trained), model.ties())
    optimizer.load_state_dict(state, f"resume: {path}")  # checks every tensor before taking any
    for name, p in mine.items():
        p.copy_(theirs[name])
    return resumed


def _check_validation(path: Any, resumed: Resumed, validation: bool) -> None:
    """A fit with validation data resumes one without only before its first epoch, and vice versa."""
    if bool(resumed.history.get("val_loss")) != (validation and resumed.epoch > 0):
        raise ValueError(f"resume: {path} was written by a fit {'with' if not validation else 'without'} "
                         "validation_data; resume it the same way, so that its History continues")


def _check_same_model(path: Any, mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The checkpoint holds the model's tensors: the same names, shapes and dtypes."""
    for name in [*mine, *theirs]:
        if name not in mine or name not in theirs or mine[name].shape != theirs[name].shape \
                or mine[name].dtype != theirs[name].dtype:
            have = lambda d: format_type(d[name].dtype, tuple(d[name].shape)) if name in d else "nothing"  # noqa: E731
            raise ValueError(f"resume: {path} is a checkpoint of another model: its param {name} is {have(theirs)} "
                             f"but the model's is {have(mine)}; resume with the model that wrote it")


def _check_same_settings(path: Any, model: Any, saved: Any) -> None:
    """The checkpoint's layers have the model's settings: another Dropout seed (a model
    built again without one draws a new one) or p would train on with other masks, silently."""
    for k, (mine, theirs) in enumerate(zip(model.layers, saved.layers)):
        a, b = mine.config(), theirs.config()
        differ = sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))
        if differ:
            key = differ[0]
            hint = f"; build it as {type(mine).__name__}(..., {key}={b.get(key)!r})" if key == "seed" else ""
            raise ValueError(f"resume: {path} was written by a model whose layer {k} ({type(theirs).__name__}) has "
                             f"{key}={b.get(key)!r}, but this model's has {key}={a.get(key)!r}; resume with the "
                             f"model that wrote it{hint}")


def _check_finite(path: Any, theirs: dict[str, torch.Tensor]) -> None:
    """fit writes a checkpoint only after an epoch whose params stayed finite: NaN or inf
    in one is corruption, not a state to train on (it would read as a diverged rate)."""
    for name, t in theirs.items():
        if t.dtype.is_floating_point and not all_finite(t):
            raise GraphError(f"{path}: the checkpoint's {name} holds NaN or inf, which fit never writes; it is corrupt")


def _check_optimizer(path: Any, wrote: dict[str, Any], optimizer: Optimizer) -> None:
    """The checkpoint was written by a fit with this optimizer's class."""
    if wrote["class"] != type(optimizer).__name__:
        raise ValueError(f"resume: {path} was written by a fit with gd.{wrote['class']}"
                         f"({_settings_text(wrote)}), but this fit's optimizer is {optimizer!r}; resume with "
                         f"gd.{wrote['class']} (its state is of no use to another optimizer), or start afresh")


def _settings_text(config: dict[str, Any]) -> str:
    settings = config.get("settings")
    return ", ".join(f"{k}={v!r}" for k, v in settings.items()) if isinstance(settings, dict) else ""


def _parse(path: Any, info: str, history_keys: list[str]) -> Resumed:
    """The checkpoint's epoch count, History and generator state, each checked."""
    meta = _fit_state(path, info)
    epoch = _epoch(path, meta)
    history = _history(path, meta, history_keys, epoch)
    return Resumed(epoch, history, _rng(path, meta), _optimizer_record(path, meta), _callbacks(path, meta))


def _fit_state(path: Any, info: str) -> dict[str, Any]:
    """The JSON of fit's state that the model file holds, if it is a checkpoint's."""
    try:  # numbers stay as written for their readers: a 5,000-digit epoch count is refused, not crashed on
        meta = read_json(info) if info else None
    except (json.JSONDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, _V1):
        raise GraphError(f"{path}: is a model file without fit's state, not a checkpoint; write one with "
                         "fit(..., checkpoint=path)")
    return meta


def _epoch(path: Any, meta: dict[str, Any]) -> int:
    try:
        return read_int(meta.get("epoch"), "the checkpoint's epoch count")
    except GraphError as e:
        raise GraphError(f"{path}: {e}; it is corrupt") from None


def _history(path: Any, meta: dict[str, Any], history_keys: list[str], epoch: int) -> dict[str, list[float]]:
    """The History's lists of `history_keys`, each empty or of `epoch` finite numbers."""
    history = meta.get("history")
    if not isinstance(history, dict) or any(key not in history for key in history_keys):
        raise GraphError(f"{path}: the checkpoint's History lacks some of {history_keys}; it is corrupt or was "
                         "written by another graphdl")
    for key in history_keys:
        values = history[key]
        # every epoch records its loss and rate; a metric or val_ key is empty if not measured
        lengths = (epoch,) if key in ("loss", "lr") else (0, epoch)
        if not isinstance(values, list) or len(values) not in lengths or not all(map(_is_finite_number, values)):
            raise GraphError(f"{path}: the checkpoint's History[{key!r}] is not {epoch} finite numbers; it is corrupt")
        if key == "lr" and any(float(v) < 0 for v in values):
            raise GraphError(f"{path}: the checkpoint's History['lr'] holds a negative rate; it is corrupt")
    return {key: list(history[key]) for key in history_keys}


def _is_finite_number(v: Any) -> bool:
    """Whether a History value from the file is a finite number, as checks.read_float reads one."""
    try:
        return math.isfinite(read_float(v, "a History value", torch.float64))
    except GraphError:
        return False


def _rng(path: Any, meta: dict[str, Any]) -> torch.Tensor:
    """The shuffling generator's state, after checking that a generator takes it."""
    try:
        rng = torch.tensor(list(bytes.fromhex(meta["rng"])), dtype=torch.uint8)
        torch.Generator().set_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise GraphError(f"{path}: the checkpoint's generator state is missing or malformed; it is corrupt") from None
    return rng


def _callbacks(path: Any, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The callbacks' records ({"class", "state"}; none in checkpoints before them)."""
    records = meta.get("callbacks", [])
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("class"), str)
                                                for r in records):
        raise GraphError(f"{path}: the checkpoint's record of its callbacks is malformed; it is corrupt")
    return records


def _optimizer_record(path: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The record of the optimizer that wrote the checkpoint (v1 checkpoints: SGD's)."""
    optimizer = meta.get("optimizer") if meta["format"] == FORMAT else {"class": "SGD"}
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("class"), str):
        raise GraphError(f"{path}: the checkpoint's record of its optimizer is malformed; it is corrupt")
    return optimizer
