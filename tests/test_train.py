"""Sequential, losses, SGD, schedules and fit, against PyTorch as the oracle; then the
settings fit, SGD and the layers check (ValueError naming the argument) and divergence."""

from __future__ import annotations

import inspect
import math
import pydoc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from messages import names

import graphdl as gd


def _net(gen: torch.Generator, act: type = gd.Tanh) -> gd.Sequential:
    return gd.Sequential(gd.Linear(2, 6, generator=gen), act(), gd.Linear(6, 5, generator=gen), act(),
                         gd.Linear(5, 1, generator=gen))


def _torch_twin(model: gd.Sequential) -> torch.nn.Sequential:
    """The same net in torch.nn, with the same weights (torch stores weight as [out, in])."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, gd.Linear):
            lin = torch.nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(layer.weight.T)
                lin.bias.copy_(layer.bias)
            layers.append(lin)
        else:
            layers.append({gd.Tanh: torch.nn.Tanh, gd.ReLU: torch.nn.ReLU, gd.Sigmoid: torch.nn.Sigmoid}[type(layer)]())
    return torch.nn.Sequential(*layers)


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

    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=momentum)
    criterion = {"mse": torch.nn.MSELoss(), "mae": torch.nn.L1Loss()}[loss_name]
    expected = []
    for _ in range(4):
        total = 0.0
        for s in range(0, 30, 7):
            opt.zero_grad()
            value = criterion(twin(X[s:s + 7]), Y[s:s + 7])
            value.backward()
            opt.step()
            total += value.item() * len(X[s:s + 7])
        expected.append(total / 30)
    assert history["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    linears = [m for m in twin if isinstance(m, torch.nn.Linear)]
    for layer, lin in zip([m for m in model.layers if isinstance(m, gd.Linear)], linears):
        torch.testing.assert_close(layer.weight, lin.weight.detach().T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias, lin.bias.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "foreach"])
def test_nesterov_and_weight_decay_follow_torch(fused):
    gen = torch.Generator().manual_seed(4)
    X, Y = torch.rand(20, 2, generator=gen), torch.rand(20, 1, generator=gen)
    model = _net(gen, gd.ReLU)
    twin = _torch_twin(model)
    opt = gd.SGD(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01)
    opt.fused = fused
    model.fit(X, Y, optimizer=opt, epochs=3, batch_size=5, shuffle=False, verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01)
    for _ in range(3):
        for s in range(0, 20, 5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(twin(X[s:s + 5]), Y[s:s + 5]).backward()
            opt.step()
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach().T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("factor", [0.5, 0.0], ids=["decay", "to-zero"])
def test_momentum_with_a_schedule_follows_the_documented_rule(fused, nesterov, factor):
    """u <- γu + ηg, w <- w - u (Nesterov: w <- w - (γu + ηg)), with η from StepDecay each
    epoch: the velocity carries over when η changes, even to 0."""
    gen = torch.Generator().manual_seed(5)
    X, Y = torch.rand(8, 2, generator=gen), torch.rand(8, 1, generator=gen)
    model = gd.Sequential(gd.Linear(2, 1, generator=gen))
    w, b = model.layers[0].weight.clone().requires_grad_(), model.layers[0].bias.clone().requires_grad_()
    opt = gd.SGD(lr=0.2, momentum=0.5, nesterov=nesterov)
    opt.fused = fused
    history = model.fit(X, Y, optimizer=opt, schedule=gd.StepDecay(every=2, factor=factor),
                        epochs=5, batch_size=4, shuffle=False, verbose=False)
    u = [torch.zeros_like(w), torch.zeros_like(b)]
    for epoch in range(5):
        lr = 0.2 * factor ** (epoch // 2)
        for s in range(0, 8, 4):
            gw, gb = torch.autograd.grad(((X[s:s + 4] @ w + b - Y[s:s + 4]) ** 2).mean(), [w, b])
            with torch.no_grad():
                for p, v, g in zip((w, b), u, (gw, gb)):
                    v.mul_(0.5).add_(lr * g)
                    p.sub_(0.5 * v + lr * g if nesterov else v)
    assert history["lr"] == pytest.approx([0.2 * factor ** (e // 2) for e in range(5)])
    torch.testing.assert_close(model.layers[0].weight, w.detach())
    torch.testing.assert_close(model.layers[0].bias, b.detach())


def test_schedules():
    assert [gd.StepDecay(every=10, factor=0.9)(e, 1.0) for e in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.9, 0.81])
    assert gd.ExponentialDecay(0.5)(3, 2.0) == pytest.approx(0.25)
    cos = gd.CosineDecay(10, min_lr=0.1)
    assert cos(0, 1.0) == pytest.approx(1.0) and cos(10, 1.0) == pytest.approx(0.1)
    assert cos(5, 1.0) == pytest.approx(0.55)
    assert gd.Constant()(7, 0.3) == 0.3


@pytest.mark.parametrize("make, name", [
    (lambda: gd.SGD(lr=-0.1), "lr"), (lambda: gd.SGD(lr=math.nan), "lr"), (lambda: gd.SGD(momentum=1.0), "momentum"),
    (lambda: gd.SGD(momentum=-0.1), "momentum"), (lambda: gd.SGD(weight_decay=-1), "weight_decay"),
    (lambda: gd.StepDecay(every=0, factor=0.5), "every"), (lambda: gd.CosineDecay(0), "epochs"),
    (lambda: gd.Linear(0, 3), "in_features"),
])
def test_bad_settings_raise_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


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


def test_sequential_names_params_and_chains_widths():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 25), gd.Tanh(), gd.Linear(25, 1))
    model.add(gd.Sigmoid())
    params = model.parameters()
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert params["2.weight"].shape == (25, 25) and params["4.bias"].shape == (1,)
    assert params["0.weight"] is model.layers[0].weight  # live tensors
    with pytest.raises(gd.GraphError, match=r"layer 2 \(Linear\(30, 1\)\) takes 30 features but layer 0 "):
        gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(30, 1))


def test_graph_is_tagged_by_layer():
    model = gd.Sequential(gd.Linear(2, 3), gd.ReLU(), gd.Linear(3, 1))
    g = model.graph(loss=gd.MSE())
    assert [n.scope for n in g.nodes] == ["0:Linear", "0:Linear", "1:ReLU", "2:Linear", "2:Linear", "loss"]
    assert list(g.inputs) == ["x", "y"]
    assert str(gd.parse(str(g))) == str(g)


def test_linear_init_follows_pytorch_bounds():
    torch.manual_seed(0)
    layer = gd.Linear(16, 200)
    bound = 1 / math.sqrt(16)
    for t in (layer.weight, layer.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(gd.Linear(3, 4, generator=gen_a).weight, gd.Linear(3, 4, generator=gen_b).weight)


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
    (also for a model with nothing to train, whose params' largest magnitude is a 0)."""
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


