"""Models, data and torch twins that the tests of several modules build (train, optim,
losses, layers, model, checkpoint, checks): one definition, so they train the same nets."""

from __future__ import annotations

from collections.abc import Callable

import torch

import graphdl as gd

BIG = 10**400  # a Python int no float can hold


def _net(gen: torch.Generator, act: type = gd.Tanh) -> gd.Sequential:
    return gd.Sequential(gd.Linear(2, 6, generator=gen), act(), gd.Linear(6, 5, generator=gen), act(),
                         gd.Linear(5, 1, generator=gen))


def _torch_twin(model: gd.Sequential) -> torch.nn.Sequential:
    """The same net in torch.nn, with the same weights (torch stores weight as [out, in])."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, gd.Linear):
            lin = torch.nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(layer.weight.T)
                lin.bias.copy_(layer.bias)
            layers.append(lin)
        else:
            layers.append({gd.Tanh: torch.nn.Tanh, gd.ReLU: torch.nn.ReLU, gd.Sigmoid: torch.nn.Sigmoid}[type(layer)]())
    return torch.nn.Sequential(*layers)


def _tied() -> gd.Sequential:
    """A 4-4-4-1 tanh net whose third layer's weight is the first's: one tensor in two places."""
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(4, 4, generator=gen), gd.Tanh(), gd.Linear(4, 4, generator=gen), gd.Tanh(),
                          gd.Linear(4, 1, generator=gen))
    model.layers[2].weight = model.layers[0].weight
    return model


def _classifier(gen: torch.Generator, outputs: int, dtype: torch.dtype) -> gd.Sequential:
    return gd.Sequential(gd.Linear(2, 6, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(6, outputs, generator=gen, dtype=dtype))


def _torch_sgd_losses(twin: torch.nn.Module, criterion: Callable, X: torch.Tensor | tuple[torch.Tensor, ...],
                      Y: torch.Tensor, epochs: int, batch_size: int, lr: float, momentum: float,
                      weight_decay: float = 0.0) -> list[float]:
    """Per-epoch mean batch loss of plain torch training (torch.optim.SGD), batches in
    order; X a tensor, or a tuple of them for a twin of several inputs."""
    inputs = X if isinstance(X, tuple) else (X,)
    opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for s in range(0, len(Y), batch_size):
            opt.zero_grad()
            value = criterion(twin(*(x[s:s + batch_size] for x in inputs)), Y[s:s + batch_size])
            value.backward()
            opt.step()
            total += value.item() * len(Y[s:s + batch_size])
        losses.append(total / len(Y))
    return losses


def _sine() -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.linspace(-3, 3, 40).unsqueeze(1)
    return X, torch.sin(X)


def _model() -> gd.Sequential:
    torch.manual_seed(0)
    return gd.Sequential(gd.Linear(2, 4), gd.Tanh(), gd.Linear(4, 1))


def _data(n: int = 20, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, generator=gen) * scale, torch.rand(n, 1, generator=gen) * scale


class _TwinDropout(torch.nn.Module):
    """torch's side of gd.Dropout: the same mask (graphdl's, a function of the seed and the
    step's key: tests/test_ops.py checks it against splitmix64 itself), the key counted here."""

    def __init__(self, layer: gd.Dropout) -> None:
        super().__init__()
        self.p, self.seed, self.key = layer.p, layer.seed, float(layer.key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        from graphdl.ops.random import dropout_mask_kernel
        mask = dropout_mask_kernel(torch.tensor(self.key, dtype=torch.float64), x.detach(), self.seed, self.p)
        self.key += 1
        return x * mask
