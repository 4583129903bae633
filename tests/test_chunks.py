"""Whole data sets run through the compiled graph in chunks of rows (`train.chunk_rows`):
fit's metrics and validation, evaluate and predict give what one pass over every row gives,
for every metric, weighted or not, a share of the rows (data-parallel) included; a model
whose rows may mix (a functional model) runs whole."""

from __future__ import annotations

import pytest
import torch

import graphdl as gd
from graphdl import distributed as dp
from graphdl import metrics, train
from graphdl.compile import Compiled

ROWS = 103  # chunks of MIN_CHUNK_ROWS (16) and a last one of 7


def _net(outputs: int, seed: int = 0) -> gd.Sequential:
    gen = torch.Generator().manual_seed(seed)
    return gd.Sequential(gd.Linear(3, 32, generator=gen), gd.Tanh(), gd.Linear(32, outputs, generator=gen),
                         input_shape=(3,))


def _both(monkeypatch, run, chunked_rows: int = 16):
    """run() with every data set in one pass, then in chunks of 16 rows, checking the
    rows each call of a compiled graph got (measure's and predict's calls): the largest
    is `chunked_rows` in the second."""
    seen: list[int] = []
    measure, call = train.measure, Compiled.__call__

    def counted(fn, X, *args, **kwargs):
        def fn_counted(x, *rest):
            seen.append(len(x))
            return fn(x, *rest)
        return measure(fn_counted, X, *args, **kwargs)

    def called(self, *args, **feeds):
        seen.append(len(feeds["x"]) if "x" in feeds else len(args[0]))
        return call(self, *args, **feeds)
    monkeypatch.setattr(train, "measure", counted)
    monkeypatch.setattr(Compiled, "__call__", called)
    monkeypatch.setattr(train, "CHUNK_BYTES", 1 << 40)
    whole = run()
    assert seen and 16 not in seen, seen
    seen.clear()
    monkeypatch.setattr(train, "CHUNK_BYTES", 1)
    chunked = run()
    assert seen and max(seen) == chunked_rows, seen
    return whole, chunked


def test_a_chunk_holds_about_chunk_bytes_of_the_widest_value():
    net = _net(2)  # the widest value: 32 float32s a row
    assert train.chunk_rows(net, train._predict_fn(net)) == train.CHUNK_BYTES // (32 * 4)
    cnn = gd.Sequential(gd.Reshape((1, 8, 8)), gd.Conv2d(1, 16, 3, padding=1), gd.ReLU(), gd.Flatten(),
                        gd.Linear(1024, 10), input_shape=(64,))
    assert train.chunk_rows(cnn, train._predict_fn(cnn)) == train.CHUNK_BYTES // (16 * 8 * 8 * 4)
    wide = gd.Sequential(gd.Linear(3, 10**6), input_shape=(3,))
    assert train.chunk_rows(wide, train._predict_fn(wide)) == train.MIN_CHUNK_ROWS


@pytest.mark.parametrize("kind", ["classes", "binary", "regression"])
def test_evaluate_and_predict_in_chunks_give_one_passs_numbers(monkeypatch, kind):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(ROWS, 3, generator=gen)
    if kind == "classes":
        net, loss, Y = _net(4), gd.CrossEntropy(), torch.randint(0, 4, (ROWS,), generator=gen)
        names = ["accuracy", "precision", "recall", "f1", "top_2_accuracy"]
    elif kind == "binary":
        net, loss, Y = _net(1), gd.BCEWithLogits(), (torch.rand(ROWS, 1, generator=gen) > 0.5).float()
        names = ["accuracy", "precision", "recall", "f1", "auc"]
    else:
        net, loss, Y = _net(2), gd.MSE(), torch.randn(ROWS, 2, generator=gen)
        names = ["mse", "mae", "r2"]
    weights = torch.rand(ROWS, generator=gen) + 0.5
    whole, chunked = _both(monkeypatch, lambda: (
        net.evaluate(X, Y, loss=loss, metrics=names),
        net.evaluate(X, Y, loss=loss, metrics=names, sample_weight=weights),
        net.predict(X)))
    for one, many in zip(whole[:2], chunked[:2], strict=True):
        assert one.keys() == many.keys()
        for key in one:
            assert many[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7), key
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-6, atol=1e-7)
    assert chunked[2].shape == (ROWS, Y.shape[-1] if Y.dim() == 2 else 4)


