"""Memory layout never changes a number: every public entry point gives the same results
for contiguous, transposed, sliced and expanded tensors, as feeds, params and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphdl as gd

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def relayout(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a tensor in `layout`, a contiguous tensor with the same values).

    An expanded tensor repeats one row, so its values are t's first row repeated."""
    if layout == "contiguous":
        out = t.clone()
    elif layout == "transposed":  # the same values, stored column by column
        out = t.mT.contiguous().mT if t.dim() >= 2 else t.flip(0).clone().flip(0)
    elif layout == "sliced":  # every other column of a wider tensor
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype)
        wide[..., 1::2] = t
        out = wide[..., 1::2]
    else:
        out = t[:1].expand_as(t) if t.dim() >= 1 and len(t) else t
    assert layout == "contiguous" or t.numel() <= 1 or not out.is_contiguous() or t.dim() < 2
    return out, out.clone(memory_format=torch.contiguous_format)


def model_with(layouts: list[str], seed: int = 0) -> tuple[gd.Sequential, gd.Sequential]:
    """Two copies of one model: params in the given layouts, and contiguous."""
    torch.manual_seed(seed)
    a = gd.Sequential(gd.Linear(3, 4, dtype=torch.float64), gd.Tanh(), gd.Linear(4, 2, dtype=torch.float64))
    b = gd.Sequential(gd.Linear(3, 4, dtype=torch.float64), gd.Tanh(), gd.Linear(4, 2, dtype=torch.float64))
    for (layer_a, layer_b), names in zip([(a.layers[0], b.layers[0]), (a.layers[2], b.layers[2])],
                                         [("weight", "bias")] * 2):
        for name in names:
            odd, plain = relayout(getattr(layer_a, name), layouts.pop(0))
            setattr(layer_a, name, odd)
            setattr(layer_b, name, plain)
    return a, b


def data(n: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, generator=g, dtype=torch.float64), torch.rand(n, 2, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(params=st.lists(st.sampled_from(LAYOUTS[:3]), min_size=4, max_size=4),
       feeds=st.lists(st.sampled_from(LAYOUTS), min_size=2, max_size=2),
       momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(), shuffle=st.booleans())
def test_fit_gives_the_same_numbers_for_every_layout(params, feeds, momentum, nesterov, shuffle):
    odd, plain = model_with(list(params))
    (X, X0), (Y, Y0) = (relayout(t, layout) for t, layout in zip(data(), feeds))
    settings_ = dict(epochs=3, batch_size=4, shuffle=shuffle, seed=0, verbose=False,
                     schedule=gd.StepDecay(every=1, factor=0.5))
    opt = dict(lr=0.1, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=0.01)
    h_odd = odd.fit(X, Y, optimizer=gd.SGD(**opt), **settings_)
    h_plain = plain.fit(X0, Y0, optimizer=gd.SGD(**opt), **settings_)
    for (name, p), q in zip(odd.parameters().items(), plain.parameters().values()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(h_odd["loss"], h_plain["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(odd.predict(X), plain.predict(X0), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(layouts=st.lists(st.sampled_from(LAYOUTS), min_size=6, max_size=6))
def test_compiled_gradients_are_the_same_for_every_layout(layouts):
    odd, plain = model_with(list(layouts[:4]))
    (X, X0), (Y, Y0) = (relayout(t, layout) for t, layout in zip(data(), layouts[4:]))
    names = list(odd.parameters())
    got = gd.compile(gd.grad(odd.graph(gd.MSE()), names))(x=X, y=Y)
    want = gd.compile(gd.grad(plain.graph(gd.MSE()), names))(x=X0, y=Y0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(params=st.lists(st.sampled_from(LAYOUTS[:3]), min_size=3, max_size=3),
       grads=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]), momentum=st.sampled_from([0.0, 0.5]),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_sgd_updates_the_right_elements_for_every_layout(params, grads, dtype, momentum, weight_decay):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (5, 2)]
    base_p = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    base_g = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    odd_p, plain_p = zip(*(relayout(t, layout) for t, layout in zip(base_p, params)))
    odd_g, plain_g = zip(*(relayout(t, layout) for t, layout in zip(base_g, grads)))
    kept = [t.clone() for t in odd_g]
    a, b = gd.SGD(lr=0.1, momentum=momentum, weight_decay=weight_decay), \
        gd.SGD(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for _ in range(3):
        a.step(list(odd_p), list(odd_g))
        b.step(list(plain_p), list(plain_g))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for p, q in zip(odd_p, plain_p):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    assert all(torch.equal(t, k) for t, k in zip(odd_g, kept)), "step changed the caller's gradients"


def test_an_expanded_param_is_refused_by_training_naming_the_fix():
    model, _ = model_with(["expanded", "contiguous", "contiguous", "contiguous"])
    X, Y = data()
    with pytest.raises(ValueError, match=r"param 0.weight .* share memory.*\.clone\(\)"):
        model.fit(X, Y, verbose=False)
    p = torch.zeros(1, 3).expand(2, 3)
    with pytest.raises(ValueError, match=r"param 0 .* share memory"):
        gd.SGD(lr=0.1).step([p], [torch.ones(2, 3)])


def test_an_expanded_param_still_predicts_like_its_copy():
    odd, plain = model_with(["expanded", "expanded", "contiguous", "contiguous"])
    X, _ = data()
    torch.testing.assert_close(odd.predict(X), plain.predict(X), rtol=0, atol=0)


def test_a_weight_brought_over_transposed_from_torch_trains_like_torch():
    """The issue's example: `lin.weight = torch_linear.weight.T`, then fit, against torch."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = gd.Sequential(gd.Linear(3, 4), gd.Tanh(), gd.Linear(4, 1))
    with torch.no_grad():
        for k in (0, 2):
            model.layers[k].weight = ref[k].weight.detach().clone().T  # a transposed view
            model.layers[k].bias = ref[k].bias.detach().clone()
    assert not model.layers[0].weight.is_contiguous()
    X, Y = torch.rand(8, 3), torch.rand(8, 1)
    model.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=2, batch_size=8, shuffle=False, verbose=False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(X), Y).backward()
        opt.step()
    torch.testing.assert_close(model.layers[0].weight, ref[0].weight.detach().T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.layers[2].bias, ref[2].bias.detach(), rtol=1e-5, atol=1e-6)