def test_losses_match_their_definitions():
    g = gd.Graph("losses")
    p, y = g.input("p", (None, 3)), g.input("y", (None, 3))
    g.output(gd.MSE()(p, y), gd.MAE()(p, y), gd.MBE()(p, y))
    P, Y = torch.randn(4, 3), torch.randn(4, 3)
    mse, mae, mbe = gd.compile(g)(p=P, y=Y)
    torch.testing.assert_close(mse, ((P - Y) ** 2).mean())
    torch.testing.assert_close(mae, (P - Y).abs().mean())
    torch.testing.assert_close(mbe, (P - Y).mean())


class _Scaled(gd.Loss):
    """A loss with a setting: k * mse."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, pred, target):
        return gd.mul(gd.mse(pred, target), self.k)


def test_losses_with_different_settings_get_their_own_compiled_functions():
    model = gd.Sequential(gd.Linear(2, 1))
    X, Y = torch.rand(6, 2), torch.rand(6, 1)
    one, three = model.evaluate(X, Y, loss=_Scaled(1.0)), model.evaluate(X, Y, loss=_Scaled(3.0))
    assert three["loss"] == pytest.approx(3 * one["loss"])
    assert one["loss"] == pytest.approx(model.evaluate(X, Y, loss=gd.MSE())["loss"])
    assert "accuracy" not in one  # regression targets: no accuracy unless asked for


# -- classification: losses against PyTorch, accuracy, metrics --------------------------------


def _classifier(gen: torch.Generator, outputs: int, dtype: torch.dtype) -> gd.Sequential:
    return gd.Sequential(gd.Linear(2, 6, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(6, outputs, generator=gen, dtype=dtype))


def _torch_sgd_losses(twin: torch.nn.Module, criterion: Callable, X: torch.Tensor, Y: torch.Tensor, epochs: int,
                      batch_size: int, lr: float, momentum: float) -> list[float]:
    """Per-epoch mean batch loss of plain torch training, batches in order."""
    opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for s in range(0, len(X), batch_size):
            opt.zero_grad()
            value = criterion(twin(X[s:s + batch_size]), Y[s:s + batch_size])
            value.backward()
            opt.step()
            total += value.item() * len(X[s:s + batch_size])
        losses.append(total / len(X))
    return losses


def _assert_follows_torch(model: gd.Sequential, X: torch.Tensor, Y: torch.Tensor, loss: gd.Loss,
                         criterion: torch.nn.Module, lr: float) -> gd.History:
    """Train `model` and its torch twin (same weights, torch.optim.SGD, momentum 0.9, batches
    of 7 in order, 4 epochs): the per-epoch losses and the final weights agree."""
    twin = _torch_twin(model)
    history = model.fit(X, Y, loss=loss, optimizer=gd.SGD(lr=lr, momentum=0.9), epochs=4, batch_size=7,
                        shuffle=False, verbose=False)
    expected = _torch_sgd_losses(twin, criterion, X, Y, 4, 7, lr, 0.9)
    tol = 1e-5 if X.dtype == torch.float32 else 1e-12
    assert history["loss"] == pytest.approx(expected, rel=tol, abs=tol)
    linears = [m for m in twin if isinstance(m, torch.nn.Linear)]
    for layer, lin in zip([m for m in model.layers if isinstance(m, gd.Linear)], linears):
        torch.testing.assert_close(layer.weight, lin.weight.detach().T, rtol=tol, atol=tol)
        torch.testing.assert_close(layer.bias, lin.bias.detach(), rtol=tol, atol=tol)
    return history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("outputs", [1, 3], ids=["binary", "multi-label"])
def test_bce_with_logits_training_follows_torch(dtype, outputs):
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(30, 2, generator=gen, dtype=dtype) * 3
    Y = (torch.rand(30, outputs, generator=gen) > 0.5).to(dtype)
    _assert_follows_torch(_classifier(gen, outputs, dtype), X, Y, gd.BCEWithLogits(), torch.nn.BCEWithLogitsLoss(),
                          lr=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targets", ["one-hot", "probabilities", "labels"])
def test_cross_entropy_training_follows_torch(dtype, targets):
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(30, 2, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (30,), generator=gen)
    Y = {"one-hot": torch.nn.functional.one_hot(labels, 3).to(dtype),
         "probabilities": torch.softmax(torch.randn(30, 3, generator=gen, dtype=dtype), 1),
         "labels": labels}[targets]
    history = _assert_follows_torch(_classifier(gen, 3, dtype), X, Y, gd.CrossEntropy(), torch.nn.CrossEntropyLoss(),
                                    lr=0.3)
    assert "accuracy" in history  # one-hot rows, probability rows and labels: class targets for CrossEntropy


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
    total, count = gd.train.METRICS["mse"](pred, torch.zeros(3001, 1).half(), "threshold")  # a sum and a count
    assert (total.dtype, float(total), count) == (torch.float64, 1501.0, 3001)


def _sine() -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.linspace(-3, 3, 40).unsqueeze(1)
    return X, torch.sin(X)


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


@pytest.mark.parametrize("metrics", ["accuracy", ["accuracy", "accuracy"], ["f1"], [gd.MSE()], 3])
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


def test_softmax_layer_outputs_probability_rows():
    gen = torch.Generator().manual_seed(1)
    logits = _classifier(gen, 4, torch.float32)
    probs = gd.Sequential(*logits.layers, gd.Softmax())
    X = torch.randn(9, 2, generator=gen)
    torch.testing.assert_close(probs.predict(X), torch.softmax(logits.predict(X), 1))
    assert str(probs.graph()).splitlines()[-3:-1] == ["  %5: f32[N,4] = softmax %4  # 3:Softmax", "  return %5"]


# -- Standardize: preprocessing inside the model ------------------------------------------------


def test_standardize_adapts_to_the_data_in_float64():
    X = torch.tensor([[1e4 + 0.5, -2.0], [1e4 + 1.5, 0.0], [1e4 + 2.5, 5.0]], dtype=torch.float32)
    layer = gd.Standardize().adapt(X)
    assert isinstance(layer, gd.Standardize) and layer.in_features == layer.out_features == 2
    ref = X.double()
    torch.testing.assert_close(layer.mean, ref.mean(0).float(), rtol=0, atol=0)
    torch.testing.assert_close(layer.std, ref.std(0, correction=0).float(), rtol=0, atol=0)  # population std
    out = gd.Sequential(layer).predict(X)
    torch.testing.assert_close(out, ((ref - ref.mean(0)) / ref.std(0, correction=0)).float())


def test_a_constant_feature_is_centred_not_divided_by_zero():
    X = torch.tensor([[3.0, 1.0], [3.0, 2.0], [3.0, 4.0]])
    layer = gd.Standardize().adapt(X)
    assert layer.std[0] == 1.0
    out = gd.Sequential(layer).predict(torch.tensor([[3.0, 1.0], [5.0, 1.0]]))
    assert torch.isfinite(out).all() and out[:, 0].tolist() == [0.0, 2.0]
    assert gd.Standardize().adapt(torch.ones(1, 3)).std.tolist() == [1.0, 1.0, 1.0]  # one example


@pytest.mark.parametrize("X, message", [
    (torch.tensor([[1.0, float("nan")], [2.0, 3.0]]), r"X has NaN or inf values, first at X\[0, 1\] = nan"),
    (torch.tensor([[1.0, 2.0], [float("inf"), 3.0]]), r"first at X\[1, 0\] = inf"),
    (torch.ones(3), r"2-d torch.Tensor \[examples, features\].*got shape \[3\]"),
    (torch.ones(0, 2), "at least one example"),
    ([[1.0, 2.0]], "got list"),
    (torch.ones(3, 2, device="meta"), "X is on the meta device"),
    (torch.ones(3, 2, dtype=torch.complex64), "X is complex"),
    (torch.eye(2).to_sparse(), "X is a sparse_coo tensor"),
])
def test_adapt_refuses_data_it_cannot_learn_from(X, message):
    with pytest.raises(ValueError, match=message):
        gd.Standardize().adapt(X)
    layer = gd.Standardize(2)
    with pytest.raises(ValueError, match="X has 3 features but this Standardize takes 2"):
        layer.adapt(torch.ones(4, 3))


def _standardized(gen: torch.Generator, X: torch.Tensor) -> gd.Sequential:
    return gd.Sequential(gd.Standardize().adapt(X), gd.Linear(2, 5, generator=gen), gd.Tanh(),
                         gd.Linear(5, 1, generator=gen))


def test_standardize_statistics_are_not_trained():
    gen = torch.Generator().manual_seed(2)
    X = torch.rand(40, 2, generator=gen) * 10 + 5
    Y = (X[:, :1] > 10).float()
    model = _standardized(gen, X)
    stats = {k: v.clone() for k, v in model.state().items() if k.startswith("0.")}
    assert list(model.parameters()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert list(model.state()) == ["0.mean", "0.std", *model.parameters()]
    model.fit(X, Y, loss=gd.BCEWithLogits(), optimizer=gd.SGD(lr=0.5, momentum=0.9, weight_decay=0.1), epochs=3,
              batch_size=8, verbose=False)
    assert all(torch.equal(model.state()[k], v) for k, v in stats.items())
    step = model._cache[("step", gd.BCEWithLogits())].graph
    assert "0.mean" in step.params and not any("0.mean" in label for label in step.output_labels)
    text = str(model.graph())
    assert "0.mean: f32[2], 0.std: f32[2]" in text and "= sub x, 0.mean  # 0:Standardize" in text
    dot = gd.to_dot(model.graph()).source
    assert 'label="0.mean\\nf32[2]"' in dot and 'label="0.std\\nf32[2]"' in dot


def test_standardize_trains_like_torch_on_standardised_inputs():
    """The same net, once with Standardize inside and raw inputs, once without it and
    inputs standardised by hand: the same training, to float tolerance."""
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(30, 2, generator=gen, dtype=torch.float64) * 100
    Y = torch.randint(0, 3, (30,), generator=gen)
    inside = gd.Sequential(gd.Standardize(dtype=torch.float64).adapt(X), *_classifier(gen, 3, torch.float64).layers)
    twin = _torch_twin(gd.Sequential(*inside.layers[1:]))
    history = inside.fit(X, Y, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.2, momentum=0.5), epochs=3,
                         batch_size=7, shuffle=False, verbose=False)
    scaled = (X - X.mean(0)) / X.std(0, correction=0)
    expected = _torch_sgd_losses(twin, torch.nn.CrossEntropyLoss(), scaled, Y, 3, 7, 0.2, 0.5)
    assert history["loss"] == pytest.approx(expected, rel=1e-12)


def test_adapting_again_after_fit_is_seen_by_the_compiled_model():
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(20, 2, generator=gen)
    model = _standardized(gen, X)
    model.fit(X, torch.rand(20, 1, generator=gen), epochs=1, verbose=False)
    before = model.predict(X)
    layer = model.layers[0]
    layer.adapt(X * 3 + 1)  # new tensors in the layer's slots, which the compiled functions read
    after = model.predict(X)
    bare = gd.Sequential(*model.layers[1:])
    torch.testing.assert_close(after, bare.predict((X - layer.mean) / layer.std))
    assert not torch.allclose(before, after)


def test_standardize_without_statistics_says_to_adapt():
    model = gd.Sequential(gd.Standardize(), gd.Linear(2, 1))
    with pytest.raises(gd.GraphError, match=r"Standardize has no statistics yet; call .adapt\(X\)"):
        model.predict(torch.rand(3, 2))
    identity = gd.Sequential(gd.Standardize(2))
    assert torch.equal(identity.predict(torch.tensor([[1.0, -2.0]])), torch.tensor([[1.0, -2.0]]))


# -- threads ---------------------------------------------------------------------------------------


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


# -- the first hour: help() shows what fit, predict and evaluate take ------------------------------


@pytest.mark.parametrize("method, names", [
    ("fit", ["X", "Y", "loss", "optimizer", "schedule", "epochs", "batch_size", "shuffle", "validation_data", "seed",
             "verbose", "metrics", "threads", "distributed", "checkpoint", "resume", "clip_norm", "clip_value",
             "accumulate"]),
    ("predict", ["X", "threads", "distributed"]),
    ("evaluate", ["X", "Y", "loss", "metrics", "threads", "distributed"]),
])
def test_methods_show_their_real_signatures_and_docs(method, names):
    fn = getattr(gd.Sequential, method)
    params = inspect.signature(fn).parameters
    assert list(params)[1:] == names
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())  # no **kwargs hiding them
    doc = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    for name in names:
        assert f"{name}:" in doc or f"{name}, " in doc, name


# -- params are live: what a layer is given is what predict, fit and save use ---------------


def test_a_layer_given_a_new_tensor_is_one_model_everywhere(tmp_path):
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.rand(12, 2, generator=gen), torch.rand(12, 1, generator=gen)
    model = _net(gen)
    model.predict(X)
    model.fit(X, Y, epochs=1, batch_size=4, verbose=False)  # compiled functions now cached
    new_w, new_b = torch.randn(2, 6, generator=gen), torch.randn(6, generator=gen)
    model.layers[0].weight, model.layers[0].bias = new_w, new_b
    fresh = _net(torch.Generator().manual_seed(0))  # a model that never had the old weights
    for p, q in zip(fresh.parameters().values(), model.parameters().values()):
        p.copy_(q)
    torch.testing.assert_close(model.predict(X), fresh.predict(X), rtol=0, atol=0)
    model.fit(X, Y, epochs=2, batch_size=4, seed=0, verbose=False)
    fresh.fit(X, Y, epochs=2, batch_size=4, seed=0, verbose=False)
    assert model.layers[0].weight is new_w  # trained in place: the tensor the user assigned
    for p, q in zip(model.parameters().values(), fresh.parameters().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    model.save(tmp_path / "m.gdl")
    torch.testing.assert_close(gd.load(tmp_path / "m.gdl").predict(X), model.predict(X), rtol=0, atol=0)


def test_a_layer_given_a_tensor_of_another_dtype_rebuilds_and_names_the_layer():
    model = _net(torch.Generator().manual_seed(0))
    model.predict(torch.rand(3, 2))
    model.layers[2].weight = torch.zeros(6, 5, dtype=torch.float64)
    with pytest.raises(gd.GraphError, match=r"matmul .* dtypes differ .*\n  created at .*\(in layer 2:Linear\)"):
        model.predict(torch.rand(3, 2))


def test_changing_the_layer_list_itself_rebuilds_the_compiled_functions():
    gen = torch.Generator().manual_seed(4)
    X, Y = torch.rand(6, 2, generator=gen), torch.rand(6, 1, generator=gen)
    model = _net(gen)
    model.predict(X)
    model.fit(X, Y, epochs=1, verbose=False)
    model.layers[1] = gd.ReLU()  # same shapes, another function
    model.layers[0] = gd.Linear(2, 6, generator=gen)
    model.layers.append(gd.Sigmoid())
    twin = _torch_twin(model)
    torch.testing.assert_close(model.predict(X), twin(X).detach())
    model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=1, batch_size=6, verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(twin(X), Y).backward()
    opt.step()
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach().T)


def test_a_graph_from_the_model_shares_its_params():
    model = _net(torch.Generator().manual_seed(0))
    g = model.graph()
    g.params["0.weight"].data = torch.zeros(2, 6)
    assert torch.equal(model.layers[0].weight, torch.zeros(2, 6))


# -- odd tensors: data that requires grad, meta data and models ------------------------------


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


# -- bookkeeping in float32 or wider, whatever the model's dtype ------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_a_batch_of_65536_trains_in_low_precision(dtype):
    """65,536 is inf in float16: the batch's weight in the epoch's mean loss made a finite
    epoch look diverged. The epoch loss and the update follow a float64 reference."""
    gen = torch.Generator().manual_seed(0)
    n = 65536 + 8  # a full batch and a partial one
    X = torch.rand(n, 2, generator=gen).to(dtype)
    Y = torch.rand(n, 1, generator=gen).to(dtype)
    model = gd.Sequential(gd.Linear(2, 1, generator=gen, dtype=dtype))
    w, b = (t.double().requires_grad_() for t in model.parameters().values())
    losses = []
    for s in range(0, n, 65536):
        loss = ((X[s:s + 65536].double() @ w + b - Y[s:s + 65536].double()) ** 2).mean()
        gw, gb = torch.autograd.grad(loss, [w, b])
        losses.append(loss.item())
        with torch.no_grad():
            w -= 0.1 * gw
            b -= 0.1 * gb
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=1, batch_size=65536, shuffle=False, verbose=False)
    eps = torch.finfo(dtype).eps
    assert history["loss"] == pytest.approx([(losses[0] * 65536 + losses[1] * 8) / n], rel=4 * eps)
    torch.testing.assert_close(model.layers[0].weight.double(), w.detach(), rtol=4 * eps, atol=4 * eps)
    assert model.layers[0].weight.dtype == dtype


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


def test_a_layer_too_big_for_memory_says_so_instead_of_failing_in_the_allocator():
    with pytest.raises(ValueError, match=r"Linear\(100000, 1000000\) needs 373 GiB .* use smaller widths"):
        gd.Linear(100_000, 1_000_000)


def test_standardize_scales_a_small_feature_and_refuses_a_std_its_dtype_cannot_hold():
    gen = torch.Generator().manual_seed(0)
    X = torch.stack([torch.randn(500, generator=gen), 3e-5 + 1e-6 * torch.randn(500, generator=gen)], 1)
    out = gd.Sequential(gd.Standardize().adapt(X)).predict(X)
    torch.testing.assert_close(out.double().std(0, correction=0), torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0)
    assert torch.equal(gd.Standardize().adapt(torch.full((4, 2), 0.1)).std, torch.ones(2))  # constant: left as is
    with pytest.raises(ValueError, match=r"feature 1 has std 1e-09, which torch.float16 cannot hold"):
        gd.Standardize(dtype=torch.float16).adapt(torch.tensor([[0.0, 1.0], [1.0, 1.0 + 2e-9]], dtype=torch.float64))


def test_cross_entropy_in_float16_sums_rows_without_overflow():
    """100,000 rows at loss ~1.25 sum past float16's 65,504: the mean must still be right."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(100_000, 4, generator=gen).half(), torch.randint(0, 3, (100_000,), generator=gen)
    model = gd.Sequential(gd.Linear(4, 3, generator=gen, dtype=torch.float16))
    logits = X.float() @ model.layers[0].weight.float() + model.layers[0].bias.float()
    want = torch.nn.functional.cross_entropy(logits, Y)
    assert model.evaluate(X, Y, loss=gd.CrossEntropy())["loss"] == pytest.approx(float(want), rel=2e-3)
    history = model.fit(X, Y, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.0), batch_size=100_000, verbose=False)
    assert history["loss"][0] == pytest.approx(float(want), rel=2e-3)


