"""Nothing left to chance: the same seed gives bit-identical training, and a saved model
loads back to bit-identical predictions (and keeps training identically)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import graphdl as gd

HAS_IO = importlib.util.find_spec("graphdl.io") is not None
needs_io = pytest.mark.skipif(not HAS_IO, reason="graphdl.io (model save/load) is not on this branch yet")


def disk_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=gen)
    Y = ((X - 0.5).pow(2).sum(1, keepdim=True) < 1 / (2 * torch.pi)).to(torch.float32)
    return X, Y


def model(init_seed: int = 0) -> gd.Sequential:
    torch.manual_seed(init_seed)
    return gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 25), gd.Tanh(), gd.Linear(25, 1), gd.Sigmoid())


def train(m: gd.Sequential, seed: int | None = 0, epochs: int = 3) -> gd.History:
    X, Y = disk_data(200, 1)
    return m.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=0.1, momentum=0.5),
                 schedule=gd.StepDecay(every=2, factor=0.9), epochs=epochs, batch_size=5, shuffle=True,
                 validation_data=disk_data(50, 2), seed=seed, verbose=False)


def same_params(a: gd.Sequential, b: gd.Sequential) -> bool:
    pa, pb = a.parameters(), b.parameters()
    return list(pa) == list(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_the_same_seed_gives_bit_identical_params_and_history():
    a, b = model(), model()
    ha = train(a)
    torch.rand(100)  # fit must not draw from the global RNG when it has a seed
    hb = train(b)
    assert same_params(a, b)
    assert ha == hb


def test_the_seed_is_what_decides_the_shuffling():
    a, b = model(), model()
    train(a, seed=0)
    train(b, seed=1)
    assert not same_params(a, b)


def test_fit_in_two_calls_equals_one_call_given_the_same_shuffles():
    """Each fit call starts its own shuffling from its seed, so this compares shuffle=False runs."""
    X, Y = disk_data(60, 3)
    a, b = model(), model()
    a.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=4, batch_size=6, shuffle=False, verbose=False)
    for _ in range(2):
        b.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=2, batch_size=6, shuffle=False, verbose=False)
    assert same_params(a, b)


def test_compiling_the_same_graph_twice_gives_the_same_code_and_results():
    g = model().graph(gd.MSE())
    gg1, gg2 = gd.grad(g, list(g.params)), gd.grad(g, list(g.params))
    assert str(gg1) == str(gg2)
    f1, f2 = gd.compile(gg1), gd.compile(gg2)
    assert f1.source == f2.source
    X, Y = disk_data(16, 4)
    assert all(torch.equal(a, b) for a, b in zip(f1(x=X, y=Y), f2(x=X, y=Y), strict=True))


@needs_io
def test_save_then_load_gives_bit_identical_predictions(tmp_path):
    m = model()
    train(m)
    path = tmp_path / "disk.gdl"
    m.save(str(path))
    loaded = gd.load(str(path))
    assert same_params(m, loaded)
    X, _ = disk_data(300, 5)
    assert torch.equal(loaded.predict(X), m.predict(X))
    assert str(loaded.graph(gd.MSE())) == str(m.graph(gd.MSE()))


@needs_io
def test_a_loaded_model_keeps_training_exactly_as_the_original(tmp_path):
    m = model()
    train(m, epochs=2)
    path = tmp_path / "disk.gdl"
    m.save(str(path))
    loaded = gd.load(str(path))
    assert train(loaded, seed=7, epochs=2) == train(m, seed=7, epochs=2)
    assert same_params(m, loaded)
