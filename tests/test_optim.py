"""The optimizers' update rules, on their own and in fit, against torch.optim; their groups,
settings and fused-kernel choices; and the schedules."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from helpers import _net as _helpers_net
from helpers import _torch_twin

import graphdl as gd
from graphdl import optim


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


# -- Adam, AdamW, RMSprop, Adagrad against torch.optim ------------------------------------------------

CASES = [
    (gd.Adam, torch.optim.Adam, dict(lr=0.01)),
    (gd.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    (gd.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True, eps=1e-6)),
    (gd.AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (gd.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
    (gd.RMSprop, torch.optim.RMSprop, dict(lr=0.01)),
    (gd.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    (gd.RMSprop, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, centered=True)),
    (gd.RMSprop, torch.optim.RMSprop, dict(lr=0.005, momentum=0.5, centered=True, weight_decay=0.01)),
    (gd.Adagrad, torch.optim.Adagrad, dict(lr=0.1)),
    (gd.Adagrad, torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1)),
    (gd.Adagrad, torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.5, eps=1e-6)),
    (gd.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
]
CASE_IDS = [f"{mine.__name__}({','.join(f'{k}={v}' for k, v in kw.items())})" for mine, _, kw in CASES]


def _net(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> gd.Sequential:
    return gd.Sequential(gd.Linear(3, 6, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(6, 5, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(5, 2, generator=gen, dtype=dtype))


_twin = _torch_twin  # the same net in torch.nn, with the same weights (tests/helpers.py)


def _torch_fit(twin: torch.nn.Module, opt: torch.optim.Optimizer, X, Y, epochs: int, batch_size: int,
               scheduler=None, per_step=False) -> list[float]:
    """torch's loop with the same batches as fit(shuffle=False); the mean loss of each epoch."""
    losses = []
    for _ in range(epochs):
        total = 0.0
        for first in range(0, len(X), batch_size):
            x, y = X[first:first + batch_size], Y[first:first + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(twin(x), y)
            loss.backward()
            opt.step()
            if scheduler is not None and per_step:
                scheduler.step()
            total += loss.item() * len(x)
        if scheduler is not None and not per_step:
            scheduler.step()
        losses.append(total / len(X))
    return losses


def _assert_like_torch(model: gd.Sequential, twin: torch.nn.Sequential, rtol: float, atol: float) -> None:
    for k, layer in enumerate(model.layers):
        if isinstance(layer, gd.Linear):
            torch.testing.assert_close(layer.weight, twin[k].weight.detach().T, rtol=rtol, atol=atol, msg=f"{k}.weight")
            torch.testing.assert_close(layer.bias, twin[k].bias.detach(), rtol=rtol, atol=atol, msg=f"{k}.bias")


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fit_follows_torch_optim(case, fused, dtype):
    """fit's compiled step (arena, planned update) against torch.optim + autograd, from the
    same weights over the same batches: 3 epochs of 5 batches (23 = 4*5 + 3: a tail batch)."""
    mine, theirs, settings = case
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(23, 3, generator=gen, dtype=dtype), torch.rand(23, 2, generator=gen, dtype=dtype)
    model = _net(gen, dtype)
    twin = _twin(model)
    opt = mine(**settings)
    opt.fused = fused
    history = model.fit(X, Y, optimizer=opt, epochs=3, batch_size=5, shuffle=False, verbose=False)
    expected = _torch_fit(twin, theirs(twin.parameters(), **settings), X, Y, 3, 5)
    assert history["loss"] == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-12)
    _assert_like_torch(model, twin, **_tolerance(dtype))


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in transposed memory, or as every other column of a wider tensor."""
    if layout == "transposed":
        return t.mT.contiguous().mT if t.dim() >= 2 else t.flip(0).clone().flip(0)
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype)
    wide[..., 1::2] = t
    return wide[..., 1::2]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] is not gd.SGD], ids=CASE_IDS[:-1])
def test_params_in_odd_layouts_follow_torch_optim(case):
    """Transposed and sliced params (as test_layouts has them for SGD) take the multi-tensor
    ops, beside contiguous ones on the fused kernel, and still follow torch."""
    mine, theirs, settings = case
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.rand(12, 3, generator=gen, dtype=torch.float64), torch.rand(12, 2, generator=gen, dtype=torch.float64)
    model = _net(gen, torch.float64)
    twin = _twin(model)
    model.layers[0].weight = _relayout(model.layers[0].weight, "transposed")
    model.layers[0].bias = _relayout(model.layers[0].bias, "sliced")
    model.layers[2].weight = _relayout(model.layers[2].weight, "sliced")
    assert not model.layers[0].weight.is_contiguous() and not model.layers[2].weight.is_contiguous()
    model.fit(X, Y, optimizer=mine(**settings), epochs=2, batch_size=4, shuffle=False, verbose=False)
    _torch_fit(twin, theirs(twin.parameters(), **settings), X, Y, 2, 4)
    _assert_like_torch(model, twin, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] is not gd.SGD], ids=CASE_IDS[:-1])
def test_step_and_plan_follow_torch_optim_at_changing_rates(case):
    """`step` (gradients in odd layouts, left as they were) and a plan run at new rates via
    set_lr (down to 0 and back), against torch.optim with its lr changed between steps."""
    mine, theirs, settings = case
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64),
             torch.randn(40, generator=gen, dtype=torch.float64)]
    lrs = [settings["lr"], settings["lr"] / 2, 0.0, settings["lr"], 3 * settings["lr"]]
    ref = [p.clone().requires_grad_() for p in start]
    opt = theirs(ref, **settings)
    stepped, planned = [p.clone() for p in start], [p.clone() for p in start]
    a, b = mine(**settings), mine(**settings)
    buffers = [torch.empty_like(p) for p in planned]
    apply = b.plan(planned, buffers)
    for lr in lrs:
        odd = [torch.randn(3, generator=gen, dtype=torch.float64).expand(4, 3),  # one row, repeated
               torch.randn(6, generator=gen, dtype=torch.float64)[::2],  # a strided slice
               torch.randn(40, 1, generator=gen, dtype=torch.float64).mT[0]]
        kept = [g.clone() for g in odd]
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(ref, odd):
            p.grad = g.clone(memory_format=torch.contiguous_format)
        opt.step()
        a.step(stepped, odd, lr=lr)
        assert all(torch.equal(g, k) for g, k in zip(odd, kept)), "step changed the caller's gradients"
        for buf, g in zip(buffers, odd):
            buf.copy_(g)
        b.set_lr(lr)
        apply()
    for got_step, got_plan, want in zip(stepped, planned, ref):
        torch.testing.assert_close(got_step, want.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got_plan, want.detach(), rtol=1e-12, atol=1e-13)


def _reference(theirs, settings, start, steps):
    """torch.optim's steps in float64 from `start` (any dtype) with gradients `steps`."""
    ref = [p.double().clone().requires_grad_() for p in start]
    opt = theirs(ref, **settings)
    for grads in steps:
        for p, g in zip(ref, grads):
            p.grad = g.double().clone()
        opt.step()
    return [p.detach() for p in ref]


