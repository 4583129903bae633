"""graphdl.metrics: each metric equals scikit-learn's, and its statistics add up, so that
the sum over chunks of rows (data-parallel ranks) gives the metric of all of them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import graphdl as gd
from graphdl import metrics

skm = pytest.importorskip("sklearn.metrics", reason="the metrics' oracle is scikit-learn (the examples extra)")


def _value(name, pred, y, decision, chunks=1):
    """The metric of all rows, from the statistics of `chunks` parts of them added up."""
    m = metrics.metric(name)
    stats = sum(m.stats(p, t, decision, y[:1]) for p, t in zip(pred.tensor_split(chunks), y.tensor_split(chunks)))
    return float(m.value(stats, metrics._multiclass(y, decision)))


def _binary(n, gen, dtype=torch.float32):
    scores = torch.randn(n, 1, generator=gen).to(dtype)
    labels = (torch.rand(n, 1, generator=gen) < 0.4).to(dtype)
    return scores, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 3])
def test_binary_metrics_equal_scikit_learns(dtype, chunks):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 50, 301):
        logits, y = _binary(n, gen, dtype)
        truth, guess = y[:, 0].float().numpy().astype(int), (logits[:, 0] > 0).float().numpy().astype(int)
        for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
            want = fn(truth, guess, average="binary", zero_division=0)
            assert _value(name, logits, y, "logit", min(chunks, n)) == pytest.approx(want, abs=1e-12), (name, n)
        # threshold 0.5 for a single output read as a probability (MSE, Sigmoid)
        probs = torch.sigmoid(logits.float()).to(dtype)
        guess = (probs[:, 0] > 0.5).float().numpy().astype(int)
        assert _value("f1", probs, y, "threshold") == pytest.approx(skm.f1_score(truth, guess, zero_division=0))


@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("chunks", [1, 4])
def test_multiclass_metrics_are_scikit_learns_macro_averages(classes, chunks):
    gen = torch.Generator().manual_seed(classes)
    n = 200
    logits = torch.randn(n, classes, generator=gen)
    labels = torch.randint(0, classes - 1 if classes > 2 else classes, (n,), generator=gen)  # a class never true
    y = torch.eye(classes)[labels]
    truth, guess = labels.numpy(), logits.argmax(1).numpy()
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        want = fn(truth, guess, average="macro", zero_division=0)
        assert _value(name, logits, y, "argmax", chunks) == pytest.approx(want, abs=1e-12), name
    for k in (1, 2, 3):
        name = "top_k_accuracy" if k == 2 else f"top_{k}_accuracy"
        if classes > 2:
            want = skm.top_k_accuracy_score(truth, logits.numpy(), k=k, labels=np.arange(classes))
        else:  # scikit-learn takes 2 classes as binary, one score a row: top-1 is accuracy, top-2 all
            want = skm.accuracy_score(truth, guess) if k == 1 else 1.0
        assert _value(name, logits, y, "argmax", chunks) == pytest.approx(want, abs=1e-12), name


def test_several_yes_no_outputs_average_over_every_column_as_multilabel():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(80, 4, generator=gen)
    y = (torch.rand(80, 4, generator=gen) < 0.3).float()
    y[:, 3] = 0  # a label never true: scikit-learn still averages over it
    guess = (logits > 0).int().numpy()
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        want = fn(y.int().numpy(), guess, average="macro", zero_division=0)
        assert _value(name, logits, y, "logit", 3) == pytest.approx(want, abs=1e-12), name


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("chunks", [1, 5])
def test_r2_equals_scikit_learns_uniform_average(outputs, chunks):
    gen = torch.Generator().manual_seed(outputs)
    y = torch.randn(64, outputs, generator=gen, dtype=torch.float64) * 3 + 1
    pred = y + torch.randn(64, outputs, generator=gen, dtype=torch.float64)
    want = skm.r2_score(y.numpy(), pred.numpy())
    assert _value("r2", pred, y, "threshold", chunks) == pytest.approx(want, rel=1e-10)
    # a constant target: scikit-learn's force_finite gives 1 for an exact fit, else 0
    flat = torch.ones(10, 1, dtype=torch.float64)
    assert _value("r2", flat, flat, "threshold") == skm.r2_score(flat.numpy(), flat.numpy()) == 1.0
    assert _value("r2", flat * 2, flat, "threshold") == skm.r2_score(flat.numpy(), 2 * flat.numpy()) == 0.0
    assert math.isnan(_value("r2", flat[:1], flat[:1], "threshold"))  # scikit-learn: not defined for one row


def test_r2_keeps_its_digits_for_targets_of_a_large_mean():
    """Σy² - (Σy)²/n cancels for y = 1e8 + noise (it read 0.0 against 0.73); measured from
    the first target, the spread keeps its digits, summed in chunks as over ranks."""
    gen = torch.Generator().manual_seed(0)
    y = 1e8 + torch.randn(1000, 1, generator=gen, dtype=torch.float64)
    pred = y + 0.5 * torch.randn(1000, 1, generator=gen, dtype=torch.float64)
    want = skm.r2_score(y.numpy(), pred.numpy())
    for chunks in (1, 7):
        assert _value("r2", pred, y, "threshold", chunks) == pytest.approx(want, rel=1e-9)


def test_top_k_breaks_ties_as_scikit_learn_and_reads_one_output_as_yes_or_no():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (500, 4), generator=gen).double()  # ties everywhere
    labels = torch.randint(0, 4, (500,), generator=gen)
    y = torch.eye(4)[labels]
    for k in (1, 2, 3):
        want = skm.top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k, labels=np.arange(4))
        assert _value(f"top_{k}_accuracy", scores, y, "argmax") == pytest.approx(want, abs=1e-12), k
    logits = torch.randn(50, 1, generator=gen)
    yes = (torch.rand(50, 1, generator=gen) > 0.5).float()
    want = skm.top_k_accuracy_score(yes[:, 0].numpy(), logits[:, 0].numpy(), k=1)
    assert _value("top_1_accuracy", logits, yes, "logit") == pytest.approx(want)
    assert _value("top_k_accuracy", logits, yes, "logit") == 1.0


def test_auc_of_nan_scores_is_nan():
    assert math.isnan(float(metrics.auc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0.0, 1.0, 1.0]))))


@pytest.mark.parametrize("n", [2, 9, 100, 1000])
def test_auc_equals_scikit_learns_with_ties(n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randint(0, max(2, n // 4), (n,), generator=gen).double() / 3  # many ties
    labels = torch.rand(n, generator=gen) < 0.5
    labels[0], labels[1] = True, False  # both classes
    want = skm.roc_auc_score(labels.numpy(), scores.numpy())
    assert float(metrics.auc(scores, labels.double())) == pytest.approx(want, abs=1e-12)
    assert float(metrics.auc(scores.float(), labels.float())) == pytest.approx(want, abs=1e-12)


def test_evaluate_reports_every_metric_as_scikit_learn_does():
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(120, 4, generator=gen)
    y = (X[:, :1] + 0.5 * torch.randn(120, 1, generator=gen) > 0).float()
    model = gd.Sequential(gd.Linear(4, 1, generator=gen))
    model.fit(X, y, loss=gd.BCEWithLogits(), epochs=3, verbose=False, seed=0)
    names = ["accuracy", "precision", "recall", "f1", "auc"]
    scores = model.evaluate(X, y, metrics=names)
    logits = model.predict(X)[:, 0]
    truth, guess = y[:, 0].numpy(), (logits > 0).numpy()
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(truth, guess))
    assert scores["precision"] == pytest.approx(skm.precision_score(truth, guess))
    assert scores["recall"] == pytest.approx(skm.recall_score(truth, guess))
    assert scores["f1"] == pytest.approx(skm.f1_score(truth, guess))
    assert scores["auc"] == pytest.approx(skm.roc_auc_score(truth, logits.numpy()))
    history = model.fit(X, y, epochs=2, verbose=False, metrics=names, validation_split=0.25, seed=1)
    assert set(history) >= {*names, *(f"val_{m}" for m in names)} and len(history["val_auc"]) == 2


def test_regression_metrics_in_evaluate():
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(50, 3, generator=gen)
    Y = X @ torch.randn(3, 2, generator=gen) + 0.1 * torch.randn(50, 2, generator=gen)
    model = gd.Sequential(gd.Linear(3, 2, generator=gen))
    model.fit(X, Y, epochs=20, verbose=False, optimizer=gd.SGD(lr=0.1), seed=0)
    scores = model.evaluate(X, Y, metrics=["r2", "mae", "mse"])
    pred = model.predict(X).numpy()
    assert scores["r2"] == pytest.approx(skm.r2_score(Y.numpy(), pred), rel=1e-6)
    assert scores["mae"] == pytest.approx(skm.mean_absolute_error(Y.numpy(), pred), rel=1e-6)
    assert scores["mse"] == pytest.approx(skm.mean_squared_error(Y.numpy(), pred), rel=1e-6)


@pytest.mark.parametrize("Y, message", [
    (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "auc' is binary ROC AUC, of a model with one output"),
    (torch.ones(4, 1), "needs both classes"),
])
def test_auc_that_is_not_defined_is_refused_before_any_work(Y, message):
    model = gd.Sequential(gd.Linear(2, Y.shape[1]))
    before = [t.clone() for t in model.state().values()]
    with pytest.raises(ValueError, match=message):
        model.fit(torch.rand(len(Y), 2), Y, metrics=["auc"], verbose=False)
    with pytest.raises(ValueError, match=message):
        model.evaluate(torch.rand(len(Y), 2), Y, metrics=["auc"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.state().values()))


def test_early_stopping_maximises_the_new_metrics_in_auto_mode():
    for name in ("val_precision", "val_recall", "val_f1", "val_auc", "val_r2", "top_5_accuracy"):
        assert gd.EarlyStopping(monitor=name)._watch.mode == "max", name
    assert gd.EarlyStopping(monitor="val_mse")._watch.mode == "min"


def test_top_k_of_independent_yes_no_outputs_is_refused():
    model = gd.Sequential(gd.Linear(2, 3))
    with pytest.raises(ValueError, match="ranks one class per row"):
        model.evaluate(torch.rand(4, 2), torch.ones(4, 3), loss=gd.BCEWithLogits(), metrics=["top_k_accuracy"])
