"""graphdl.train: fit's epoch loop, predict and evaluate, against PyTorch as the oracle;
metrics and accuracy, threads, the data and settings fit checks, and divergence."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BIG, _classifier, _data, _model, _net, _sine, _torch_sgd_losses, _torch_twin, _TwinDropout
from messages import names

import graphdl as gd


@pytest.mark.parametrize("loss_name", ["mse", "mae"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fit_follows_torch_optim_sgd(loss_name, momentum):
    gen = torch.Generator().manual_seed(3)
    X, Y = torch.rand(30, 2, generator=gen), (torch.rand(30, 1, generator=gen) > 0.5).float()
    model = _net(gen)
    twin = _torch_twin(model)
    loss = {"mse": gd.MSE(), "mae": gd.MAE()}[loss_name]
    history = model.fit(X, Y, loss=loss, optimizer=gd.SGD(lr=0.05, momentum=momentum), epochs=4,
                        batch_size=7, shuffle=False, verbose=False)  # 30 = 4*7 + 2: a partial batch

    criterion = {"mse": torch.nn.MSELoss(), "mae": torch.nn.L1Loss()}[loss_name]
    expected = _torch_sgd_losses(twin, criterion, X, Y, 4, 7, 0.05, momentum)
    assert history["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    linears = [m for m in twin if isinstance(m, torch.nn.Linear)]
    for layer, lin in zip([m for m in model.layers if isinstance(m, gd.Linear)], linears):
        torch.testing.assert_close(layer.weight, lin.weight.detach().T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias, lin.bias.detach(), rtol=1e-5, atol=1e-6)


def test_fit_argument_checks():
    model = gd.Sequential(gd.Linear(2, 1))
    X, Y = torch.rand(4, 2), torch.rand(4, 1)
    with pytest.raises(ValueError, match="batch_size"):
        model.fit(X, Y, batch_size=0, verbose=False)
    with pytest.raises(ValueError, match="epochs"):
        model.fit(X, Y, epochs=-1, verbose=False)
    with pytest.raises(ValueError, match="4 examples but Y has 3"):
        model.fit(X, Y[:3], verbose=False)
    with pytest.raises(ValueError, match="3 features but the model takes 2"):
        model.fit(torch.rand(4, 3), Y, verbose=False)


def test_fit_learns_and_reports_metrics():
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(200, 2, generator=gen)
    Y = (X.sum(1, keepdim=True) > 1).float()
    model = _net(gen)
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=30, batch_size=10,
                        validation_data=(X, Y), seed=0, verbose=False)
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(len(v) == 30 for v in history.values())
    assert history["loss"][-1] < history["loss"][0] / 3
    scores = model.evaluate(X, Y, loss=gd.MSE())
    assert scores["accuracy"] > 0.9 and scores["error"] == pytest.approx(1 - scores["accuracy"])
    assert scores["loss"] == pytest.approx(history["val_loss"][-1])
    pred = model.predict(X)
    assert pred.shape == (200, 1)
    assert scores["accuracy"] == pytest.approx(((pred > 0.5) == (Y > 0.5)).float().mean().item())


def test_fit_prints_one_line_per_epoch(capsys):
    model = gd.Sequential(gd.Linear(2, 1))
    model.fit(torch.rand(6, 2), torch.rand(6, 1), epochs=3, batch_size=4, verbose=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("Epoch 3/3") and "loss:" in lines[-1]
    model.fit(torch.rand(6, 2), torch.rand(6, 1), epochs=2, verbose=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("trainable", [True, False], ids=["net", "no-trainable-params"])
def test_an_epoch_makes_no_tensor_from_host_numbers(trainable):
    """Each epoch reads the device once. A tensor made from a host number (torch.tensor)
    is, on CUDA, a blocking copy: one more host sync, which waits for the epoch's queued
    steps. Counted on CPU as torch's `lift_fresh` op, which every such tensor goes through:
    one epoch and three, with metrics on the training and validation data, make as many
    (also for a model with nothing to train, whose params' magnitude is a 0)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Made(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Made.count += func is torch.ops.aten.lift_fresh.default
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(20, 2, generator=gen), torch.randint(0, 2, (20,), generator=gen)

    def made(epochs: int) -> int:
        model = _net(torch.Generator().manual_seed(1)) if trainable else gd.Sequential(gd.Standardize().adapt(X))
        Made.count = 0
        with Made():
            model.fit(X, Y, epochs=epochs, batch_size=8, seed=0, verbose=False, metrics=["accuracy", "mae"],
                      validation_data=(X[:5], Y[:5]))
        return Made.count

    assert made(3) == made(1)


def test_shuffling_is_seeded():
    def trained(seed: int, shuffle: bool = True) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        X, Y = torch.rand(40, 2, generator=gen), torch.rand(40, 1, generator=gen)
        model = _net(gen)
        model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=3, batch_size=4, seed=seed, shuffle=shuffle, verbose=False)
        return model.layers[0].weight
    assert torch.equal(trained(1), trained(1))
    assert not torch.equal(trained(1), trained(2))
    assert not torch.equal(trained(1), trained(1, shuffle=False))


