"""SGD's update rule and schedules, on their own (fit's use of them is in test_train)."""

from __future__ import annotations

import pytest
import torch

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