LOW = [(gd.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), "_fused_adam_"),
       (gd.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True), "_fused_adam_"),
       (gd.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), "_fused_adamw_"),
       (gd.Adagrad, torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.1), "_fused_adagrad_"),
       (gd.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9), "_fused_sgd_")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("case", LOW, ids=[f"{c[0].__name__}{c[2]}" for c in LOW])
def test_the_cpu_fused_kernels_are_taken_where_right_and_follow_torch(monkeypatch, case, dtype):
    """On the CPU each fused kernel is probed once per dtype: torch 2.13's `_fused_sgd_`
    skips whole SIMD blocks of f16 and bf16 params, its Adam, AdamW and Adagrad kernels do
    not. Whichever path a dtype takes, 4 steps on params of 35, 40 and 515 elements (past
    SIMD blocks, with tails) follow torch.optim in float64 to a few of the dtype's epsilons."""
    mine, theirs, settings, kernel = case
    calls = []
    real_kernel = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **k: (calls.append(a[0][0].dtype), real_kernel(*a, **k))[1])
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(5, 7, generator=gen).to(dtype), torch.randn(40, generator=gen).to(dtype),
             torch.randn(515, generator=gen).to(dtype)]
    steps = [[torch.randn(p.shape, generator=gen).to(dtype) for p in start] for _ in range(4)]
    params = [p.clone() for p in start]
    opt = mine(**settings)
    for grads in steps:
        opt.step(params, grads)
    works = optim.kernels.fused_works(kernel, torch.device("cpu"), dtype)
    assert works == (kernel != "_fused_sgd_" or dtype == torch.float32)  # what torch 2.13 does
    assert bool(calls) == works and all(d == dtype for d in calls)
    eps = torch.finfo(dtype).eps
    for got, want in zip(params, _reference(theirs, settings, start, steps)):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max().item() <= 8 * eps * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("case", LOW[:4], ids=[f"{c[0].__name__}{c[2]}" for c in LOW[:4]])