# -- classification: accuracy and metrics -----------------------------------------------------------


def test_integer_labels_train_exactly_as_one_hot_rows():
    def trained(Y: torch.Tensor) -> gd.Sequential:
        gen = torch.Generator().manual_seed(3)
        model = _classifier(gen, 3, torch.float32)
        model.fit(X, Y, loss=gd.CrossEntropy(), epochs=2, batch_size=4, seed=0, verbose=False)
        return model
    X, labels = torch.randn(12, 2), torch.arange(12) % 3
    a, b = trained(labels), trained(torch.nn.functional.one_hot(labels, 3).float())
    assert all(torch.equal(a.parameters()[k], b.parameters()[k]) for k in a.parameters())
    assert a.evaluate(X, labels) == b.evaluate(X, torch.nn.functional.one_hot(labels, 3).float())
    with pytest.raises(ValueError, match="holds class label 3, but the model has 3 outputs, so labels run from 0 to 2"):
        a.evaluate(X, labels + 1)
    binary = gd.Sequential(gd.Linear(2, 1))
    assert binary.evaluate(X, labels % 2) == binary.evaluate(X, (labels % 2).float().unsqueeze(1))
    with pytest.raises(ValueError, match="holds class label 2, but the model has 1 output, so labels run from 0 to 1"):
        binary.fit(X, labels, verbose=False)


def _identity_model() -> gd.Sequential:
    """One output equal to the one input: predictions are whatever X says."""
    model = gd.Sequential(gd.Linear(1, 1))
    model.layers[0].weight.fill_(1.0)
    model.layers[0].bias.zero_()
    return model


def test_accuracy_reads_predictions_as_the_loss_says():
    model = _identity_model()
    X = torch.tensor([[0.3], [-0.2], [0.7], [0.1]])  # logits or outputs
    Y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    assert model.evaluate(X, Y, loss=gd.BCEWithLogits())["accuracy"] == 0.75  # above 0 is class 1: 0.1 is wrong
    assert model.evaluate(X, Y, loss=gd.MSE())["accuracy"] == 0.75  # above 0.5 is class 1: 0.3 is wrong
    assert model.evaluate(X, Y, loss=gd.BCEWithLogits())["error"] == pytest.approx(0.25)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.1, 5.0]])
    assert gd.train.accuracy(logits, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "argmax") == 0.5
    assert gd.train.accuracy(logits, torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.1, 0.7]]), "argmax") == 1.0


def test_metrics_are_counted_exactly_whatever_the_dtype():
    """3001 predictions, 1501 right: in float16 a mean would round (to 0.5 or 0.5005);
    the count is exact."""
    pred = torch.cat([torch.ones(1501, 1), torch.zeros(1500, 1)]).half()
    assert gd.train.accuracy(pred, torch.ones(3001, 1).half()) == 1501 / 3001
    zeros = torch.zeros(3001, 1).half()
    total, count = gd.train.METRICS["mse"].stats(pred, zeros, "threshold", zeros[:1])  # a sum, a count
    assert (total.dtype, float(total), float(count)) == (torch.float64, 1501.0, 3001.0)


def test_regression_reports_no_accuracy_unless_asked(capsys):
    X, Y = _sine()
    model = gd.Sequential(gd.Linear(1, 8), gd.Tanh(), gd.Linear(8, 1))
    history = model.fit(X, Y, epochs=2, batch_size=8, validation_data=(X, Y), verbose=True)
    assert set(history) == {"loss", "val_loss", "lr"}
    assert history["accuracy"] == [] and history["val_accuracy"] == []  # unmeasured metrics read as empty
    with pytest.raises(KeyError):
        history["los"]
    out = capsys.readouterr().out
    assert "loss:" in out and "accuracy" not in out
    assert set(model.evaluate(X, Y)) == {"loss"}
    history = model.fit(X, Y, epochs=2, batch_size=8, validation_data=(X, Y), metrics=["mse", "mae"], verbose=False)
    assert list(history) == ["loss", "mse", "mae", "val_loss", "val_mse", "val_mae", "lr"]
    scores = model.evaluate(X, Y, metrics=["mae", "accuracy"])
    pred = model.predict(X).double()
    assert scores["mae"] == pytest.approx(float((pred - Y.double()).abs().mean()), rel=1e-12)
    assert history["val_mse"][-1] == pytest.approx(float(((pred - Y.double()) ** 2).mean()), rel=1e-12)
    assert scores["error"] == pytest.approx(1 - scores["accuracy"])


