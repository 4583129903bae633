"""graphdl.batches: an epoch's batches and their shares of the epoch's mean loss."""

from __future__ import annotations

import pytest
import torch

import graphdl as gd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_a_batch_of_65536_trains_in_low_precision(dtype):
    """65,536 is inf in float16: the batch's weight in the epoch's mean loss made a finite
    epoch look diverged. The epoch loss and the update follow a float64 reference."""
    gen = torch.Generator().manual_seed(0)
    n = 65536 + 8  # a full batch and a partial one
    X = torch.rand(n, 2, generator=gen).to(dtype)
    Y = torch.rand(n, 1, generator=gen).to(dtype)
    model = gd.Sequential(gd.Linear(2, 1, generator=gen, dtype=dtype))
    w, b = (t.double().requires_grad_() for t in model.parameters().values())
    losses = []
    for s in range(0, n, 65536):
        loss = ((X[s:s + 65536].double() @ w + b - Y[s:s + 65536].double()) ** 2).mean()
        gw, gb = torch.autograd.grad(loss, [w, b])
        losses.append(loss.item())
        with torch.no_grad():
            w -= 0.1 * gw
            b -= 0.1 * gb
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=1, batch_size=65536, shuffle=False, verbose=False)
    eps = torch.finfo(dtype).eps
    assert history["loss"] == pytest.approx([(losses[0] * 65536 + losses[1] * 8) / n], rel=4 * eps)
    torch.testing.assert_close(model.layers[0].weight.double(), w.detach(), rtol=4 * eps, atol=4 * eps)
    assert model.layers[0].weight.dtype == dtype


@pytest.mark.parametrize("n, batch", [(103, 16), (100, 25), (7, 16)])
def test_a_large_epoch_is_gathered_batch_by_batch_into_the_same_batches(monkeypatch, n, batch):
    """Past GATHER_WHOLE_BYTES the shuffled rows are gathered as each batch is reached, not
    in one copy: the same batches, in order, contiguous, for one process and for a rank's
    share (data-parallel, here rank 1 of 3)."""
    from graphdl import batches
    from graphdl import distributed as dp
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(n, 3, 2, generator=gen), torch.randint(0, 5, (n, 1), generator=gen)
    order = torch.randperm(n, generator=gen)
    monkeypatch.setattr(dp, "rank", lambda: 1)
    monkeypatch.setattr(dp, "world_size", lambda: 3)
    walks = {}
    for limit in (1 << 40, 0):
        monkeypatch.setattr(batches, "GATHER_WHOLE_BYTES", limit)
        walks[limit] = (list(batches.epoch_batches(X, Y, batch, order)),
                        list(batches.Sharded(n, batch, X, Y.float()).feeds(X, Y, order)))
    (one, shared), (each, shared_each) = walks[1 << 40], walks[0]
    want = [(X[order[i:i + batch]], Y[order[i:i + batch]]) for i in range(0, n, batch)]
    for got in (one, each):
        assert len(got) == len(want)
        for (x, y), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy) and x.is_contiguous() and y.is_contiguous()
    assert len(shared) == len(shared_each) == len(want)
    for a, b in zip(shared, shared_each, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_fit_trains_alike_gathering_whole_or_batch_by_batch(monkeypatch):
    from graphdl import batches
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(90, 3, generator=gen), torch.randn(90, 1, generator=gen)
    runs = []
    for limit in (1 << 40, 0):
        monkeypatch.setattr(batches, "GATHER_WHOLE_BYTES", limit)
        net = gd.Sequential(gd.Linear(3, 8, generator=torch.Generator().manual_seed(2)), gd.Tanh(),
                            gd.Linear(8, 1, generator=torch.Generator().manual_seed(3)), input_shape=(3,))
        h = net.fit(X, Y, loss=gd.MSE(), optimizer=gd.Adam(0.01), epochs=3, batch_size=16, seed=4, verbose=False)
        runs.append((h["loss"], net.parameters()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