def test_a_fused_kernel_that_skips_elements_is_found_and_not_used(monkeypatch, case):
    """A kernel with pytorch#191763's fault (it leaves elements 16 to 63 of each param as
    they were) fails the probe, and the params take the multi-tensor ops, rightly."""
    mine, theirs, settings, kernel = case
    real_kernel = getattr(torch, kernel)

    def faulty(params, *args, **kwargs):
        kept = [p[16:64].clone() for p in params]
        real_kernel(params, *args, **kwargs)
        for p, k in zip(params, kept):
            p[16:64] = k

    monkeypatch.setattr(torch, kernel, faulty)
    monkeypatch.setattr(optim.kernels, "_WORKS", {})
    assert not optim.kernels.fused_works(kernel, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(100, generator=gen), torch.randn(7, 9, generator=gen)]
    steps = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    params = [p.clone() for p in start]
    opt = mine(**settings)
    for grads in steps:
        opt.step(params, grads)
    for got, want in zip(params, _reference(theirs, settings, start, steps)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_the_planned_update_reads_nothing_back_to_the_host(monkeypatch):
    """The step counts, bias corrections and rates stay tensors: running a plan calls no
    .item(), float(), bool() or .tolist() (each a host sync on CUDA), on either path."""
    gen = torch.Generator().manual_seed(5)
    for opt in (gd.Adam(amsgrad=True, weight_decay=0.1), gd.AdamW(), gd.Adagrad(lr_decay=0.1, weight_decay=0.1),
                gd.RMSprop(momentum=0.9, centered=True, weight_decay=0.1), gd.SGD(lr=0.1, momentum=0.9)):
        for fused in (True, False):
            opt.fused = fused
            params = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen).to(torch.float64)]
            grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            opt.reset(params)
            apply = opt.plan(params, grads)
            with monkeypatch.context() as m:
                for name in ("item", "__float__", "__bool__", "tolist", "__int__"):
                    m.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"the update called Tensor.{_n}"))
                opt.set_lr(0.05)
                apply()
                apply()
            assert all(bool(p.isfinite().all()) for p in params)


# -- parameter groups -------------------------------------------------------------------------------


def _torch_params(twin: torch.nn.Sequential) -> dict[str, torch.nn.Parameter]:
    """twin's params under graphdl's names ("0.weight", ...)."""
    return dict(twin.named_parameters())


