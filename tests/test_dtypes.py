"""Every dtype the IR supports (f16, bf16, f32, f64) through compile, grad, SGD and fit,
against a float64 reference of the same computation, with a tolerance that is a multiple
of the dtype's machine epsilon; and nothing upcasts or downcasts on the way."""

from __future__ import annotations

import pytest
import torch

import graphdl as gd

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
IDS = ["f16", "bf16", "f32", "f64"]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: float) -> None:
    """got (in `dtype`) within `ulps` machine epsilons of the float64 `want`, relative to
    the size of `want` (so a value near 0 is not held to a relative bound)."""
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = max(want.abs().max().item(), 1e-3)
    error = (got.double() - want).abs().max().item()
    assert error <= ulps * eps * scale, f"off by {error / (eps * scale):.1f} eps (allowed {ulps})"


def _model(dtype: torch.dtype) -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Linear(2, 6, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(6, 5, generator=gen, dtype=dtype), gd.ReLU(),
                         gd.Linear(5, 1, generator=gen, dtype=dtype), gd.Sigmoid())


def _data(dtype: torch.dtype, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    return X.to(dtype), (X.sum(1, keepdim=True) > 1).to(dtype)


def _reference(params: list[torch.Tensor], X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The net's MSE and its gradients in float64, by torch.autograd, from the same values."""
    w = [p.detach().double().requires_grad_() for p in params]
    h = torch.tanh(X.double() @ w[0] + w[1])
    h = torch.relu(h @ w[2] + w[3])
    h = torch.sigmoid(h @ w[4] + w[5])
    loss = ((h - Y.double()) ** 2).mean()
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, w)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_compile_and_grad_follow_float64_in_the_models_dtype(dtype):
    model = _model(dtype)
    X, Y = _data(dtype)
    params = list(model.parameters().values())
    (pred,) = gd.compile(model.graph())(x=X)
    step = gd.compile(gd.grad(model.graph(gd.MSE()), list(model.parameters())))
    loss, *grads = step(x=X, y=Y)
    want_loss, want_grads = _reference(params, X, Y)
    assert pred.dtype == dtype and pred.shape == (40, 1)
    _close(loss, want_loss, dtype, 4)
    for got, want in zip(grads, want_grads):
        _close(got, want, dtype, 8)  # measured: at most 3.5


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)],
                         ids=["plain", "momentum", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sgd_step_follows_the_rule_in_float64(dtype, momentum, nesterov):
    """u <- γu + η(g + λw), w <- w - u (Nesterov: w <- w - γu - η(g + λw)), three steps in
    the params' own dtype, on the public step (the fused kernel takes it without momentum)."""
    gen = torch.Generator().manual_seed(2)
    # 35 and 40 elements: more than a SIMD block, where torch's CPU fused kernel went wrong in f16 and bf16
    params = [torch.randn(5, 7, generator=gen, dtype=torch.float64).to(dtype), torch.randn(40, generator=gen).to(dtype)]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in params] for _ in range(3)]
    want = [p.double().clone() for p in params]  # a copy, also in float64
    u = [torch.zeros_like(w) for w in want]
    opt = gd.SGD(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    opt.reset(params)
    for step in grads:
        opt.step(params, step)
        for w, v, g in zip(want, u, step):
            d = g.double() + 0.01 * w
            v.mul_(momentum).add_(0.1 * d)
            w.sub_(momentum * v + 0.1 * d if nesterov else v)
    for got, w in zip(params, want):
        _close(got, w, dtype, 4)  # measured: at most 1.4
    assert all(b.dtype == dtype for b in opt.buffers)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_fit_follows_float64_and_keeps_the_models_dtype(dtype):
    """Three epochs with momentum against the same loop in float64 from the same weights."""
    model = _model(dtype)
    X, Y = _data(dtype)
    params = list(model.parameters().values())
    want = [p.double().clone() for p in params]  # a copy, also in float64
    u = [torch.zeros_like(w) for w in want]
    losses = []
    for _ in range(3):
        total = 0.0
        for s in range(0, 40, 16):  # 40 = 16 + 16 + 8: a partial batch
            loss, grads = _reference(want, X[s:s + 16], Y[s:s + 16])
            total += loss.item() * len(X[s:s + 16]) / 40
            for w, v, g in zip(want, u, grads):
                v.mul_(0.5).add_(0.5 * g)
                w.sub_(v)
        losses.append(total)
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.5, momentum=0.5), epochs=3, batch_size=16,
                        shuffle=False, validation_data=(X, Y), verbose=False)
    eps = torch.finfo(dtype).eps
    assert history["loss"] == pytest.approx(losses, rel=8 * eps)
    for got, w in zip(model.parameters().values(), want):
        _close(got, w, dtype, 8)  # measured: at most 1.8
    assert all(p.dtype == dtype for p in model.parameters().values())
    assert model.predict(X).dtype == dtype
    assert all(type(v) is float for key in ("loss", "accuracy", "val_loss", "val_accuracy") for v in history[key])