def test_fit_scores_its_epochs_in_chunks_as_in_one_pass(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    X, Y = torch.randn(ROWS, 3, generator=gen), torch.randint(0, 4, (ROWS,), generator=gen)
    X_val, Y_val = torch.randn(41, 3, generator=gen), torch.randint(0, 4, (41,), generator=gen)

    def run():
        net = _net(4, seed=3)
        h = net.fit(X, Y, loss=gd.CrossEntropy(), optimizer=gd.SGD(0.1), epochs=3, batch_size=32, seed=0,
                    metrics=["accuracy", "f1"], validation_data=(X_val, Y_val), verbose=False)
        return h, net.parameters()
    (whole, params), (chunked, chunked_params) = _both(monkeypatch, run)
    assert whole["loss"] == chunked["loss"]  # the steps themselves are not chunked
    assert all(torch.equal(params[k], chunked_params[k]) for k in params)
    for key in ("accuracy", "f1", "val_loss", "val_accuracy", "val_f1"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6), key


def test_a_share_of_the_rows_is_chunked_from_its_first_row(monkeypatch):
    """Data-parallel, a rank measures rows first..first+count in chunks: as in one pass."""
    net = _net(4)
    gen = torch.Generator().manual_seed(4)
    X, Y = torch.randn(ROWS, 3, generator=gen), torch.randint(0, 4, (ROWS,), generator=gen)
    Y = train.class_targets(net, Y)
    fn = train._eval_fn(net, gd.CrossEntropy())
    monkeypatch.setattr(dp, "shard", lambda n: (37, 50))
    monkeypatch.setattr(dp, "sum_over_ranks", lambda t, what: t)
    names = ["accuracy", "precision"]
    with torch.inference_mode():
        one = metrics.measure(fn, X, Y, "softmax", names, distributed=True)
        many = metrics.measure(fn, X, Y, "softmax", names, distributed=True, rows=16)
        alone = metrics.measure(fn, X[37:87], Y[37:87], "softmax", names, distributed=False)
    for key in one:
        assert float(many[key]) == pytest.approx(float(one[key]), rel=1e-6), key
    assert float(one["accuracy"]) == pytest.approx(float(alone["accuracy"]))  # the share's own rows
    assert float(one["loss"]) == pytest.approx(float(alone["loss"]) * 50 / ROWS, rel=1e-6)


def test_a_model_whose_rows_may_mix_runs_whole(monkeypatch):
    """A functional model may compute across rows (here each row less the batch's mean):
    it says nothing of its rows, so it runs in one pass, whatever CHUNK_BYTES is."""
    g = gd.Graph("centred")
    x = g.input("x", (None, 3), torch.float32)
    model = gd.Model(x, gd.Linear(3, 2)(x - gd.mean(x, 0, keepdims=True)))
    X = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(5))
    assert train.chunk_rows(model, train._predict_fn(model)) is None
    whole, chunked = _both(monkeypatch, lambda: model.predict(X), chunked_rows=ROWS)
    assert torch.equal(whole, chunked)


def test_an_error_names_the_whole_data_not_a_chunk(monkeypatch):
    monkeypatch.setattr(train, "CHUNK_BYTES", 1)
    with pytest.raises(gd.GraphError, match=r"input x is f32\[103,5\]"):
        _net(2).predict(torch.randn(ROWS, 5))


class _RMSE(gd.Loss):
    """Not a mean over rows: the root of one."""

    name = "rmse"

    def __call__(self, pred, target):
        d = gd.sub(pred, target)
        m = gd.mean(gd.mul(d, d))
        return gd.mul(m, gd.rsqrt(m))


class _SSE(gd.Loss):
    name = "sse"

    def __call__(self, pred, target):
        d = gd.sub(pred, target)
        return gd.sum(gd.mul(d, d))


class _Doubled(gd.Loss):
    """2 * mse: a mean over rows, and it says so."""

    name = "doubled"
    mean_over_rows = True

    def __call__(self, pred, target):
        return gd.mul(gd.mse(pred, target), 2.0)


def test_a_loss_that_is_no_mean_over_rows_is_taken_over_the_whole_data(monkeypatch):
    """evaluate and fit's val_loss: an RMSE or a sum of one's own runs whole (a chunked
    RMSE read 5.41 for 6.94); a loss that says it is a mean over rows runs in chunks."""
    net = _net(1)
    gen = torch.Generator().manual_seed(6)
    X, Y = torch.randn(ROWS, 3, generator=gen), torch.randn(ROWS, 1, generator=gen) * 10
    monkeypatch.setattr(train, "CHUNK_BYTES", 1)
    d = (net.predict(X).double() - Y.double()) ** 2
    assert net.evaluate(X, Y, loss=_RMSE())["loss"] == pytest.approx(float(d.mean().sqrt()), rel=1e-6)
    assert net.evaluate(X, Y, loss=_SSE())["loss"] == pytest.approx(float(d.sum()), rel=1e-6)
    h = _net(1).fit(X, Y, loss=_SSE(), optimizer=gd.SGD(0.0), epochs=1, batch_size=32, validation_data=(X, Y),
                    verbose=False)
    assert h["val_loss"][0] == pytest.approx(float(d.sum()), rel=1e-6)
    whole, chunked = _both(monkeypatch, lambda: net.evaluate(X, Y, loss=_Doubled()))
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6) == pytest.approx(2 * float(d.mean()), rel=1e-6)