@pytest.mark.parametrize("Y, loss, reported", [
    (torch.tensor([[0.0], [1.0], [1.0], [0.0]]), gd.MSE(), True),
    (torch.tensor([[0.0], [1.0], [1.0], [0.5]]), gd.MSE(), False),
    (torch.tensor([[0.0], [1.0], [1.0], [0.0]]), gd.BCEWithLogits(), True),
    (torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]), gd.BCEWithLogits(), True),  # multi-label
    (torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]), gd.CrossEntropy(), True),  # probabilities
    (torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]), gd.MSE(), False),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), gd.MSE(), True),  # one-hot rows
    (torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), gd.CrossEntropy(), False),  # rows sum to 2
])
def test_accuracy_is_reported_by_default_only_for_class_labels(Y, loss, reported):
    model = gd.Sequential(gd.Linear(2, Y.shape[1]))
    X = torch.rand(4, 2)
    history = model.fit(X, Y, loss=loss, epochs=1, verbose=False)
    assert ("accuracy" in history) == reported
    assert ("accuracy" in model.evaluate(X, Y, loss=loss)) == reported == ("error" in model.evaluate(X, Y, loss=loss))
    assert set(model.evaluate(X, Y, loss=loss, metrics=[])) == {"loss"}


@pytest.mark.parametrize("metrics", ["accuracy", ["accuracy", "accuracy"], ["f2"], ["top_0_accuracy"], [gd.MSE()], 3])
def test_bad_metrics_name_the_argument(metrics):
    model = gd.Sequential(gd.Linear(2, 1))
    with pytest.raises(ValueError, match=r"metrics must be a list of distinct metric names from 'accuracy', 'mse'"):
        model.fit(torch.rand(4, 2), torch.rand(4, 1), metrics=metrics, verbose=False)


def test_evaluate_and_fit_default_to_the_loss_the_model_was_trained_with():
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.randn(20, 2, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    model = _classifier(gen, 3, torch.float32)
    assert model.loss is None
    model.fit(X, labels, loss=gd.CrossEntropy(), epochs=1, verbose=False)
    assert model.loss == gd.CrossEntropy()
    assert model.evaluate(X, labels) == model.evaluate(X, labels, loss=gd.CrossEntropy())
    assert model.evaluate(X, labels)["loss"] != model.evaluate(X, labels, loss=gd.MSE())["loss"]
    history = model.fit(X, labels, epochs=1, shuffle=False, verbose=False)  # still cross-entropy
    twin_loss = torch.nn.CrossEntropyLoss()(_torch_twin(model)(X), labels).item()
    assert model.evaluate(X, labels)["loss"] == pytest.approx(twin_loss, rel=1e-5) and history.epochs == 1


# -- threads ----------------------------------------------------------------------------------------


class _ThreadsSeen(gd.Schedule):
    """A schedule that records torch's thread count each epoch (fit calls it inside training)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, epoch: int, base_lr: float) -> float:
        self.seen.append(torch.get_num_threads())
        return base_lr


@pytest.mark.parametrize("width, threads, inside", [(4, None, 1), (4, 2, 2), (4, 1, 1), (1100, None, 3)])
def test_fit_picks_threads_by_the_work_and_restores_them(width, threads, inside):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        model = gd.Sequential(gd.Linear(2, width), gd.Tanh(), gd.Linear(width, width), gd.Linear(width, 1))
        seen = _ThreadsSeen()
        X, Y = torch.rand(8, 2), torch.rand(8, 1)
        model.fit(X, Y, schedule=seen, epochs=2, batch_size=8, threads=threads, verbose=False)
        assert seen.seen == [inside, inside] and torch.get_num_threads() == 3
        with pytest.raises(FloatingPointError):  # restored when training stops early, too
            model.fit(X, Y * 1e30, optimizer=gd.SGD(lr=1e10), epochs=2, threads=threads, verbose=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads_name_the_argument(threads):
    model = gd.Sequential(gd.Linear(2, 1))
    for call in (lambda: model.fit(torch.rand(4, 2), torch.rand(4, 1), threads=threads, verbose=False),
                 lambda: model.predict(torch.rand(4, 2), threads=threads),
                 lambda: model.evaluate(torch.rand(4, 2), torch.rand(4, 1), threads=threads)):
        with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
            call()


# -- odd tensors: data that requires grad, meta data and models -------------------------------------


def test_fit_takes_data_and_params_that_require_grad():
    """Features from another torch model, weights brought over from torch.nn: no tape, same numbers."""
    gen = torch.Generator().manual_seed(2)
    X, Y = torch.rand(10, 2, generator=gen), torch.rand(10, 1, generator=gen)
    a, b = _net(torch.Generator().manual_seed(3)), _net(torch.Generator().manual_seed(3))
    for layer in a.layers:
        if isinstance(layer, gd.Linear):
            layer.weight = torch.nn.Parameter(layer.weight.clone())
    a.fit(X.clone().requires_grad_(), Y.clone().requires_grad_(), optimizer=gd.SGD(lr=0.1, momentum=0.9),
          epochs=2, batch_size=3, seed=0, verbose=False)
    b.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=2, batch_size=3, seed=0, verbose=False)
    for p, q in zip(a.parameters().values(), b.parameters().values()):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert a.predict(X.requires_grad_()).grad_fn is None


def test_meta_data_and_meta_models_are_refused_saying_why(tmp_path):
    model = _net(torch.Generator().manual_seed(0))
    X, Y = torch.rand(4, 2), torch.rand(4, 1)
    for call in (lambda: model.fit(X.to("meta"), Y.to("meta"), verbose=False),
                 lambda: model.evaluate(X.to("meta"), Y.to("meta"))):
        with pytest.raises(ValueError, match="X is on the meta device, which holds shapes but no values"):
            call()
    model.to("meta")
    assert model.predict(X.to("meta")).shape == (4, 1)  # shapes alone: fine on meta
    with pytest.raises(ValueError, match="param 0.weight is on the meta device"):
        model.fit(X, Y, verbose=False)
    with pytest.raises(gd.GraphError, match="meta device"):
        model.save(tmp_path / "meta.gdl")
    assert not (tmp_path / "meta.gdl").exists()


# -- bookkeeping in float32 or wider, whatever the model's dtype ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("outputs", [1, 2], ids=["threshold", "argmax"])
def test_accuracy_and_error_are_exact_counts(dtype, outputs):
    """9 wrong out of 1,000 is reported as 0.991 and 0.009 exactly, not the mean of 0/1s in
    the model's dtype (bfloat16 gave 0.98828125)."""
    labels = torch.arange(1000) % 2
    wrong = torch.zeros(1000, dtype=torch.bool)
    wrong[torch.arange(9) * 101] = True
    predicted = torch.where(wrong, 1 - labels, labels)
    if outputs == 1:  # the identity: predictions are the inputs
        X, Y = predicted.to(dtype)[:, None], labels.to(dtype)[:, None]
    else:
        X, Y = torch.eye(2, dtype=dtype)[predicted], torch.eye(2, dtype=dtype)[labels]
    model = gd.Sequential(gd.Linear(outputs, outputs, dtype=dtype))
    model.layers[0].weight = torch.eye(outputs, dtype=dtype)
    model.layers[0].bias = torch.zeros(outputs, dtype=dtype)
    scores = model.evaluate(X, Y)
    assert (scores["accuracy"], scores["error"]) == (0.991, 0.009)
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.0), epochs=1, validation_data=(X, Y), verbose=False)
    assert history["accuracy"] == history["val_accuracy"] == [0.991]


