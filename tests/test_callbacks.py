"""graphdl.callbacks: each callback's rule (against Keras' and PyTorch's), what fit gives
them, and the bad settings refused before any epoch runs."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import _data, _model

import graphdl as gd


def _fit(model, X, Y, **kwargs):
    settings = {"epochs": 6, "batch_size": 5, "seed": 0, "verbose": False, "optimizer": gd.SGD(lr=0.1)} | kwargs
    return model.fit(X, Y, **settings)


def _states(record):
    """A LambdaCallback that keeps a copy of the model's tensors at each epoch's end."""
    def keep(epoch, logs):
        record.append({k: t.clone() for k, t in model_of[0].state().items()})
    model_of = []
    cb = gd.LambdaCallback(on_epoch_end=keep)
    return cb, model_of


# -- EarlyStopping -------------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    X, Y = _data()
    for patience in (0, 1, 3):
        history = _fit(_model(), X, Y, epochs=20, optimizer=gd.SGD(lr=0.0),  # the loss never improves
                       callbacks=[gd.EarlyStopping(monitor="loss", patience=patience)])
        # epoch 0 sets the best; each later one adds to the wait; Keras stops once wait >= patience (not at epoch 0)
        assert len(history["loss"]) == max(patience, 1) + 1


def test_early_stopping_follows_keras_rules_on_a_sequence_of_values():
    class Model:
        stop_training = False

        def state(self):
            return {}

    def stops_after(values, **kwargs):
        cb = gd.EarlyStopping(monitor="val_loss", **kwargs)
        cb.model = Model()
        cb.on_train_begin({})
        for epoch, v in enumerate(values):
            cb.on_epoch_end(epoch, {"val_loss": v})
            if cb.model.stop_training:
                return epoch
        return None

    assert stops_after([3, 2, 1, 1.5, 1.2], patience=2) == 4
    assert stops_after([3, 2, 1, 1.5, 0.9, 1.0], patience=2) is None  # 0.9 improved: the wait starts again
    assert stops_after([3, 2.95, 2.9, 2.85], patience=1, min_delta=0.1) == 1  # changes below min_delta do not count
    assert stops_after([5, 5, 5, 5], patience=2) == 2
    assert stops_after([5, 5, 5, 5], patience=2, baseline=1.0) == 1  # the first epoch did not beat the baseline
    assert stops_after([5, 4, 3, 2, 1.5], patience=2, baseline=1.0) is None  # an improving epoch never stops
    assert stops_after([5, 5, 5, 5, 5], patience=0, start_from_epoch=3) == 4  # the first 3 epochs are not watched
    assert stops_after([0.5, 0.4, 0.6, 0.7], patience=1, mode="max") == 1


def test_auto_mode_maximises_accuracy_and_minimises_losses():
    assert gd.EarlyStopping(monitor="val_accuracy")._watch.mode == "max"
    assert gd.EarlyStopping(monitor="val_loss")._watch.mode == "min"
    assert gd.EarlyStopping(monitor="mae")._watch.mode == "min"


def test_restore_best_weights_puts_back_the_best_epochs_weights():
    X, Y = _data(40)
    Xv, Yv = _data(10, scale=3.0)
    record = []
    keeper, model_of = _states(record)
    model = _model()
    model_of.append(model)
    history = _fit(model, X, Y, epochs=12, optimizer=gd.SGD(lr=0.9, momentum=0.9), validation_data=(Xv, Yv),
                   callbacks=[keeper, gd.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)])
    best = min(range(len(history["val_loss"])), key=lambda e: history["val_loss"][e])
    assert len(record) == len(history["loss"])
    for name, t in model.state().items():
        assert torch.equal(t, record[best][name]), name
    # and the restored model scores the best epoch's validation loss
    assert model.evaluate(Xv, Yv)["loss"] == pytest.approx(history["val_loss"][best], rel=1e-5)


# -- ModelCheckpoint ------------------------------------------------------------------------------


def test_model_checkpoint_saves_the_best_epoch_only(tmp_path):
    X, Y = _data(40)
    Xv, Yv = _data(10, scale=3.0)
    record = []
    keeper, model_of = _states(record)
    model = _model()
    model_of.append(model)
    path = tmp_path / "best.gdl"
    history = _fit(model, X, Y, epochs=8, optimizer=gd.SGD(lr=0.3, momentum=0.8), validation_data=(Xv, Yv),
                   callbacks=[keeper, gd.ModelCheckpoint(path, monitor="val_loss", save_best_only=True)])
    best = min(range(len(history["val_loss"])), key=lambda e: history["val_loss"][e])
    loaded = gd.load(path)
    for name, t in loaded.state().items():
        assert torch.equal(t, record[best][name]), name


def test_model_checkpoint_formats_the_epoch_and_logs_into_its_path(tmp_path):
    X, Y = _data()
    _fit(_model(), X, Y, epochs=3, callbacks=[gd.ModelCheckpoint(tmp_path / "m-{epoch:02d}-{loss:.3f}.gdl")])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n[:5] for n in names] == ["m-01-", "m-02-", "m-03-"] and all(n.endswith(".gdl") for n in names)


def test_a_checkpoint_path_that_cannot_be_formatted_is_refused_before_training(tmp_path):
    X, Y = _data()
    model = _model()
    before = {k: t.clone() for k, t in model.state().items()}
    with pytest.raises(ValueError, match="cannot be formatted.*val_acc"):
        _fit(model, X, Y, callbacks=[gd.ModelCheckpoint(tmp_path / "m-{val_acc}.gdl")])
    assert all(torch.equal(t, before[k]) for k, t in model.state().items())


# -- ReduceLROnPlateau ----------------------------------------------------------------------------


class _Optimizer:
    def __init__(self, lr):
        self.lr = lr


@pytest.mark.parametrize("settings", [
    {}, {"patience": 0}, {"patience": 2, "cooldown": 2}, {"factor": 0.5, "min_lr": 0.02, "patience": 1},
    {"threshold": 0.1, "threshold_mode": "abs", "patience": 1}, {"mode": "max", "patience": 1},
    {"threshold": 0.05, "patience": 1, "mode": "max", "threshold_mode": "rel"},
])
def test_reduce_lr_on_plateau_follows_torch(settings):
    values = [1.0, 0.9, 0.95, 0.91, 0.92, 0.89, 0.893, 0.9, 0.95, 0.8, 0.81, 0.82, 0.83, 0.84, 0.79, 0.8, 0.8, 0.8]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    torch_settings = {k: v for k, v in settings.items()}
    torch_settings.setdefault("mode", "min")
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **{"patience": 10, **torch_settings})
    cb = gd.ReduceLROnPlateau(monitor="val_loss", **{"patience": 10, **settings})
    cb.optimizer = _Optimizer(0.1)
    cb.on_train_begin({})
    ours, theirs = [], []
    for epoch, v in enumerate(values):
        reference.step(v)
        cb.on_epoch_end(epoch, {"val_loss": v})
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(cb.optimizer.lr)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_reduce_lr_on_plateau_lowers_the_rate_fit_uses():
    X, Y = _data()
    history = _fit(_model(), X, Y, epochs=7, optimizer=gd.SGD(lr=1e-9),  # a loss that barely moves: a plateau
                   callbacks=[gd.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, eps=0.0)])
    # eps=0: torch's default 1e-8 would refuse drops this small. Epoch 0 sets the best, epochs 1
    # and 2 are bad: the rate halves for epoch 3, and again for epoch 5
    assert history["lr"] == pytest.approx([1e-9, 1e-9, 1e-9, 5e-10, 5e-10, 2.5e-10, 2.5e-10])


# -- CSVLogger, LambdaCallback, TensorBoard -----------------------------------------------------------


def test_csv_logger_writes_a_row_per_epoch(tmp_path):
    X, Y = _data()
    path = tmp_path / "log.csv"
    history = _fit(_model(), X, Y, epochs=3, validation_data=_data(6), callbacks=[gd.CSVLogger(path)])
    rows = list(csv.DictReader(path.open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in ("loss", "val_loss", "lr"):
        assert [float(r[key]) for r in rows] == history[key]  # repr: every digit
    _fit(_model(), X, Y, epochs=2, callbacks=[gd.CSVLogger(path, append=True)])
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3 + 2 and lines[0].startswith("epoch,")


def test_batch_logs_give_every_batch_loss_and_change_no_number():
    X, Y = _data(23)
    seen = []
    plain = _fit(_model(), X, Y, epochs=3)
    logged = _fit(_model(), X, Y, epochs=3,
                  callbacks=[gd.LambdaCallback(on_batch_end=lambda batch, logs: seen.append((batch, logs["loss"])))])
    assert logged == plain  # the same History, to the last bit
    assert [b for b, _ in seen] == [0, 1, 2, 3, 4] * 3
    sizes = torch.tensor([5, 5, 5, 5, 3], dtype=torch.float64)
    for epoch in range(3):
        losses = torch.tensor([v for _, v in seen[5 * epoch:5 * epoch + 5]], dtype=torch.float64)
        assert float(losses @ sizes / 23) == pytest.approx(plain["loss"][epoch], rel=1e-6)


def test_lambda_callback_hooks_see_the_epochs_logs_and_may_stop_the_run():
    X, Y = _data()
    calls = []
    model = _model()

    def stop_at_two(epoch, logs):
        calls.append(("end", epoch, sorted(logs)))
        if epoch == 1:
            model.stop_training = True

    history = _fit(model, X, Y, epochs=10, callbacks=[gd.LambdaCallback(
        on_train_begin=lambda logs: calls.append(("begin", logs)), on_epoch_begin=lambda e, logs: calls.append(e),
        on_epoch_end=stop_at_two, on_train_end=lambda logs: calls.append(("train_end", sorted(logs))))])
    assert len(history["loss"]) == 2
    assert calls == [("begin", {}), 0, ("end", 0, ["loss", "lr"]), 1, ("end", 1, ["loss", "lr"]),
                     ("train_end", ["loss", "lr"])]
    assert _fit(model, X, Y, epochs=2)["loss"]  # the next fit starts again: stop_training is reset


def test_tensorboard_writes_the_epochs_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="gd.TensorBoard needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    X, Y = _data()
    history = _fit(_model(), X, Y, epochs=3, callbacks=[gd.TensorBoard(tmp_path)])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(history["loss"], rel=1e-6)


# -- validation_split -----------------------------------------------------------------------------


def test_validation_split_holds_out_the_last_rows_as_keras_does():
    X, Y = _data(30)
    split = _fit(_model(), X, Y, validation_split=0.2)
    keep = math.floor(30 * 0.8)
    given = _fit(_model(), X[:keep], Y[:keep], validation_data=(X[keep:], Y[keep:]))
    assert split == given


# -- bad settings, refused before any epoch runs ----------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"callbacks": [gd.EarlyStopping(monitor="val_loss")]}, "EarlyStopping monitors 'val_loss'.*no validation data"),
    ({"callbacks": [gd.ReduceLROnPlateau(monitor="accuracy")]}, "monitors 'accuracy', which the logs will not have"),
    ({"callbacks": [print]}, r"callbacks\[0\] is a builtin_function_or_method, not a gd.Callback"),
    ({"callbacks": "EarlyStopping"}, "callbacks must be a list"),
    ({"validation_split": 1.5}, "validation_split"),
    ({"validation_split": 1.0}, "validation_split"),
    ({"validation_split": 0.99}, "leaves 0 to train on and 20 to validate"),
    ({"validation_split": 0.2, "validation_data": _data(4)}, "not both"),
])
def test_bad_callback_and_split_settings_are_refused_before_training(kwargs, message):
    X, Y = _data()
    model = _model()
    before = {k: t.clone() for k, t in model.state().items()}
    with pytest.raises(ValueError, match=message):
        _fit(model, X, Y, **kwargs)
    assert all(torch.equal(t, before[k]) for k, t in model.state().items())


@pytest.mark.parametrize("build, message", [
    (lambda: gd.EarlyStopping(patience=-1), "patience"),
    (lambda: gd.EarlyStopping(mode="up"), "mode must be"),
    (lambda: gd.EarlyStopping(monitor=""), "monitor must be"),
    (lambda: gd.ReduceLROnPlateau(factor=1.5), "factor"),
    (lambda: gd.ReduceLROnPlateau(factor=0), "factor"),
    (lambda: gd.ReduceLROnPlateau(threshold_mode="relative"), "threshold_mode"),
    (lambda: gd.ReduceLROnPlateau(min_lr=-1), "min_lr"),
    (lambda: gd.CSVLogger(3), "filename"),
    (lambda: gd.ModelCheckpoint(None), "filepath"),
    (lambda: gd.LambdaCallback(on_epoch_end=3), "on_epoch_end must be a function"),
])
def test_bad_callback_arguments_name_the_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_batch_logs_keep_accumulation_and_per_step_rates_exact():
    X, Y = _data(23)
    settings = {"optimizer": gd.Adam(lr=0.01), "schedule": gd.LinearWarmup(3), "accumulate": 2, "epochs": 3}
    plain = _fit(_model(), X, Y, **settings)
    seen = []
    logger = gd.LambdaCallback(on_batch_end=lambda b, logs: seen.append(b))
    logged = _fit(_model(), X, Y, **settings, callbacks=[logger])
    assert logged == plain and seen == [0, 1, 2, 3, 4] * 3


# -- resuming: a callback continues its state ---------------------------------------------------------


def _divergent_run(tmp_path, callbacks, epochs, **kwargs):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=gen)
    Y = X[:, :1] * 2 + 0.5 * torch.randn(60, 1, generator=gen)
    model = gd.Sequential(gd.Linear(5, 16, generator=torch.Generator().manual_seed(0)), gd.Tanh(),
                          gd.Linear(16, 1, generator=torch.Generator().manual_seed(1)))
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.05, momentum=0.9), epochs=epochs, batch_size=4, seed=0,
                        verbose=False, validation_split=0.5, callbacks=callbacks, **kwargs)
    return model, history


@pytest.mark.parametrize("make", [
    lambda tmp: [gd.ModelCheckpoint(tmp / "best.gdl", save_best_only=True)],
    lambda tmp: [gd.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0)],
    lambda tmp: [gd.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)],
    lambda tmp: [gd.CSVLogger(tmp / "log.csv"), gd.ModelCheckpoint(tmp / "best.gdl", save_best_only=True)],
], ids=["checkpoint", "plateau", "early-stopping", "csv"])
def test_a_resumed_run_continues_each_callbacks_state(tmp_path, make):
    """From the review: each callback reset itself on resume, so the best model file was
    overwritten by a worse one, the rate went back up and the restored weights differed."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    model_a, history_a = _divergent_run(straight, make(straight), 8)
    _divergent_run(interrupted, make(interrupted), 4, checkpoint=interrupted / "run.gdl")
    model_b, history_b = _divergent_run(interrupted, make(interrupted), 8, resume=interrupted / "run.gdl")
    assert history_b == history_a
    for name, t in model_a.state().items():
        assert torch.equal(t, model_b.state()[name]), name
    if (straight / "best.gdl").exists():
        best_a, best_b = gd.load(straight / "best.gdl").state(), gd.load(interrupted / "best.gdl").state()
        assert all(torch.equal(t, best_b[name]) for name, t in best_a.items())
    if (straight / "log.csv").exists():
        assert (interrupted / "log.csv").read_text() == (straight / "log.csv").read_text()


