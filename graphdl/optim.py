"""SGD with momentum, Nesterov and weight decay, and learning-rate schedules.

The update is u <- momentum * u + lr * g, w <- w - u, applied to the live param tensors
in place by one fused multi-tensor kernel (torch's `_fused_sgd_`, the kernel behind
`torch.optim.SGD(fused=True)`), or by a few `torch._foreach_*` ops where that kernel is
missing: either way a handful of kernel launches per step whatever the number of params.
"""

from __future__ import annotations

import math

import torch


def _check_number(name: str, value: float, low: float = 0.0, high: float = math.inf,
                  high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (value == high and not high_inclusive):
        bound = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bound}, got {value!r}")
    return float(value)


class SGD:
    """Stochastic gradient descent.

    Args:
        lr: the learning rate η (>= 0).
        momentum: γ in [0, 1): u <- γu + ηg, w <- w - u.
        nesterov: look ahead: w <- w - (γu + ηg) with the updated u.
        weight_decay: λ >= 0, adds λw to each gradient (L2 regularisation).
    """

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        self.lr = _check_number("lr", lr)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = bool(nesterov)
        # The momentum buffers hold u / scale. With scale = lr (whenever lr > 0) they are
        # exactly torch's buffers (b <- γb + g, w <- w - lr*b), so the fused kernel applies
        # our rule; when lr changes, rescaling them keeps u, as the rule requires.
        self.buffers: list[torch.Tensor] = []
        self.scale = 1.0
        self.fused = hasattr(torch, "_fused_sgd_")

    def reset(self, params: list[torch.Tensor]) -> None:
        """Start from zero velocity for these params."""
        self.buffers = [torch.zeros_like(p) for p in params] if self.momentum else []
        self.scale = 1.0

    def set_lr(self, lr: float) -> None:
        """Use `lr` from the next step on, keeping the velocity u as it is."""
        scale = lr if lr > 0 else 1.0
        if scale != self.scale:
            if self.buffers:
                torch._foreach_mul_(self.buffers, self.scale / scale)
            self.scale = scale

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float | None = None) -> None:
        """Update `params` in place from `grads` (same order as at `reset`)."""
        lr = self.lr if lr is None else lr
        if self.momentum and len(self.buffers) != len(params):
            self.reset(params)
        self.set_lr(lr)  # a no-op unless the rate changed
        if self.fused and lr > 0 and params[0].device.type in ("cpu", "cuda"):
            torch._fused_sgd_(params, grads, self.buffers, weight_decay=self.weight_decay, momentum=self.momentum,
                              lr=lr, dampening=0.0, nesterov=self.nesterov, maximize=False, is_first_step=False)
            return
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if not self.momentum:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        # u = scale * b: b <- γb + (lr/scale) g, then w <- w - scale * b (plus γ-lookahead).
        torch._foreach_mul_(self.buffers, self.momentum)
        torch._foreach_add_(self.buffers, grads, alpha=lr / self.scale)
        if self.nesterov:
            torch._foreach_add_(params, self.buffers, alpha=-self.momentum * self.scale)
            torch._foreach_add_(params, grads, alpha=-lr)
        else:
            torch._foreach_add_(params, self.buffers, alpha=-self.scale)

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")


class Schedule:
    """A learning-rate schedule: `schedule(epoch, base_lr)` gives the lr for that epoch (from 0)."""

    def __call__(self, epoch: int, base_lr: float) -> float:
        raise NotImplementedError


class Constant(Schedule):
    """The base learning rate throughout."""

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr


class StepDecay(Schedule):
    """Multiply the learning rate by `factor` every `every` epochs."""

    def __init__(self, every: int, factor: float) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number of epochs >= 1, got {every!r}")
        self.every = every
        self.factor = _check_number("factor", factor, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.factor ** (epoch // self.every)

    def __repr__(self) -> str:
        return f"StepDecay(every={self.every}, factor={self.factor})"


class ExponentialDecay(Schedule):
    """Multiply the learning rate by `rate` every epoch."""

    def __init__(self, rate: float) -> None:
        self.rate = _check_number("rate", rate, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.rate**epoch

    def __repr__(self) -> str:
        return f"ExponentialDecay(rate={self.rate})"


class CosineDecay(Schedule):
    """Cosine annealing from the base rate down to `min_lr` over `epochs` epochs."""

    def __init__(self, epochs: int, min_lr: float = 0.0) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a whole number >= 1, got {epochs!r}")
        self.epochs = epochs
        self.min_lr = _check_number("min_lr", min_lr)

    def __call__(self, epoch: int, base_lr: float) -> float:
        t = min(epoch, self.epochs) / self.epochs
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        return f"CosineDecay(epochs={self.epochs}, min_lr={self.min_lr})"