def test_a_model_with_nothing_to_train_fits_as_a_no_op():
    X, Y = torch.rand(5, 2), torch.rand(5, 2)
    model = gd.Sequential(gd.Standardize().adapt(X))
    before = {k: t.clone() for k, t in model.state().items()}
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=2, verbose=False)
    assert len(history["loss"]) == 2 and all(torch.equal(t, before[k]) for k, t in model.state().items())


# -- training: bad settings raise ValueError naming the argument ------------------------------------


def _fit_message(*args, **kwargs) -> str:
    X, Y = _data()
    kwargs = {"verbose": False, **kwargs}
    with pytest.raises(ValueError) as err:
        _model().fit(*(args or (X, Y)), **kwargs)
    return str(err.value)


X_NAN = torch.tensor([[0.1, 0.2], [0.3, float("nan")], [0.5, 0.6]])


@pytest.mark.parametrize("args, kwargs, expect", [
    ((), {"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
    ((), {"epochs": -1}, "epochs must be a whole number >= 0, got -1"),
    ((torch.rand(4, 2), torch.rand(3, 1)), {}, "X has 4 examples but Y has 3"),
    ((torch.rand(4, 3), torch.rand(4, 1)), {}, "X has 3 features but the model takes 2"),
    ((torch.rand(4, 2).numpy(), torch.rand(4, 1)), {}, "X must be a torch.Tensor, got ndarray"),
    ((X_NAN, torch.rand(3, 1)), {}, r"X has NaN or inf values, first at X\[1, 1\] = nan; drop or repair"),
    ((torch.rand(3, 2), torch.tensor([[0.0], [float("inf")], [1.0]])), {}, r"Y has NaN or inf .* Y\[1, 0\] = inf"),
    ((), {"validation_data": (X_NAN, torch.rand(3, 1))}, r"X \(validation\) has NaN or inf values"),
    ((torch.rand(0, 2), torch.rand(0, 1)), {}, "X and Y have no examples"),
    ((), {"validation_data": torch.rand(3, 2)}, r"validation_data must be a pair \(X_val, Y_val\) or a triple "
                                                r"\(X_val, Y_val, weights\), got Tensor"),
    ((), {"validation_data": (1, 2, 3, 4)}, "validation_data must be a pair .* got tuple of length 4"),
    ((), {"validation_data": (1, 2, 3)}, "validation_data's sample weights must be a 1-d float tensor"),
    ((), {"seed": 1.5}, r"seed must be a whole number in \[-9223372036854775808, 18446744073709551615\], got 1.5"),
    ((), {"schedule": 3}, "schedule must be a graphdl schedule such as gd.StepDecay"),
    ((), {"schedule": lambda epoch, lr: -lr}, "gave lr=-0.01 for epoch 1; a learning rate must be a finite number"),
    ((), {"schedule": lambda lr: lr}, r"cannot be called as schedule\(epoch, base_lr\)"),
    ((), {"shuffle": torch.ones(2)}, "shuffle must be True or False"),
    ((), {"verbose": "no"}, "verbose must be True or False, got 'no'"),
    ((torch.rand(4, 2, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)), {},
     r"input x is f64\[4,2\] but the graph declares f32\[N,2\]; convert it with .to\(torch.float32\)"),
])
def test_bad_fit_arguments_name_the_argument(args, kwargs, expect):
    names(_fit_message(*args, **kwargs), expect)


@pytest.mark.parametrize("kwargs, expect", [
    ({"seed": 2**70}, "seed=1180591620717411303424 is too large; seed must be at most 18446744073709551615"),
    ({"seed": -2**70}, "seed must be a whole number >= -9223372036854775808"),
    ({"batch_size": 2.0}, r"batch_size must be a whole number >= 1, got 2.0"),
    ({"schedule": lambda epoch, lr: BIG}, r"gave lr=10{11}.*\(401 digits\) for epoch 1; a learning rate must be"),
    ({"schedule": lambda epoch, lr: float("nan")}, "gave lr=nan for epoch 1"),
    ({"schedule": lambda epoch, lr: "0.1"}, "gave lr='0.1' for epoch 1"),
    ({"schedule": gd.StepDecay(every=1, factor=1e300), "optimizer": gd.SGD(lr=0.0), "epochs": 3},
     r"schedule StepDecay\(every=1, factor=1e\+300\) overflowed computing the lr for epoch 3"),
])
def test_fit_number_settings_and_schedule_outputs(kwargs, expect):
    names(_fit_message(**kwargs), expect.replace("10{11}", "1" + "0" * 11))


def test_evaluate_checks_its_data_too():
    with pytest.raises(ValueError, match=r"Y has NaN or inf values, first at Y\[2, 0\]"):
        _model().evaluate(torch.rand(3, 2), torch.tensor([[0.0], [1.0], [float("nan")]]))


def test_params_that_are_not_finite_before_training():
    model = _model()
    model.layers[2].bias[0] = float("nan")
    X, Y = _data()
    with pytest.raises(ValueError, match="param 2.bias is NaN or inf before training; re-initialise the model"):
        model.fit(X, Y, verbose=False)


# -- training: divergence stops with the last finite params and the history -------------------------


def _reference_divergence(X, Y, lr, momentum, epochs, batch_size, seed):
    """fit's loop, written out with a host sync per batch: where the loss first stops being
    finite, the params the model had then, and each completed epoch's mean loss."""
    model = _model()
    params = list(model.parameters().values())
    step = gd.compile(gd.grad(model.graph(gd.MSE()), list(model.parameters())))
    opt = gd.SGD(lr=lr, momentum=momentum)
    opt.reset(params)
    gen = torch.Generator().manual_seed(seed)
    sizes = [min(batch_size, len(X) - s) for s in range(0, len(X), batch_size)]
    weights = torch.tensor(sizes, dtype=X.dtype, device=X.device) / len(X)
    losses_per_epoch = []
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=gen).to(X.device)
        Xe, Ye = X.index_select(0, order), Y.index_select(0, order)
        losses = []
        for b, first in enumerate(range(0, len(X), batch_size)):
            out = step(x=Xe[first:first + batch_size], y=Ye[first:first + batch_size])
            if not torch.isfinite(out[0]):
                return epoch + 1, b + 1, {k: v.clone() for k, v in model.parameters().items()}, losses_per_epoch
            opt.update(params, list(out[1:]), lr, overwrite_grads=True)  # as fit updates, to the bit
            losses.append(out[0])
        losses_per_epoch.append(float(torch.stack(losses) @ weights))
    raise AssertionError("the reference run did not diverge")


@pytest.mark.parametrize("lr, momentum, batch_size", [(1.0, 0.9, 3), (5.0, 0.9, 3), (2.0, 0.0, 4)])
def test_divergence_names_epoch_and_batch_and_keeps_the_last_finite_params(lr, momentum, batch_size):
    X, Y = _data(scale=10.0)
    epoch, batch, params, losses = _reference_divergence(X, Y, lr, momentum, 30, batch_size, seed=0)
    model = _model()
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, optimizer=gd.SGD(lr=lr, momentum=momentum), epochs=30, batch_size=batch_size, seed=0,
                  verbose=False)
    e = err.value
    assert (e.epoch, e.batch) == (epoch, batch)
    names(str(e), rf"the loss became (inf|nan) in epoch {epoch}/30, batch {batch}/\d+ \(lr={lr:g}\)",
          "keeps its last finite params",
          f"history of the {epoch - 1} completed epoch" if epoch > 1 else "No epoch completed", r"\.history",
          "model.history", "hint: lower the learning rate")
    for name, value in model.parameters().items():
        assert torch.isfinite(value).all() and torch.equal(value, params[name]), name
    assert e.history is model.history and e.history["loss"] == losses
    assert len(e.history["lr"]) == epoch - 1 and "accuracy" not in e.history  # regression targets: no accuracy