def test_cross_entropy_needs_two_classes_and_says_what_to_use_instead():
    model = gd.Sequential(gd.Linear(2, 1))
    with pytest.raises(gd.GraphError, match=r"1 class; cross-entropy needs at least 2.*\n  created at .*test_train.py"
                                            r".*\n  hint: .*gd.BCEWithLogits\(\)"):
        model.fit(torch.rand(4, 2), torch.tensor([0, 1, 0, 1]), loss=gd.CrossEntropy(), verbose=False)


def test_a_model_with_nothing_to_train_fits_as_a_no_op():
    X, Y = torch.rand(5, 2), torch.rand(5, 2)
    model = gd.Sequential(gd.Standardize().adapt(X))
    before = {k: t.clone() for k, t in model.state().items()}
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=2, verbose=False)
    assert len(history["loss"]) == 2 and all(torch.equal(t, before[k]) for k, t in model.state().items())


# -- training: bad settings raise ValueError naming the argument ------------------------------


def _model() -> gd.Sequential:
    torch.manual_seed(0)
    return gd.Sequential(gd.Linear(2, 4), gd.Tanh(), gd.Linear(4, 1))


def _data(n: int = 20, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, generator=gen) * scale, torch.rand(n, 1, generator=gen) * scale


def _fit_message(*args, **kwargs) -> str:
    X, Y = _data()
    kwargs = {"verbose": False, **kwargs}
    with pytest.raises(ValueError) as err:
        _model().fit(*(args or (X, Y)), **kwargs)
    return str(err.value)


