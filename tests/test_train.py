"""Sequential, losses, SGD, schedules and fit, against PyTorch as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

import graphdl as gd


def _net(gen: torch.Generator, act: type = gd.Tanh) -> gd.Sequential:
    return gd.Sequential(gd.Linear(2, 6, generator=gen), act(), gd.Linear(6, 5, generator=gen), act(),
                         gd.Linear(5, 1, generator=gen))


def _torch_twin(model: gd.Sequential) -> torch.nn.Sequential:
    """The same net in torch.nn, with the same weights (torch stores weight as [out, in])."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, gd.Linear):
            lin = torch.nn.Linear(layer.in_features, layer.out_features)
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