def test_an_update_that_makes_params_infinite_is_undone():
    """The loss is finite (1e38) but its gradient times a huge lr overflows the weight."""
    model = gd.Sequential(gd.Linear(1, 1))
    model.layers[0].weight.fill_(1e19)
    model.layers[0].bias.zero_()
    X, Y = torch.ones(4, 1), torch.zeros(4, 1)
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, optimizer=gd.SGD(lr=1e20), epochs=1, batch_size=2, shuffle=False, verbose=False)
    names(str(err.value), r"the update of epoch 1/1, batch 1/2 \(lr=1e\+20\) made params NaN or inf",
          "the loss was 1e\\+38", "keeps its params from before that update",
          "No epoch completed; the empty history is on this error's .history and on model.history")
    assert torch.equal(model.layers[0].weight, torch.full((1, 1), 1e19))
    assert (err.value.epoch, err.value.batch) == (1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_params_magnitude_is_finite_exactly_when_every_element_is(dtype):
    """fit's one number for "every param is finite": no overflow from the largest finite
    values, however many, and inf, -inf or NaN anywhere, in any tensor, shows."""
    from graphdl.divergence import magnitude
    top = torch.finfo(dtype).max
    params = [torch.full((300, 7), top, dtype=dtype), torch.full((5,), -top, dtype=dtype), torch.zeros(0, dtype=dtype),
              torch.ones((), dtype=dtype)]
    assert math.isfinite(float(magnitude(params)))
    assert float(magnitude([])) == 0.0
    for bad in (float("inf"), float("-inf"), float("nan")):
        for k in (0, 1, 3):
            broken = [p.clone() for p in params]
            broken[k].view(-1)[-1] = bad
            assert not math.isfinite(float(magnitude(broken))), (bad, k)
    mixed = [torch.ones(3, dtype=torch.float64), torch.tensor([float("nan")], dtype=dtype)]
    assert not math.isfinite(float(magnitude(mixed)))


def test_params_whose_norm_is_past_float32s_range_are_not_taken_for_divergence():
    """Every param finite, their 2-norm (4.2e38) past float32's largest: fit trains on."""
    net = gd.Sequential(gd.Linear(2, 1), input_shape=(2,))
    net.parameters()["0.weight"].fill_(3e38)
    history = net.fit(torch.zeros(8, 2), torch.randn(8, 1, generator=torch.Generator().manual_seed(0)),
                      loss=gd.MSE(), optimizer=gd.SGD(lr=0.1), epochs=2, batch_size=4, verbose=False)
    assert history.epochs == 2 and all(math.isfinite(v) for v in history["loss"])


def test_an_epoch_whose_replay_stays_finite_is_rolled_back_whole(monkeypatch):
    """If the replay cannot find the batch (a non-deterministic kernel), the model goes back
    to the epoch's start, which was checked finite."""
    from graphdl import train
    model, (X, Y) = _model(), _data()
    real = train.magnitude
    calls, before = {"n": 0}, {}

    def flaky(tensors, device="cpu"):  # calls: end of epoch 1 (= start of 2), end of epoch 2: say a param is not finite
        calls["n"] += 1
        if calls["n"] == 1:
            before.update({k: v.clone() for k, v in model.parameters().items()})
        return torch.tensor(float("inf")) if calls["n"] == 2 else real(tensors, device)

    monkeypatch.setattr(train, "magnitude", flaky)
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, epochs=5, batch_size=4, seed=0, verbose=False)
    names(str(err.value), "diverged in epoch 2/5", "the batch is unknown", "params from the start of that epoch")
    assert err.value.batch is None and err.value.history.epochs == 1
    assert all(torch.equal(v, before[k]) for k, v in model.parameters().items())