@pytest.mark.parametrize("make, expect", [
    (lambda: gd.SGD(lr=-0.1), r"lr must be in \[0.0, inf\], got -0.1"),
    (lambda: gd.SGD(lr=float("nan")), "lr must be a finite number, got nan"),
    (lambda: gd.SGD(lr=float("inf")), "lr must be a finite number, got inf"),
    (lambda: gd.SGD(momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
    (lambda: gd.SGD(momentum=-0.5), r"momentum must be in \[0.0, 1.0\), got -0.5"),
])
def test_bad_optimizer_settings_name_the_argument(make, expect):
    with pytest.raises(ValueError, match=expect):
        make()


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
    ((), {"validation_data": torch.rand(3, 2)}, r"validation_data must be a pair \(X_val, Y_val\), got Tensor"),
    ((), {"validation_data": (1, 2, 3)}, "validation_data must be a pair .* got tuple of length 3"),
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


@pytest.mark.parametrize("make, expect", [
    (lambda: gd.SGD(momentum=0.5, nesterov=torch.ones(2)), "nesterov must be True or False"),
    (lambda: gd.Linear(10**30, 2), "in_features=10{30} is too large"),
    (lambda: gd.Linear(2, 2, dtype=torch.int64), "Linear: dtype torch.int64 is not supported; use one of"),
    (lambda: gd.Linear(2, 2, generator=0), "generator must be a torch.Generator or None, got int"),
    (lambda: _model().to("nowhere"), "device 'nowhere' cannot hold the model"),
    (lambda: _model().evaluate(*_data(), loss=["mse"]), "loss must be a graphdl loss such as gd.MSE"),
])
def test_bad_layer_optimizer_and_model_settings(make, expect):
    with pytest.raises(ValueError, match=expect.replace("10{30}", "1" + "0" * 30)):
        make()


BIG = 10**400  # a Python int no float can hold


@pytest.mark.parametrize("make, expect", [
    (lambda: gd.Linear(2, 2, dtype=torch.float8_e4m3fn),
     "Linear: dtype torch.float8_e4m3fn is not supported; use one of torch.float16, torch.bfloat16, torch.float32, "
     "torch.float64"),
    (lambda: gd.Linear(2, 2, dtype=torch.complex64), "dtype torch.complex64 is not supported"),
    (lambda: gd.Linear(2, 2, dtype="f32"), r"dtype 'f32' is not supported; .*did you mean torch.float32\?"),
    (lambda: gd.SGD(lr=BIG), r"lr=10{11}\.\.\.0{8} \(401 digits\) is too large for a float; lr must be a finite "
                             r"number in \[0.0, inf\]"),
    (lambda: gd.SGD(lr=True), "lr must be a finite number, got True"),
    (lambda: gd.SGD(lr=0.1 + 0j), r"lr must be a finite number, got \(0.1\+0j\)"),
    (lambda: gd.SGD(lr=torch.tensor(0.1)), r"lr must be a finite number, got tensor\(0.1000\); pass a Python number"),
    (lambda: gd.SGD(lr=np.float32("nan")), r"lr must be a finite number, got np.float32\(nan\)"),
    (lambda: gd.SGD(momentum=np.float64(1.0)), r"momentum must be in \[0.0, 1.0\), got np.float64\(1.0\)"),
    (lambda: gd.SGD(weight_decay=-BIG), "weight_decay=-10{10}.* is too large for a float"),
    (lambda: gd.StepDecay(every=1, factor=BIG), "factor=10{11}.* is too large for a float"),
    (lambda: gd.StepDecay(every=2.0, factor=0.5), r"every must be a whole number >= 1, got 2.0"),
    (lambda: gd.ExponentialDecay(rate=BIG), "rate=10{11}.* is too large"),
    (lambda: gd.CosineDecay(epochs=10, min_lr=BIG), "min_lr=10{11}.* is too large"),
    (lambda: gd.Linear(np.int64(0), 2), "in_features must be a whole number >= 1, got np.int64\\(0\\)"),
])
def test_number_settings_are_checked_whatever_their_type(make, expect):
    with pytest.raises(ValueError, match=expect.replace("10{11}", "1" + "0" * 11).replace("10{10}", "1" + "0" * 10)
                       .replace("0{8}", "0" * 8)):
        make()


def test_any_finite_real_number_type_is_a_number_setting():
    from fractions import Fraction
    opt = gd.SGD(lr=np.float32(0.5), momentum=Fraction(1, 2), weight_decay=np.int64(0))
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.5, 0.5, 0.0)
    assert all(type(v) is float for v in (opt.lr, opt.momentum, opt.weight_decay))
    step = gd.StepDecay(every=np.int64(2), factor=np.float16(0.5))
    assert (step.every, step.factor) == (2, 0.5) and type(step.every) is int
    layer = gd.Linear(np.int64(2), np.uint8(3))
    assert layer.config()["in_features"] == 2 and type(layer.config()["out_features"]) is int  # JSON-able
    X, Y = _data()
    history = _model().fit(X, Y, optimizer=opt, epochs=np.int64(2), batch_size=np.int32(8), seed=np.uint64(2**64 - 1),
                           schedule=lambda epoch, lr: np.float32(lr / 2), verbose=False)
    assert history["lr"] == [0.25, 0.25]
    g = gd.Graph("g")
    out = gd.mul(g.input("x", (2,)), np.float32(3))  # a numpy scalar becomes a const, like a Python float
    assert gd.compile(g.output(out) or g)(x=torch.ones(2))[0].tolist() == [3.0, 3.0]


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


def test_model_file_dtypes_are_checked_by_name():
    for name in ("float8_e4m3fn", "Tensor", "no_such_dtype"):
        with pytest.raises(gd.GraphError, match=rf"layer 0 \(Linear\): bad settings .*{name}"):
            gd.Sequential.from_config([{"type": "Linear", "in_features": 2, "out_features": 1, "dtype": name}])
    model = gd.Sequential.from_config([{"type": "Linear", "in_features": 2, "out_features": 1, "dtype": "bfloat16"}])
    assert model.layers[0].weight.dtype == torch.bfloat16


def test_evaluate_checks_its_data_too():
    with pytest.raises(ValueError, match=r"Y has NaN or inf values, first at Y\[2, 0\]"):
        _model().evaluate(torch.rand(3, 2), torch.tensor([[0.0], [1.0], [float("nan")]]))


def test_params_that_are_not_finite_before_training():
    model = _model()
    model.layers[2].bias[0] = float("nan")
    X, Y = _data()
    with pytest.raises(ValueError, match="param 2.bias is NaN or inf before training; re-initialise the model"):
        model.fit(X, Y, verbose=False)


# -- training: divergence stops with the last finite params and the history --------------------


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


def test_an_epoch_whose_replay_stays_finite_is_rolled_back_whole(monkeypatch):
    """If the replay cannot find the batch (a non-deterministic kernel), the model goes back
    to the epoch's start, which was checked finite."""
    from graphdl import train
    model, (X, Y) = _model(), _data()
    real = train._largest
    calls, before = {"n": 0}, {}

    def flaky(tensors, device="cpu"):  # calls: end of epoch 1 (= start of 2), end of epoch 2: say a param is not finite
        calls["n"] += 1
        if calls["n"] == 1:
            before.update({k: v.clone() for k, v in model.parameters().items()})
        return torch.tensor(float("inf")) if calls["n"] == 2 else real(tensors, device)

    monkeypatch.setattr(train, "_largest", flaky)
    with pytest.raises(FloatingPointError) as err:
        model.fit(X, Y, epochs=5, batch_size=4, seed=0, verbose=False)
    names(str(err.value), "diverged in epoch 2/5", "the batch is unknown", "params from the start of that epoch")
    assert err.value.batch is None and err.value.history.epochs == 1
    assert all(torch.equal(v, before[k]) for k, v in model.parameters().items())


def test_checkpointing_and_resuming_take_the_very_steps_of_a_plain_fit(tmp_path):
    """fit runs one loop whatever it is asked: writing a checkpoint every epoch changes
    no bit of training, and a run resumed from epoch 2's checkpoint ends bit-exactly
    where the uninterrupted run does (weights, velocities, shuffling, schedule, History)."""
    X, Y = _sine()
    settings = dict(optimizer=gd.SGD(lr=0.05, momentum=0.9), schedule=gd.StepDecay(2, 0.5), batch_size=7,
                    seed=5, verbose=False, validation_data=(X[::3], Y[::3]), metrics=["mae"])

    def model() -> gd.Sequential:
        gen = torch.Generator().manual_seed(1)
        return gd.Sequential(gd.Linear(1, 8, generator=gen), gd.Tanh(), gd.Linear(8, 1, generator=gen))

    plain, checkpointed, resumed = model(), model(), model()
    h_plain = plain.fit(X, Y, epochs=4, **settings)
    path = tmp_path / "run.gdl"
    h_checkpointed = checkpointed.fit(X, Y, epochs=2, checkpoint=path, **settings)
    h_resumed = resumed.fit(X, Y, epochs=4, resume=path, **settings)
    assert h_checkpointed == {k: v[:2] for k, v in h_plain.items()}
    assert h_resumed == h_plain
    for a, b in zip(plain.state().values(), resumed.state().values(), strict=True):
        assert torch.equal(a, b)


# -- a tied tensor is one parameter ---------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_tied_weight_trains_as_torchs_shared_parameter(nesterov):
    """Weight decay and momentum once per tensor, however many layers read it (twice,
    before: 0.135 off torch after 9 steps)."""
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(4, 4, generator=gen), gd.Tanh(), gd.Linear(4, 4, generator=gen), gd.Tanh(),
                          gd.Linear(4, 1, generator=gen))
    model.layers[2].weight = model.layers[0].weight
    twin = _torch_twin(model)
    twin[2].weight = twin[0].weight  # torch's tie: one Parameter in two modules
    X, Y = torch.rand(27, 4, generator=gen), torch.rand(27, 1, generator=gen)
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.1), epochs=1,
                        batch_size=3, shuffle=False, verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    losses = []
    for first in range(0, 27, 3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(twin(X[first:first + 3]), Y[first:first + 3])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(list(twin.parameters())) == len(model.parameters()) == 5
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach().T, rtol=1e-5, atol=1e-6)
    assert model.layers[2].weight is model.layers[0].weight
    torch.testing.assert_close(model.layers[4].weight, twin[4].weight.detach().T, rtol=1e-5, atol=1e-6)
    assert history["loss"][0] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_params_that_share_part_of_their_memory_are_refused_by_training():
    model = gd.Sequential(gd.Linear(4, 4), gd.Tanh(), gd.Linear(4, 4))
    big = torch.randn(8, 4)
    model.layers[0].weight, model.layers[2].weight = big[:4], big[2:6]  # rows 2 and 3 in both
    with pytest.raises(ValueError, match=r"params 0.weight and 2.weight share elements but are not one tensor .* "
                                         r"give 2.weight its own memory \(.clone\(\)\), or tie the two"):
        model.fit(torch.rand(8, 4), torch.rand(8, 4), verbose=False)
    a = torch.randn(4, 8)
    model.layers[0].weight, model.layers[2].weight = a[:, ::2], a[:, 1::2]  # interleaved, no element in common
    model.fit(torch.rand(8, 4), torch.rand(8, 4), verbose=False)
