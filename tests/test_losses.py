"""graphdl.losses: each loss against its definition and, in training, against PyTorch's;
losses with settings, low precision, and what CrossEntropy says it needs."""

from __future__ import annotations

import pytest
import torch
from helpers import _classifier, _torch_sgd_losses, _torch_twin

import graphdl as gd


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


# -- classification losses against PyTorch ----------------------------------------------------------


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
    with pytest.raises(gd.GraphError, match=r"1 class; cross-entropy needs at least 2.*\n  created at .*test_losses.py"
                                            r".*\n  hint: .*gd.BCEWithLogits\(\)"):
        model.fit(torch.rand(4, 2), torch.tensor([0, 1, 0, 1]), loss=gd.CrossEntropy(), verbose=False)