def test_resuming_with_other_callbacks_is_refused_before_any_file_is_touched(tmp_path):
    _divergent_run(tmp_path, [gd.CSVLogger(tmp_path / "log.csv")], 2, checkpoint=tmp_path / "run.gdl")
    log = (tmp_path / "log.csv").read_bytes()
    with pytest.raises(ValueError, match=r"written by a fit with callbacks \['CSVLogger'\], but this fit has "
                                         r"\['EarlyStopping'\]"):
        _divergent_run(tmp_path, [gd.EarlyStopping(monitor="val_loss")], 4, resume=tmp_path / "run.gdl")
    assert (tmp_path / "log.csv").read_bytes() == log


def test_a_diverged_fit_still_ends_its_callbacks(tmp_path):
    """From the review: on DivergedError the CSV file stayed open and the best weights
    EarlyStopping kept were not restored."""
    X, Y = _data()
    stopper = gd.EarlyStopping(monitor="loss", patience=50, restore_best_weights=True)
    logger = gd.CSVLogger(tmp_path / "log.csv")
    model = _model()
    with pytest.raises(gd.DivergedError):
        _fit(model, X, Y, epochs=30, optimizer=gd.SGD(lr=0.1), schedule=gd.ExponentialDecay(100.0),
             callbacks=[stopper, logger])
    assert logger._file is None
    for name, t in model.state().items():
        assert torch.equal(t, stopper.best_weights[name]), name
