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