# -- beyond two dims: a net of an Embedding, Flatten, Reshape and the new activations -----------------


def _sequence_model(dtype: torch.dtype) -> tuple[gd.Sequential, torch.nn.Sequential]:
    """The net in graphdl and its torch twin by hand (not through to_torch), with the same weights."""
    gen = torch.Generator().manual_seed(4)
    model = gd.Sequential(gd.Embedding(13, 4, gen, dtype), gd.Flatten(), gd.GELU(), gd.Linear(12, 8, gen, dtype),
                          gd.LeakyReLU(0.1), gd.Linear(8, 8, gen, dtype), gd.SiLU(), gd.Reshape((2, 4)),
                          gd.GELU(approximate="tanh"), gd.Flatten(), gd.Linear(8, 3, gen, dtype), input_shape=(3,))
    nn = torch.nn
    twin = nn.Sequential(nn.Embedding(13, 4), nn.Flatten(), nn.GELU(), nn.Linear(12, 8), nn.LeakyReLU(0.1),
                         nn.Linear(8, 8), nn.SiLU(), nn.Unflatten(1, (2, 4)), nn.GELU(approximate="tanh"), nn.Flatten(),
                         nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        twin[0].weight.copy_(model.layers[0].weight)
        for k in (3, 5, 10):
            twin[k].weight.copy_(model.layers[k].weight.T)
            twin[k].bias.copy_(model.layers[k].bias)
    return model, twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_net_beyond_2d_follows_torch_in_training(dtype):
    """Same weights, same batches (a partial one last), SGD with momentum and weight decay,
    CrossEntropy on class labels: the same losses epoch by epoch and the same weights at the end."""
    model, twin = _sequence_model(dtype)
    gen = torch.Generator().manual_seed(5)
    X, labels = torch.randint(0, 13, (30, 3), generator=gen), torch.randint(0, 3, (30,), generator=gen)
    history = model.fit(X, labels, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
                        epochs=4, batch_size=7, shuffle=False, verbose=False)
    expected = _torch_sgd_losses(twin, torch.nn.functional.cross_entropy, X, labels, 4, 7, 0.1, 0.9, 0.01)
    tol = {"rel": 1e-12} if dtype == torch.float64 else {"rel": 1e-5, "abs": 1e-6}
    assert history["loss"] == pytest.approx(expected, **tol)
    assert history["loss"][-1] < history["loss"][0]  # it learns
    close = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach(), **close)
    for k in (3, 5, 10):
        torch.testing.assert_close(model.layers[k].weight, twin[k].weight.detach().T, **close)
        torch.testing.assert_close(model.layers[k].bias, twin[k].bias.detach(), **close)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), twin(X), **close)


