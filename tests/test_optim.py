"""graphdl.optim: SGD's update rule and schedules, on their own and through fit (against
torch.optim.SGD), and the settings they check."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import _net, _torch_twin

import graphdl as gd


def _rule(params, grads_per_step, lrs, momentum, nesterov=False, weight_decay=0.0):
    """The documented rule in float64: u <- γu + η(g + λw), w <- w - u (Nesterov: w <- w - (γu + η(g + λw)))."""
    w = [p.double().clone() for p in params]
    u = [torch.zeros_like(p) for p in w]
    for grads, lr in zip(grads_per_step, lrs):
        for p, v, g in zip(w, u, grads):
            g = g.double() + weight_decay * p
            v.mul_(momentum).add_(lr * g)
            p.sub_(momentum * v + lr * g if nesterov else v)
    return w, u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "foreach"])
def test_momentum_stays_bounded_through_200_epochs_of_halving(dtype, fused):
    """ExponentialDecay(0.5) with two batches an epoch: the rate reaches 2**-200, below
    every float's range. The velocity must decay with it, not grow (the old u/lr buffers
    grew 2x an epoch and overflowed float32 at epoch ~155, float16 at ~21)."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(8, 2, generator=gen).to(dtype), torch.rand(8, 1, generator=gen).to(dtype)
    model = gd.Sequential(gd.Linear(2, 3, generator=gen, dtype=dtype), gd.Tanh(),
                          gd.Linear(3, 1, generator=gen, dtype=dtype))
    opt = gd.SGD(lr=0.1, momentum=0.9)
    opt.fused = fused
    history = model.fit(X, Y, optimizer=opt, schedule=gd.ExponentialDecay(0.5), epochs=200, batch_size=4,
                        shuffle=False, verbose=False)
    assert len(history["loss"]) == 200
    assert all(bool(b.isfinite().all()) and float(b.abs().max()) < 1.0 for b in opt.buffers)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_the_velocity_follows_the_rule_exactly_across_rate_changes(fused, nesterov):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 2, generator=gen), torch.randn(2, generator=gen)]
    steps = [[torch.randn(3, 2, generator=gen), torch.randn(2, generator=gen)] for _ in range(6)]
    lrs = [0.1, 0.1, 0.05, 0.0, 0.0, 0.2]  # a rate of 0 keeps moving w by the decaying u
    opt = gd.SGD(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    opt.fused = fused
    live = [p.clone() for p in params]
    for grads, lr in zip(steps, lrs):
        opt.update(live, [g.clone() for g in grads], lr, overwrite_grads=True)
    want_w, want_u = _rule(params, steps, lrs, 0.9, nesterov, 0.01)
    for got, want in zip([*live, *opt.buffers], [*want_w, *want_u]):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_step_leaves_the_callers_gradients_alone_and_checks_them():
    p, g = torch.ones(3), torch.full((3,), 2.0)
    gd.SGD(lr=0.5, momentum=0.9).step([p], [g])
    assert torch.equal(g, torch.full((3,), 2.0)) and torch.equal(p, torch.zeros(3))
    with pytest.raises(ValueError, match="1 params but 2 gradients"):
        gd.SGD().step([p], [g, g])
    with pytest.raises(ValueError, match=r"param 0 is torch.float32\[3\] .* gradient is torch.float32\[4\]"):
        gd.SGD().step([p], [torch.ones(4)])


def test_step_updates_params_that_require_grad_or_were_made_in_inference_mode():
    leaf = torch.ones(2, requires_grad=True)
    with torch.inference_mode():
        frozen = torch.ones(2)
    gd.SGD(lr=1.0).step([leaf, frozen], [torch.ones(2), torch.ones(2)])
    assert torch.equal(leaf.detach(), torch.zeros(2)) and torch.equal(frozen, torch.zeros(2))


def test_a_mixed_dtype_param_list_updates_every_param():
    """The fused kernel takes one dtype a call; a float16 param after a float32 one must move too."""
    params = [torch.ones(64), torch.ones(64, dtype=torch.float16), torch.ones(64, dtype=torch.float64)]
    gd.SGD(lr=0.5).step(params, [torch.ones_like(p) for p in params])
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in params)


def test_nothing_to_train_is_a_no_op_and_velocities_must_fit_their_params():
    gd.SGD(lr=0.1, momentum=0.9).step([], [])
    opt = gd.SGD(lr=0.1, momentum=0.9)
    opt.step([torch.ones(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match=r"velocity kept for it is torch.float32\[3\].*call reset\(params\)"):
        opt.step([torch.ones(4)], [torch.ones(4)])
    with pytest.raises(ValueError, match="SGD updates floating-point params only"):
        gd.SGD().step([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)])


@pytest.mark.parametrize("build", [lambda x, w: gd.sum(gd.tanh(gd.matmul(x, gd.transpose(w)))),
                                   lambda x, w: gd.add(gd.sum(w), gd.mean(x))],
                         ids=["transposed-product", "linear-in-w"])
def test_sgd_step_is_right_for_any_gradient_layout(build):
    g = gd.Graph("layout")
    x = g.input("x", (None, 2))
    w = g.param("w", torch.randn(3, 2))
    g.output(build(x, w))
    _, dw = gd.compile(gd.grad(g, ["w"]))(x=torch.randn(8, 2))
    expected = w.data - 0.1 * dw
    opt = gd.SGD(lr=0.1, momentum=0.9)
    opt.reset([w.data])
    opt.step([w.data], [dw])
    torch.testing.assert_close(w.data, expected)


@pytest.mark.parametrize("planned", [True, False], ids=["plan", "update"])
def test_fused_update_of_small_params_runs_on_one_thread(monkeypatch, planned):
    """torch's fused CPU kernel forks every thread for each tensor: 115-210 µs for the disk
    net's update on 2 threads against 4 µs on one. Small updates run on one thread, and
    the thread count is put back."""
    seen = []
    real = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = [torch.rand(25, 25), torch.rand(25)]
        grads = [torch.rand(25, 25), torch.rand(25)]
        opt = gd.SGD(lr=0.1, momentum=0.9)
        opt.reset(params)
        if planned:
            opt.plan(params, grads)()
        else:
            opt.update(params, grads, 0.1, overwrite_grads=True)
        big = [torch.rand(256, 256)]
        opt.reset(big)
        opt.update(big, [torch.rand(256, 256)], 0.1, overwrite_grads=True)  # 65536 elements: all threads
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- through fit, against torch.optim.SGD -----------------------------------------------------------


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


# -- bad settings raise ValueError naming the argument ----------------------------------------------


@pytest.mark.parametrize("make, name", [
    (lambda: gd.SGD(lr=-0.1), "lr"), (lambda: gd.SGD(lr=math.nan), "lr"), (lambda: gd.SGD(momentum=1.0), "momentum"),
    (lambda: gd.SGD(momentum=-0.1), "momentum"), (lambda: gd.SGD(weight_decay=-1), "weight_decay"),
    (lambda: gd.StepDecay(every=0, factor=0.5), "every"), (lambda: gd.CosineDecay(0), "epochs"),
    (lambda: gd.Linear(0, 3), "in_features"),
])
def test_bad_settings_raise_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


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
