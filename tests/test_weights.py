"""sample_weight and class_weight: each example's weight in the loss, as Keras weighs it
(the mean over every element of weight * term), against a torch oracle; and the checks."""

from __future__ import annotations

import pytest
import torch
from helpers import _torch_twin

import graphdl as gd


def _classifier(gen, outputs, dtype=torch.float32):
    return gd.Sequential(gd.Linear(3, 8, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(8, outputs, generator=gen, dtype=dtype))


def _weighted_torch_losses(twin, X, Y, w, criterion, epochs, batch_size, lr):
    opt = torch.optim.SGD(twin.parameters(), lr=lr)
    for _ in range(epochs):
        for s in range(0, len(X), batch_size):
            opt.zero_grad()
            terms = criterion(twin(X[s:s + batch_size]), Y[s:s + batch_size])  # per element, reduction="none"
            value = (terms * w[s:s + batch_size].reshape(-1, *[1] * (terms.dim() - 1))).mean()
            value.backward()
            opt.step()


@pytest.mark.parametrize("loss, criterion, outputs, labels", [
    (gd.MSE(), lambda p, y: (p - y) ** 2, 2, False),
    (gd.MAE(), lambda p, y: (p - y).abs(), 2, False),
    (gd.BCEWithLogits(), lambda p, y: torch.nn.functional.binary_cross_entropy_with_logits(p, y, reduction="none"),
     1, True),
    (gd.CrossEntropy(), lambda p, y: torch.nn.functional.cross_entropy(p, y, reduction="none"), 3, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_weights_train_as_torch_weighs_the_loss(loss, criterion, outputs, labels, dtype):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(23, 3, generator=gen, dtype=dtype)
    if labels and outputs > 1:
        Y = torch.randint(0, outputs, (23,), generator=gen)
    elif labels:
        Y = (torch.rand(23, 1, generator=gen) > 0.5).to(dtype)
    else:
        Y = torch.randn(23, outputs, generator=gen, dtype=dtype)
    w = torch.rand(23, generator=gen, dtype=dtype) * 3
    model = _classifier(gen, outputs, dtype)
    twin = _torch_twin(model)
    model.fit(X, Y, loss=loss, optimizer=gd.SGD(lr=0.1), epochs=3, batch_size=5, shuffle=False, verbose=False,
              sample_weight=w)
    _weighted_torch_losses(twin, X, Y, w, criterion, 3, 5, 0.1)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach().T, **tol)
    torch.testing.assert_close(model.layers[2].bias, twin[2].bias.detach(), **tol)
    # evaluate weighs the loss the same way (its metrics are not weighted)
    with torch.no_grad():
        want = (criterion(twin(X), Y) * w.reshape(-1, *[1] * (criterion(twin(X), Y).dim() - 1))).mean()
    scored = model.evaluate(X, Y, loss=loss, sample_weight=w, metrics=[])["loss"]
    assert scored == pytest.approx(float(want), rel=tol["rtol"], abs=tol["atol"])


def test_class_weight_is_a_sample_weight_by_class_and_they_multiply():
    gen = torch.Generator().manual_seed(1)
    X, labels = torch.randn(30, 3, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    sw = torch.rand(30, generator=gen)
    cw = {0: 1.0, 1: 4.0}  # class 2 left out: weight 1
    by_class = torch.tensor([1.0, 4.0, 1.0])[labels]
    a, b = _classifier(torch.Generator().manual_seed(2), 3), _classifier(torch.Generator().manual_seed(2), 3)
    settings = {"loss": gd.CrossEntropy(), "epochs": 2, "batch_size": 7, "seed": 0, "verbose": False}
    ha = a.fit(X, labels, class_weight=cw, sample_weight=sw, **settings)
    hb = b.fit(X, labels, sample_weight=sw * by_class, **settings)
    assert ha == hb
    assert all(torch.equal(t, b.state()[k]) for k, t in a.state().items())


def test_weighted_validation_data_and_unweighted_metrics():
    gen = torch.Generator().manual_seed(3)
    X, Y = torch.randn(20, 3, generator=gen), (torch.rand(20, 1, generator=gen) > 0.5).float()
    Xv, Yv, wv = torch.randn(8, 3, generator=gen), (torch.rand(8, 1, generator=gen) > 0.5).float(), torch.rand(8)
    model = _classifier(gen, 1)
    history = model.fit(X, Y, loss=gd.BCEWithLogits(), epochs=1, verbose=False, validation_data=(Xv, Yv, wv),
                        metrics=["accuracy"])
    scores = model.evaluate(Xv, Yv, sample_weight=wv, metrics=["accuracy"])
    assert history["val_loss"][-1] == pytest.approx(scores["loss"], rel=1e-6)
    assert history["val_accuracy"][-1] == model.evaluate(Xv, Yv, metrics=["accuracy"])["accuracy"]
    assert scores["loss"] != pytest.approx(model.evaluate(Xv, Yv)["loss"], rel=1e-6)  # the weights did count


def test_weights_survive_a_resume_exactly(tmp_path):
    gen = torch.Generator().manual_seed(4)
    X, Y, w = torch.randn(21, 3, generator=gen), torch.randn(21, 1, generator=gen), torch.rand(21, generator=gen)
    settings = {"optimizer": gd.SGD(lr=0.05, momentum=0.9), "batch_size": 4, "seed": 1, "verbose": False,
                "sample_weight": w}
    straight = _classifier(torch.Generator().manual_seed(5), 1)
    h = straight.fit(X, Y, epochs=4, **settings)
    resumed = _classifier(torch.Generator().manual_seed(5), 1)
    resumed.fit(X, Y, epochs=2, checkpoint=tmp_path / "run.gdl", **settings)
    assert resumed.fit(X, Y, epochs=4, resume=tmp_path / "run.gdl", **settings) == h


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_weight": torch.ones(5)}, "sample_weight has 5 weights for 20 examples"),
    ({"sample_weight": torch.ones(20, 1)}, "sample_weight must be a 1-d float tensor"),
    ({"sample_weight": -torch.ones(20)}, "sample_weight must be finite and >= 0"),
    ({"class_weight": {0: 1.0, 5: 2.0}}, "class_weight has a weight for class 5, but the model has classes 0 to 1"),
    ({"class_weight": {0: -1.0}}, r"class_weight\[0\]"),
    ({"class_weight": [1.0, 2.0]}, "class_weight must be a dict"),
])
def test_bad_weights_are_refused_before_any_epoch(kwargs, message):
    gen = torch.Generator().manual_seed(6)
    X, Y = torch.randn(20, 3, generator=gen), (torch.rand(20, 1, generator=gen) > 0.5).float()
    model = _classifier(gen, 1)
    before = {k: t.clone() for k, t in model.state().items()}
    with pytest.raises(ValueError, match=message):
        model.fit(X, Y, loss=gd.BCEWithLogits(), verbose=False, **kwargs)
    assert all(torch.equal(t, before[k]) for k, t in model.state().items())


def test_weights_of_image_targets_and_with_a_validation_split():
    """From the review: targets of more than two dims crashed inside torch.cat; weights
    with validation_split were refused instead of split with the rows (as Keras)."""
    gen = torch.Generator().manual_seed(7)
    model = gd.Sequential(gd.Conv2d(1, 2, 3, padding=1, generator=gen), input_shape=(1, 4, 4))
    X, Y, w = torch.randn(10, 1, 4, 4, generator=gen), torch.randn(10, 2, 4, 4, generator=gen), torch.rand(10)
    with torch.no_grad():
        want = float((((model.predict(X) - Y) ** 2) * w.reshape(-1, 1, 1, 1)).mean())
    assert model.evaluate(X, Y, sample_weight=w)["loss"] == pytest.approx(want, rel=1e-6)
    X2, Y2, w2 = torch.rand(10, 3, generator=gen), torch.rand(10, 1, generator=gen), torch.rand(10, generator=gen)
    a, b = _classifier(torch.Generator().manual_seed(8), 1), _classifier(torch.Generator().manual_seed(8), 1)
    ha = a.fit(X2, Y2, sample_weight=w2, validation_split=0.2, epochs=2, seed=0, verbose=False)
    hb = b.fit(X2[:8], Y2[:8], sample_weight=w2[:8], validation_data=(X2[8:], Y2[8:], w2[8:]), epochs=2, seed=0,
               verbose=False)
    assert ha == hb


@pytest.mark.parametrize("weights, message", [
    (torch.ones(20, device="meta"), "sample_weight is on the meta device"),
    (torch.full((20,), 1e39, dtype=torch.float64), "beyond what the targets' torch.float32 holds"),
])
def test_weights_that_cannot_weigh_are_named(weights, message):
    model = _classifier(torch.Generator().manual_seed(9), 1)
    with pytest.raises(ValueError, match=message):
        model.evaluate(torch.rand(20, 3), torch.rand(20, 1), sample_weight=weights)