def test_fit_checks_examples_of_any_rank_against_the_models_input():
    model, _ = _sequence_model(torch.float32)
    Y = torch.rand(4, 3)
    names(_value_error(lambda: model.fit(torch.zeros(4, 3, 1).long(), Y, verbose=False)),
          r"X must be 2-d \[examples, features\], got shape \[4, 3, 1\]")
    names(_value_error(lambda: model.fit(torch.zeros(4, 5).long(), Y, verbose=False)),
          "X has 5 features but the model takes 3")
    images = gd.Sequential(gd.Flatten(), gd.Linear(12, 1), input_shape=(3, 4))
    names(_value_error(lambda: images.fit(torch.rand(4, 12), torch.rand(4, 1), verbose=False)),
          r"X must be 3-d \[examples, 3, 4\], got shape \[4, 12\]")
    names(_value_error(lambda: images.fit(torch.rand(4, 4, 3), torch.rand(4, 1), verbose=False)),
          r"X holds examples of shape \[4, 3\] but the model takes \[3, 4\]")
    bad = torch.rand(4, 3, 4)
    bad[2, 1, 3] = float("nan")
    names(_value_error(lambda: images.fit(bad, torch.rand(4, 1), verbose=False)),
          r"X has NaN or inf values, first at X\[2, 1, 3\] = nan")


