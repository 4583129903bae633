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
    assert one["accuracy"] == three["accuracy"]


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


def test_a_layer_given_a_tensor_of_another_shape_rebuilds_and_names_the_layer():
    model = _net(torch.Generator().manual_seed(0))
    model.predict(torch.rand(3, 2))
    model.layers[2].weight = torch.zeros(5, 6)  # transposed by mistake
    with pytest.raises(gd.GraphError, match=r"matmul .* inner dims differ .*\n  created at .*\(in layer 2:Linear\)"):
        model.predict(torch.rand(3, 2))


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