@pytest.mark.parametrize("mine, theirs, settings, group", [
    (gd.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), {"weight_decay": 0.0}),
    (gd.AdamW, torch.optim.AdamW, dict(lr=0.01), {"lr": 0.03, "betas": (0.5, 0.9)}),
    (gd.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), {"momentum": 0.0, "weight_decay": 0.1}),
    (gd.RMSprop, torch.optim.RMSprop, dict(lr=0.01), {"momentum": 0.5, "centered": True}),
    (gd.Adagrad, torch.optim.Adagrad, dict(lr=0.1), {"lr_decay": 0.2, "weight_decay": 0.1}),
], ids=["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"])
def test_groups_follow_torchs_param_groups(mine, theirs, settings, group):
    """The biases in a group of their own (by name, as a list and as a function), against
    torch.optim with the same two param groups, under a schedule (a group's lr keeps its
    ratio to the optimizer's, as torch's StepLR scales each group's; not for SGD, whose
    velocity carries ηg across a change of rate where torch's carries g)."""
    gen = torch.Generator().manual_seed(6)
    X, Y = torch.rand(20, 3, generator=gen, dtype=torch.float64), torch.rand(20, 2, generator=gen, dtype=torch.float64)
    base = _net(gen, torch.float64)
    biases = ["0.bias", "2.bias", "4.bias"]
    for groups in ([{"params": biases, **group}], lambda name, t: group if name.endswith("bias") else None):
        model, twin = copy.deepcopy(base), _twin(base)
        opt = mine(**settings, groups=groups)
        factor = 1.0 if mine is gd.SGD else 0.5
        model.fit(X, Y, optimizer=opt, schedule=gd.StepDecay(every=1, factor=factor), epochs=3, batch_size=5,
                  shuffle=False, verbose=False)
        named = _torch_params(twin)
        ref = theirs([{"params": [p for n, p in named.items() if n not in biases]},
                      {"params": [named[n] for n in biases], **group}], **settings)
        _torch_fit(twin, ref, X, Y, 3, 5, scheduler=torch.optim.lr_scheduler.StepLR(ref, 1, factor))
        _assert_like_torch(model, twin, rtol=1e-11, atol=1e-12)
        assert opt.config()["groups"] == {n: {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
                                          for n in biases}


def test_a_group_may_name_either_place_of_a_tied_tensor_and_it_has_one_state():
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.rand(12, 4, generator=gen), torch.rand(12, 1, generator=gen)
    model = gd.Sequential(gd.Linear(4, 4, generator=gen), gd.Tanh(), gd.Linear(4, 4, generator=gen), gd.Tanh(),
                          gd.Linear(4, 1, generator=gen))
    model.layers[2].weight = model.layers[0].weight
    twin = _twin(model)
    twin[2].weight = twin[0].weight  # torch's tie: one Parameter in two modules
    opt = gd.Adam(lr=0.01, weight_decay=0.1, groups=[{"params": ["2.weight"], "weight_decay": 0.0}])
    model.fit(X, Y, optimizer=opt, epochs=2, batch_size=4, shuffle=False, verbose=False)
    assert sorted({n.split("/")[1] for n in opt.state_dict()}) == sorted(model.parameters())  # 5, not 6
    assert opt.config()["groups"] == {"0.weight": {"weight_decay": 0.0}}
    tied = twin[0].weight
    ref = torch.optim.Adam([{"params": [p for p in twin.parameters() if p is not tied]},
                            {"params": [tied], "weight_decay": 0.0}], lr=0.01, weight_decay=0.1)
    _torch_fit(twin, ref, X, Y, 2, 4)
    _assert_like_torch(model, twin, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"param 0.weight is in groups\[0\] and in groups\[1\].*tied"):
        gd.Adam(groups=[{"params": ["0.weight"]}, {"params": ["2.weight"], "lr": 0.1}]).reset(
            list(model.parameters().values()), list(model.parameters()), model.ties())


def test_groups_are_checked_before_training_naming_what_is_wrong():
    gen = torch.Generator().manual_seed(8)
    X, Y = torch.rand(6, 3, generator=gen), torch.rand(6, 2, generator=gen)
    model = _net(gen)
    before = {k: v.clone() for k, v in model.parameters().items()}

    def fails(pattern: str, **kwargs) -> None:
        with pytest.raises(ValueError, match=pattern):
            model.fit(X, Y, optimizer=gd.Adam(**kwargs), epochs=1, verbose=False)

    fails(r"groups\[0\] names param '1.bias', which the model does not have; its params are 0.weight, 0.bias, "
          r"2.weight, 2.bias, 4.weight, 4.bias", groups=[{"params": ["1.bias"]}])
    fails(r"groups\(('|\")0.weight('|\"), \.\.\.\)\['eps'\] must be > 0", groups=lambda n, t: {"eps": 0.0})
    fails(r"groups\('0.weight', \.\.\.\) sets 'momentum', which Adam does not have; a group may set lr, betas, eps, "
          "weight_decay, amsgrad", groups=lambda n, t: {"momentum": 0.9})
    fails(r"groups\('0.weight', \.\.\.\) must be a dict of settings or None", groups=lambda n, t: 0.1)
    assert all(torch.equal(v, before[k]) for k, v in model.parameters().items())  # no epoch ran
    for groups, pattern in [
        ("0.bias", "groups must be a list of dicts"),
        ([{"weight_decay": 0.0}], r"groups\[0\] is .* which has no 'params'"),
        ([{"params": []}], r"groups\[0\]\['params'\] must be a param name or a non-empty list"),
        ([{"params": [0]}], r"groups\[0\]\['params'\] must be a param name or a non-empty list"),
        ([{"params": "0.bias", "weight_decay": -1.0}], r"groups\[0\]\['weight_decay'\] must be in \[0.0, inf\]"),
        ([{"params": "0.bias", "betas": (0.9, 1.0)}], r"groups\[0\]\['betas'\]\[1\] must be in \[0.0, 1.0\)"),
        ([{"params": "0.bias", "nesterov": True}], r"groups\[0\] sets 'nesterov', which Adam does not have"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            gd.Adam(groups=groups)
    with pytest.raises(ValueError, match=r"groups\[0\]\['lr'\]=0.1 cannot keep a ratio to the optimizer's lr, "
                                         "which is 0"):
        gd.SGD(lr=0.0, groups=[{"params": "0.bias", "lr": 0.1}])
    with pytest.raises(ValueError, match=r"groups\[0\]\['momentum'\] must be in \[0.0, 1.0\)"):
        gd.SGD(groups=[{"params": "0.bias", "momentum": 1.0}])
    with pytest.raises(ValueError, match=r"nesterov=True needs momentum > 0"):
        gd.SGD(momentum=0.9, nesterov=True, groups=[{"params": "0.bias", "momentum": 0.0}])


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, name", [
    (lambda: gd.Adam(lr=-1e-3), "lr"), (lambda: gd.Adam(lr=math.nan), "lr"), (lambda: gd.Adam(lr="0.1"), "lr"),
    (lambda: gd.Adam(betas=(1.0, 0.999)), r"betas\[0\]"), (lambda: gd.Adam(betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda: gd.Adam(betas=0.9), "betas must be a pair"), (lambda: gd.Adam(betas=(0.9,)), "betas must be a pair"),
    (lambda: gd.Adam(eps=0.0), "eps must be > 0"), (lambda: gd.Adam(eps=-1e-8), "eps"),
    (lambda: gd.Adam(weight_decay=-0.1), "weight_decay"), (lambda: gd.Adam(amsgrad=1), "amsgrad must be True or False"),
    (lambda: gd.AdamW(weight_decay=math.inf), "weight_decay"), (lambda: gd.AdamW(betas=(0.9, 1)), r"betas\[1\]"),
    (lambda: gd.RMSprop(lr=-1), "lr"), (lambda: gd.RMSprop(alpha=1.0), "alpha"),
    (lambda: gd.RMSprop(alpha=-0.1), "alpha"),
    (lambda: gd.RMSprop(eps=0), "eps must be > 0"), (lambda: gd.RMSprop(weight_decay=-1), "weight_decay"),
    (lambda: gd.RMSprop(momentum=-0.5), "momentum"), (lambda: gd.RMSprop(centered="yes"), "centered"),
    (lambda: gd.Adagrad(lr=-1), "lr"), (lambda: gd.Adagrad(lr_decay=-0.1), "lr_decay"),
    (lambda: gd.Adagrad(weight_decay=-1), "weight_decay"),
    (lambda: gd.Adagrad(initial_accumulator_value=-1), "initial_accumulator_value"),
    (lambda: gd.Adagrad(eps=0.0), "eps must be > 0"), (lambda: gd.Adagrad(lr=torch.tensor(0.1)), "lr.*t.item()"),
])
def test_bad_settings_are_value_errors_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_defaults_and_argument_names_are_torchs():
    for mine, theirs in [(gd.Adam, torch.optim.Adam), (gd.AdamW, torch.optim.AdamW), (gd.RMSprop, torch.optim.RMSprop),
                         (gd.Adagrad, torch.optim.Adagrad), (gd.SGD, torch.optim.SGD)]:
        ours = {k: p.default for k, p in inspect.signature(mine).parameters.items() if k != "groups"}
        torchs = inspect.signature(theirs).parameters
        for key, default in ours.items():
            want = torchs[key].default
            assert default == (tuple(want) if isinstance(want, tuple) else want) or (mine is gd.SGD and key == "lr"), \
                (mine.__name__, key)
    assert repr(gd.Adam()) == "Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False)"
    with pytest.raises(ValueError, match=r"optimizer must be a graphdl optimizer such as gd.SGD\(lr=0.01\) or gd.Adam"):
        _net(torch.Generator()).fit(torch.rand(4, 3), torch.rand(4, 2), verbose=False,
                                    optimizer=torch.optim.Adam([torch.zeros(1, requires_grad=True)]))


def test_a_changed_model_keeps_the_state_of_the_params_it_kept():
    """carry: a replaced layer's params start from step 0 and zero moments; the others keep theirs."""
    gen = torch.Generator().manual_seed(9)
    X, Y = torch.rand(8, 3, generator=gen), torch.rand(8, 2, generator=gen)
    model = _net(gen)
    opt = gd.Adam(lr=0.01)
    step = gd.TrainStep(model, gd.MSE(), opt)
    for _ in range(3):
        step(X, Y, 0.01)
    kept = {k: v.clone() for k, v in opt.state_dict().items()}
    model.layers[4] = gd.Linear(5, 2, generator=gen)
    step(X, Y, 0.01)
    now = opt.state_dict()
    assert float(now["step/0.weight"]) == 4 and float(now["step/4.weight"]) == 1
    assert not torch.equal(now["exp_avg/0.weight"], kept["exp_avg/0.weight"])
    # the new layer's moments are one step's from zero: m = (1 - β1) g, v = (1 - β2) g²
    torch.testing.assert_close(now["exp_avg_sq/4.bias"], (now["exp_avg/4.bias"] / 0.1) ** 2 * 0.001)


# -- per-step schedules ---------------------------------------------------------------------------


def _torch_rates(make_scheduler, steps: int, lr: float = 0.1) -> list[float]:
    """The rate torch's scheduler gives each of `steps` optimizer steps (stepped after each)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


LR = torch.optim.lr_scheduler


@pytest.mark.parametrize("mine, theirs, steps", [
    (gd.LinearWarmup(5), lambda o: LR.LinearLR(o, start_factor=1 / 5, total_iters=4), 12),
    (gd.LinearWarmup(1), lambda o: LR.LambdaLR(o, lambda s: 1.0), 3),
    (gd.LinearWarmup(4, then=gd.CosineDecay(steps=10, min_lr=0.001)),
     lambda o: LR.SequentialLR(o, [LR.LinearLR(o, start_factor=1 / 4, total_iters=3),
                                   LR.CosineAnnealingLR(o, T_max=10, eta_min=0.001)], milestones=[4]), 14),
    (gd.LinearWarmup(3, then=gd.PerStep(lambda s, lr: lr * 0.9**s)),
     lambda o: LR.SequentialLR(o, [LR.LinearLR(o, start_factor=1 / 3, total_iters=2), LR.ExponentialLR(o, 0.9)],
                               milestones=[3]), 10),
    (gd.CosineDecay(steps=10, min_lr=0.01), lambda o: LR.CosineAnnealingLR(o, T_max=10, eta_min=0.01), 11),
    (gd.OneCycle(0.5, total_steps=20), lambda o: LR.OneCycleLR(o, 0.5, total_steps=20, cycle_momentum=False), 20),
    (gd.OneCycle(0.5, total_steps=30, pct_start=0.25, anneal_strategy="linear", div_factor=10, final_div_factor=100),
     lambda o: LR.OneCycleLR(o, 0.5, total_steps=30, pct_start=0.25, anneal_strategy="linear", div_factor=10,
                             final_div_factor=100, cycle_momentum=False), 30),
    (gd.OneCycle(0.5, total_steps=25, three_phase=True),
     lambda o: LR.OneCycleLR(o, 0.5, total_steps=25, three_phase=True, cycle_momentum=False), 25),
], ids=["warmup", "warmup-1", "warmup-cosine", "warmup-callable", "cosine-steps", "one-cycle", "one-cycle-linear",
        "one-cycle-three-phase"])
def test_per_step_schedules_give_torchs_rates(mine, theirs, steps):
    assert mine.per == "step"
    assert [mine(s, 0.1) for s in range(steps)] == pytest.approx(_torch_rates(theirs, steps), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("captured", [False, True], ids=["uncaptured", "captured"])
def test_fit_with_a_per_step_schedule_follows_torchs_scheduler(monkeypatch, captured):
    """A warm-up then a cosine decay, set into the update's rate at every step (captured:
    loaded from a device tensor by the graph, CUDA's way, on the CPU stand-in), against
    torch.optim.Adam stepped by SequentialLR after every batch; History["lr"] holds each
    epoch's first rate."""
    if captured:
        from test_step import RecordedGraphs

        from graphdl import step as step_module
        graphs = RecordedGraphs()
        monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    gen = torch.Generator().manual_seed(10)
    X, Y = torch.rand(23, 3, generator=gen), torch.rand(23, 2, generator=gen)
    model = _net(gen)
    twin = _twin(model)
    schedule = gd.LinearWarmup(6, then=gd.CosineDecay(steps=9, min_lr=0.001))
    history = model.fit(X, Y, optimizer=gd.Adam(lr=0.02), schedule=schedule, epochs=3, batch_size=5, shuffle=False,
                        verbose=False)
    opt = torch.optim.Adam(twin.parameters(), lr=0.02)
    scheduler = LR.SequentialLR(opt, [LR.LinearLR(opt, start_factor=1 / 6, total_iters=5),
                                      LR.CosineAnnealingLR(opt, T_max=9, eta_min=0.001)], milestones=[6])
    losses = _torch_fit(twin, opt, X, Y, 3, 5, scheduler, per_step=True)
    assert history["lr"] == pytest.approx([schedule(5 * e, 0.02) for e in range(3)], rel=1e-15)
    assert history["loss"] == pytest.approx(losses, rel=1e-5)
    _assert_like_torch(model, twin, rtol=1e-5, atol=1e-6)
    if captured:
        assert (graphs.captures, graphs.replays) == (1, 3)


def test_per_step_schedules_check_their_settings_and_their_end_before_fit_runs():
    for make, pattern in [
        (lambda: gd.LinearWarmup(0), "steps must be a whole number >= 1"),
        (lambda: gd.LinearWarmup(5, then=gd.StepDecay(2, 0.5)), "then must be a per-step schedule"),
        (lambda: gd.LinearWarmup(5, then=0.1), "then must be a per-step schedule"),
        (lambda: gd.CosineDecay(), "CosineDecay takes epochs=N .* or steps=N"),
        (lambda: gd.CosineDecay(10, steps=10), "CosineDecay takes epochs=N .* or steps=N"),
        (lambda: gd.CosineDecay(steps=0), "steps must be a whole number >= 1"),
        (lambda: gd.OneCycle(-1.0, 10), "max_lr"), (lambda: gd.OneCycle(0.1, 0), "total_steps"),
        (lambda: gd.OneCycle(0.1, 10, pct_start=1.5), "pct_start"),
        (lambda: gd.OneCycle(0.1, 10, anneal_strategy="cosine"), "anneal_strategy must be 'cos' or 'linear'"),
        (lambda: gd.OneCycle(0.1, 10, div_factor=0), "div_factor must be > 0"),
        (lambda: gd.OneCycle(0.1, 10, final_div_factor=-1), "final_div_factor"),
        (lambda: gd.OneCycle(0.1, 10, three_phase=1), "three_phase must be True or False"),
        (lambda: gd.OneCycle(0.1, 3, pct_start=0.3), r"leaves a phase without steps"),
        (lambda: gd.PerStep(0.1), "PerStep takes a function"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            make()
    gen = torch.Generator().manual_seed(11)
    X, Y = torch.rand(20, 3, generator=gen), torch.rand(20, 2, generator=gen)
    model = _net(gen)
    before = {k: v.clone() for k, v in model.parameters().items()}
    with pytest.raises(ValueError, match=r"OneCycle\(total_steps=10\) was asked for the rate of step 12, past its end"):
        model.fit(X, Y, optimizer=gd.Adam(), schedule=gd.OneCycle(0.1, 10), epochs=3, batch_size=5, verbose=False)
    with pytest.raises(ValueError, match=r"schedule .* gave lr=-0.1 for step 1"):
        model.fit(X, Y, schedule=gd.PerStep(lambda s, lr: -0.1), epochs=1, verbose=False)
    assert all(torch.equal(v, before[k]) for k, v in model.parameters().items())  # no epoch ran
    model.fit(X, Y, optimizer=gd.Adam(), schedule=gd.OneCycle(0.1, 12), epochs=3, batch_size=5, verbose=False)
    step = gd.TrainStep(model, gd.MSE(), gd.Adam())
    with pytest.raises(ValueError, match="lr holds 3 rates but the epoch has 4 steps"):
        step.epoch(X, Y, 5, None, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"lr\[1\] must be in \[0.0, inf\]"):
        step.epoch(X, Y, 5, None, [0.1, -0.1, 0.1, 0.1])


# -- gradient control in fit: clipping and accumulation -------------------------------------------


@pytest.mark.parametrize("mine, theirs, settings", [
    (gd.Adam, torch.optim.Adam, dict(lr=0.01)), (gd.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
], ids=["Adam", "SGD"])
@pytest.mark.parametrize("clip", [dict(clip_norm=0.05), dict(clip_norm=100.0), dict(clip_value=0.01),
                                  dict(clip_value=0.02, clip_norm=0.03)],
                         ids=["norm", "norm-unreached", "value", "both"])
def test_clipping_follows_torchs_clip_grad_utils(mine, theirs, settings, clip):
    """fit(clip_norm=, clip_value=) against torch.nn.utils.clip_grad_value_ then
    clip_grad_norm_ (torch's formula: g * min(1, max_norm / (norm + 1e-6))) before each step."""
    gen = torch.Generator().manual_seed(12)
    X, Y = torch.rand(23, 3, generator=gen, dtype=torch.float64), torch.rand(23, 2, generator=gen, dtype=torch.float64)
    model = _net(gen, torch.float64)
    twin = _twin(model)
    history = model.fit(X, Y, optimizer=mine(**settings), epochs=2, batch_size=5, shuffle=False, verbose=False, **clip)
    opt = theirs(twin.parameters(), **settings)
    for _ in range(2):
        for first in range(0, 23, 5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(twin(X[first:first + 5]), Y[first:first + 5]).backward()
            if "clip_value" in clip:
                torch.nn.utils.clip_grad_value_(twin.parameters(), clip["clip_value"])
            if "clip_norm" in clip:
                torch.nn.utils.clip_grad_norm_(twin.parameters(), clip["clip_norm"])
            opt.step()
    _assert_like_torch(model, twin, rtol=1e-11, atol=1e-12)
    assert len(history["loss"]) == 2


def test_the_clipping_reads_nothing_back_to_the_host(monkeypatch):
    from graphdl.step import _clipper

    grads = [torch.randn(4, 3), torch.randn(3)]
    want = [g.clone().requires_grad_() for g in grads]
    for w, g in zip(want, grads):
        w.grad = g.clone()
    torch.nn.utils.clip_grad_value_(want, 0.5)
    torch.nn.utils.clip_grad_norm_(want, 0.7)
    clip = _clipper(grads, 0.7, 0.5)
    with monkeypatch.context() as m:
        for name in ("item", "__float__", "__bool__", "tolist"):
            m.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"the clipping called Tensor.{_n}"))
        clip()
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("optimizer", [lambda: gd.Adam(lr=0.01, weight_decay=0.01),
                                       lambda: gd.SGD(lr=0.1, momentum=0.9), lambda: gd.RMSprop(lr=0.01)],
                         ids=["Adam", "SGD", "RMSprop"])
@pytest.mark.parametrize("k, batch_size", [(4, 5), (2, 5), (3, 1)])
def test_accumulating_k_batches_is_one_batch_k_times_as_large(optimizer, k, batch_size, dtype):
    """For a mean loss: 23 rows in batches of 5 accumulated 4 at a time update as batches
    of 20 do, the last group (one batch of 3) as the last batch of 3; with shuffling (the
    same permutations), clipping (of the group's gradient) and a per-step schedule (which
    counts updates); the epoch's loss is the same mean."""
    gen = torch.Generator().manual_seed(13)
    X, Y = torch.rand(23, 3, generator=gen, dtype=dtype), torch.rand(23, 2, generator=gen, dtype=dtype)
    small = _net(gen, dtype)
    big = copy.deepcopy(small)
    settings = dict(epochs=3, seed=4, verbose=False, clip_norm=0.5, schedule=gd.LinearWarmup(4))
    h_small = small.fit(X, Y, optimizer=optimizer(), batch_size=batch_size, accumulate=k, **settings)
    h_big = big.fit(X, Y, optimizer=optimizer(), batch_size=k * batch_size, **settings)
    tol = _tolerance(dtype)
    for (name, p), q in zip(small.parameters().items(), big.parameters().values()):
        torch.testing.assert_close(p, q, msg=name, **tol)
    assert h_small["loss"] == pytest.approx(h_big["loss"], rel=tol["rtol"])
    assert h_small["lr"] == h_big["lr"]


def test_accumulation_in_a_captured_epoch_trains_as_uncaptured(monkeypatch):
    from test_step import RecordedGraphs

    from graphdl import step as step_module
    gen = torch.Generator().manual_seed(14)
    X, Y = torch.rand(23, 3, generator=gen), torch.rand(23, 2, generator=gen)
    plain = _net(gen)
    captured = copy.deepcopy(plain)
    settings = dict(epochs=3, batch_size=5, accumulate=2, seed=1, verbose=False, clip_value=0.05,
                    schedule=gd.OneCycle(0.05, total_steps=9))
    h_plain = plain.fit(X, Y, optimizer=gd.Adam(), **settings)
    graphs = RecordedGraphs()
    monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    h_captured = captured.fit(X, Y, optimizer=gd.Adam(), **settings)
    assert (graphs.captures, graphs.replays) == (1, 3)
    assert h_captured == h_plain
    for p, q in zip(plain.parameters().values(), captured.parameters().values()):
        assert torch.equal(p, q)


def test_a_diverging_accumulated_fit_names_its_batch_and_keeps_finite_params():
    gen = torch.Generator().manual_seed(15)
    X, Y = torch.rand(24, 3, generator=gen) * 10, torch.rand(24, 2, generator=gen) * 1e3
    model = _net(gen)
    with pytest.raises(gd.DivergedError) as err:
        model.fit(X, Y, optimizer=gd.SGD(lr=1e3), epochs=5, batch_size=4, accumulate=3, shuffle=False, verbose=False)
    assert err.value.batch is not None and err.value.batch % 3 == 1  # a group's first batch meets the loss it made
    assert all(bool(p.isfinite().all()) for p in model.parameters().values())


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(clip_norm=0.0), "clip_norm must be > 0, or None for no clipping"), (dict(clip_norm=-1), "clip_norm"),
    (dict(clip_norm=math.nan), "clip_norm must be a finite number"), (dict(clip_norm="1"), "clip_norm"),
    (dict(clip_value=0), "clip_value must be > 0"), (dict(clip_value=math.inf), "clip_value"),
    (dict(accumulate=0), "accumulate must be a whole number >= 1"), (dict(accumulate=2.0), "accumulate"),
    (dict(accumulate=True), "accumulate"),
])
def test_bad_gradient_control_is_a_value_error_naming_it(kwargs, pattern):
    model = _net(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=pattern):
        model.fit(torch.rand(4, 3), torch.rand(4, 2), verbose=False, **kwargs)
    with pytest.raises(ValueError, match=pattern.split(" ")[0]):
        gd.TrainStep(model, gd.MSE(), gd.SGD(), **kwargs)


# -- CUDA (tools/gpu_checks.sh runs these where there is a GPU) ------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")


@needs_cuda
@pytest.mark.parametrize("case", [c for c in CASES if c[0] is not gd.SGD], ids=CASE_IDS[:-1])
def test_cuda_fit_follows_torch_optim(case):
    """On CUDA (fused Adam/AdamW kernels reading device rates and step counts; Adagrad and
    RMSprop on the multi-tensor ops), the captured fit against torch.optim on the same card."""
    mine, theirs, settings = case
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(23, 3, generator=gen), torch.rand(23, 2, generator=gen)
    model = _net(gen).to("cuda")
    twin = _twin(model)
    model.fit(X.cuda(), Y.cuda(), optimizer=mine(**settings), epochs=3, batch_size=5, shuffle=False, verbose=False)
    _torch_fit(twin, theirs(twin.parameters(), **settings), X.cuda(), Y.cuda(), 3, 5)
    _assert_like_torch(model, twin, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("optimizer", [lambda: gd.Adam(lr=0.01, amsgrad=True), lambda: gd.AdamW(lr=0.01),
                                       lambda: gd.Adagrad(lr=0.05, lr_decay=0.1), lambda: gd.RMSprop(momentum=0.5)],
                         ids=["Adam", "AdamW", "Adagrad", "RMSprop"])
def test_cuda_captured_fit_with_per_step_rates_and_accumulation_matches_uncaptured(monkeypatch, optimizer):
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.rand(203, 3, generator=gen).cuda(), torch.rand(203, 2, generator=gen).cuda()
    start = _net(gen).to("cuda")
    settings = dict(epochs=3, batch_size=10, seed=2, verbose=False, clip_norm=0.5, accumulate=2,
                    schedule=gd.LinearWarmup(5, then=gd.CosineDecay(steps=25)))
    runs = {}
    for captured in (True, False):
        monkeypatch.setenv("GRAPHDL_CUDA_GRAPHS", "1" if captured else "0")
        model = copy.deepcopy(start)
        runs[captured] = model, model.fit(X, Y, optimizer=optimizer(), **settings)
    (a, ha), (b, hb) = runs[True], runs[False]
    assert ha["lr"] == hb["lr"]
    assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)
    for p, q in zip(a.parameters().values(), b.parameters().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- SGD through fit, moved from test_train.py ------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "foreach"])
def test_nesterov_and_weight_decay_follow_torch(fused):
    gen = torch.Generator().manual_seed(4)
    X, Y = torch.rand(20, 2, generator=gen), torch.rand(20, 1, generator=gen)
    model = _helpers_net(gen, gd.ReLU)
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