def _value_error(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


# -- nets beyond two dims: convolution, pooling, BatchNorm and Dropout against PyTorch -------


def _conv_twin(model: gd.Sequential) -> torch.nn.Sequential:
    """The same net in torch.nn, with copies of the same weights and running statistics."""
    from graphdl.interop import TORCH_LAYERS
    rows = {row.layer: row for row in TORCH_LAYERS}
    modules = []
    for layer in model.layers:
        if isinstance(layer, gd.Reshape):
            modules.append(torch.nn.Unflatten(1, layer.shape))
        elif isinstance(layer, gd.Flatten):
            modules.append(torch.nn.Flatten())
        elif isinstance(layer, gd.Dropout):
            modules.append(_TwinDropout(layer))
        else:
            modules.append(rows[type(layer)].to_module(layer))
    return torch.nn.Sequential(*modules)


def _conv_net(dtype: torch.dtype, p: float = 0.0) -> gd.Sequential:
    gen = torch.Generator().manual_seed(5)
    return gd.Sequential(
        gd.Reshape((2, 6, 6)),
        gd.Conv2d(2, 4, 3, padding=1, generator=gen, dtype=dtype), gd.BatchNorm2d(4, momentum=0.2, dtype=dtype),
        gd.ReLU(), gd.MaxPool2d(2),  # [4, 3, 3]
        gd.Conv2d(4, 6, 2, groups=2, generator=gen, dtype=dtype), gd.Dropout(p, seed=9),  # [6, 2, 2]
        gd.AvgPool2d(2, stride=1),  # [6, 1, 1]
        gd.Flatten(), gd.Linear(6, 3, generator=gen, dtype=dtype))


def _seq_net(dtype: torch.dtype, p: float = 0.0) -> gd.Sequential:
    gen = torch.Generator().manual_seed(6)
    return gd.Sequential(
        gd.Reshape((3, 8)),
        gd.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1, generator=gen, dtype=dtype),  # [4, 4]
        gd.BatchNorm1d(4, dtype=dtype), gd.Tanh(), gd.LayerNorm(4, dtype=dtype), gd.Dropout(p, seed=3),
        gd.Flatten(), gd.Linear(16, 3, generator=gen, dtype=dtype), gd.BatchNorm1d(3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("build, features", [(_conv_net, 72), (_seq_net, 24)], ids=["conv2d", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_a_conv_net_follows_pytorchs_trajectory_running_statistics_included(build, features, dtype, p):
    """fit against its torch twin (the same weights, batches and masks) with torch.optim.SGD:
    the losses per epoch, the weights, and BatchNorm's running statistics at the end, then
    predict (inference mode) against the twin in eval mode (after 12 steps in float32 the
    weights differ by rounding, so against the trained weights themselves too)."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(26, features, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (26,), generator=gen)
    model = build(dtype, p)
    twin = _conv_twin(model)
    history = model.fit(X, labels, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=3,
                        batch_size=8, shuffle=False, verbose=False)  # 26 = 3*8 + 2: a partial batch
    expected = _torch_sgd_losses(twin, torch.nn.functional.cross_entropy, X, labels, 3, 8, 0.1, 0.9)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert history["loss"] == pytest.approx(expected, rel=tol["rtol"])
    mine = model.state()
    theirs = {f"{k}.{name}": t.T if isinstance(m, torch.nn.Linear) and name == "weight" else t  # [out, in] there
              for k, m in enumerate(twin) for name, t in m.state_dict().items()
              if not name.endswith("num_batches_tracked")}
    weights = {name: t for name, t in mine.items() if not name.endswith(".key")}
    assert set(weights) == set(theirs) and any("running_var" in name for name in weights)
    for name, t in weights.items():
        torch.testing.assert_close(t, theirs[name].detach(), **tol, msg=name)
    assert [float(t) for name, t in mine.items() if name.endswith(".key")] == [12.0 if p else 0.0]  # 3 x 4 steps
    exact = _conv_twin(model).eval()  # the trained weights themselves, in inference mode
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), exact(X), **tol)
        torch.testing.assert_close(model.predict(X), twin.eval()(X), rtol=100 * tol["rtol"], atol=100 * tol["atol"])


def test_a_step_batchnorm_cannot_train_on_is_named_before_training():
    """A last batch of 1 row gives BatchNorm1d on [N, C] one value per channel: its variance
    is undefined (torch raises there too), so fit names the layer and the fix first."""
    model = gd.Sequential(gd.Linear(3, 4), gd.BatchNorm1d(4), gd.Linear(4, 1))
    before = [t.clone() for t in model.state().values()]
    with pytest.raises(ValueError, match=r"^layer 1 \(BatchNorm1d\(4\)\) would normalise 1 value per channel in a step "
                                         r"of 1 row.*\(the last batch of the 21 rows\); choose a batch_size"):
        model.fit(torch.rand(21, 3), torch.rand(21, 1), batch_size=5, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state().values()))
    model.fit(torch.rand(22, 3), torch.rand(22, 1), batch_size=5, verbose=False)  # a last batch of 2 trains
    conv = gd.Sequential(gd.Reshape((1, 2, 2)), gd.BatchNorm2d(1), gd.Flatten(), gd.Linear(4, 1))
    conv.fit(torch.rand(21, 4), torch.rand(21, 1), batch_size=5, verbose=False)  # 1 row of 4 values: fine