def test_data_parallel_refuses_a_loss_that_does_not_say_it_is_a_mean_over_rows():
    from graphdl.losses import Weighted, adds_up_by_rows
    from graphdl.settings import check_shares
    for loss in (gd.MSE(), gd.CrossEntropy(), Weighted(gd.BCEWithLogits()), _Doubled()):
        check_shares(loss, True, "fit")
    check_shares(_RMSE(), False, "fit")  # one process: any loss
    with pytest.raises(ValueError, match=r"fit\(distributed=True\) adds up the ranks' losses .* _RMSE\(\) does not "
                                         r"say it is one; if it is \(such as k \* mse\), set mean_over_rows = True"):
        check_shares(_RMSE(), True, "fit")
    assert not adds_up_by_rows(Weighted(_RMSE())) and adds_up_by_rows(Weighted(_Doubled()))


class _Centre(gd.Layer):
    """Each row less the batch's mean: rows mix."""

    def forward(self, build, x):
        return gd.sub(x, gd.mean(x, 0, keepdims=True))


class _Mine(gd.Linear):
    """A built-in's forward, inherited: its rows stay apart."""


class _MineMixing(gd.Linear):
    def forward(self, build, x):
        y = super().forward(build, x)
        return gd.sub(y, gd.mean(y, 0, keepdims=True))


def test_a_layer_of_ones_own_keeps_the_data_whole_unless_it_says_rows_are_apart(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(ROWS, 3, generator=gen) + torch.linspace(0, 5, ROWS)[:, None]
    for layer in (_Centre(), _MineMixing(3, 3)):
        net = gd.Sequential(gd.Linear(3, 3), layer, gd.Linear(3, 1), input_shape=(3,))
        assert not net.rows_apart and train.chunk_rows(net, train._predict_fn(net)) is None
        whole, chunked = _both(monkeypatch, lambda net=net: net.predict(X), chunked_rows=ROWS)
        assert torch.equal(whole, chunked)
    assert gd.Sequential(_Mine(3, 2), input_shape=(3,)).rows_apart


def test_every_built_in_layer_says_its_rows_are_apart():
    from graphdl.layers import LAYERS, keeps_rows_apart
    assert LAYERS and all(keeps_rows_apart(cls) for cls in LAYERS.values()), \
        [name for name, cls in LAYERS.items() if not keeps_rows_apart(cls)]


class _RootMSE(gd.MSE):
    """An RMSE written on MSE: its own __call__ must say mean_over_rows again."""

    name = "root_mse"

    def __call__(self, pred, target):
        m = super().__call__(pred, target)
        return gd.mul(m, gd.rsqrt(m))


def test_a_subclass_of_a_built_in_loss_that_changes_it_must_say_it_again(monkeypatch):
    from graphdl.losses import Weighted, adds_up_by_rows
    assert adds_up_by_rows(gd.MSE()) and not adds_up_by_rows(_RootMSE())
    net = _net(1)
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(ROWS, 3, generator=gen)
    Y = torch.randn(ROWS, 1, generator=gen) * torch.linspace(0, 10, ROWS)[:, None]
    monkeypatch.setattr(train, "CHUNK_BYTES", 1)
    d = (net.predict(X).double() - Y.double()) ** 2
    assert net.evaluate(X, Y, loss=_RootMSE())["loss"] == pytest.approx(float(d.mean().sqrt()), rel=1e-6)
    # its inherited weighted() would weigh MSE, not it: refused, not a weighted MSE under its name
    with pytest.raises(ValueError, match=r"_RootMSE defines its own __call__ but inherits weighted\(\) from MSE"):
        Weighted(_RootMSE())
    with pytest.raises(ValueError, match=r"inherits weighted\(\) from MSE"):
        net.evaluate(X, Y, loss=_RootMSE(), sample_weight=torch.ones(ROWS))


class _SaysMixing(gd.Linear):
    rows_apart = False  # said outright, though forward is Linear's


def test_what_a_layer_says_counts_where_it_is_said(monkeypatch):
    assert not gd.Sequential(_SaysMixing(3, 2), input_shape=(3,)).rows_apart
    lin = gd.Linear(3, 3)
    net = gd.Sequential(lin, gd.Linear(3, 1), input_shape=(3,))
    assert net.rows_apart
    centred = _Centre().forward
    lin.forward = lambda build, x: centred(build, gd.Linear.forward(lin, build, x))  # the instance's own forward
    assert not net.rows_apart
    X = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(9)) + torch.linspace(0, 5, ROWS)[:, None]
    whole, chunked = _both(monkeypatch, lambda: net.predict(X), chunked_rows=ROWS)
    assert torch.equal(whole, chunked)

    class Late(gd.Linear):
        pass
    late = gd.Sequential(Late(3, 2), input_shape=(3,))
    assert late.rows_apart
    Late.forward = _Centre.forward  # replaced after the model read it: read again at each call
    assert not late.rows_apart


def test_softmax_refuses_the_batch_dim_however_it_got_there():
    s = gd.Softmax()
    net = gd.Sequential(gd.Linear(3, 4), s, input_shape=(3,))
    s.dim = 0
    with pytest.raises(gd.GraphError, match=r"Softmax\(dim=0\) would normalise across the batch"):
        net.predict(torch.randn(5, 3))
