"""graphdl.checks: the settings users pass (numbers of any real type, dtypes, flags,
widths, devices) are checked, and a wrong one is named with what it must be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BIG, _data, _model

import graphdl as gd


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_isfinite_all_for_every_value_and_layout(dtype):
    """all_finite (aminmax) answers as isfinite().all() does: NaN, inf or -inf at the
    first, a middle or the last element, in a dense, transposed or strided view, with
    the dtype's largest finite values elsewhere (which a sum would overflow)."""
    from graphdl.checks import all_finite
    top = torch.finfo(dtype).max
    base = torch.tensor([top, -top] * 50, dtype=dtype).reshape(10, 10)
    assert all_finite(base) and all_finite(base.t()) and all_finite(base[:, ::3])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for k in (0, 45, 99):
            t = base.clone()
            t.view(-1)[k] = bad
            for view in (t, t.t(), t.t().contiguous().t()):
                assert all_finite(view) is False, (bad, k)
    t = base.clone()
    t[3, 1] = float("nan")
    assert all_finite(t[:, 1::2]) is False and all_finite(t[:, ::2]) is True  # only what the view holds
    assert all_finite(torch.ones(()) * float("inf")) is False


def test_all_finite_of_empty_integer_bool_and_complex_tensors():
    from graphdl.checks import all_finite
    assert all_finite(torch.zeros(0, 3)) is True
    assert all_finite(torch.arange(5)) is True and all_finite(torch.tensor([True, False])) is True
    c = torch.ones(4, dtype=torch.complex64)
    assert all_finite(c) is True
    c[2] = complex(0, float("inf"))
    assert all_finite(c) is False


def test_fit_names_the_first_bad_value_of_large_data():
    """The data check is one aminmax pass; the error still names the first NaN or inf."""
    net = gd.Sequential(gd.Linear(3, 1), input_shape=(3,))
    X, Y = torch.randn(5000, 3), torch.randn(5000, 1)
    X[4321, 2], X[4999, 0] = float("-inf"), float("nan")
    with pytest.raises(ValueError, match=r"X has NaN or inf values, first at X\[4321, 2\] = -inf"):
        net.fit(X, Y, loss=gd.MSE(), epochs=1, verbose=False)


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz, torch.float8_e8m0fnu])
def test_float8_data_gets_the_dtype_error_or_names_its_bad_value(dtype):
    """aminmax takes no float8 and isfinite only some: all_finite reads them in float32."""
    from graphdl.checks import all_finite
    X = torch.rand(8, 3).add_(1).to(dtype)
    assert all_finite(X) is True
    net = gd.Sequential(gd.Linear(3, 1), input_shape=(3,))
    with pytest.raises(gd.GraphError, match=rf"input x is {str(dtype).removeprefix('torch.')}\[8,3\] but the graph "
                                            r"declares f32\[N,3\]"):
        net.fit(X, torch.randn(8, 1), epochs=1, verbose=False)
    bad = torch.rand(8, 3).add_(1)
    bad[5, 1] = float("nan")
    assert all_finite(bad.to(dtype)) is False
    with pytest.raises(ValueError, match=r"X has NaN or inf values, first at X\[5, 1\] = nan"):
        net.evaluate(bad.to(dtype), torch.randn(8, 1), loss=gd.MSE())
