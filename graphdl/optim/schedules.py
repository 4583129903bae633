"""Learning-rate schedules, per epoch (StepDecay, ExponentialDecay, CosineDecay) and per
step (LinearWarmup, OneCycle, CosineDecay(steps=), PerStep)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..checks import flag, real, shown, whole
from .base import positive


class Schedule:
    """A learning-rate schedule: `schedule(i, base_lr)` gives the lr of epoch i (from 0),
    or, where `per` is "step", of step i (from 0, counted over the whole fit: epoch e's
    k-th batch is step e * batches_per_epoch + k). fit sets a per-step rate into the
    update's rate tensors at every step, and records each epoch's first in History["lr"]."""

    per = "epoch"

    def __call__(self, epoch: int, base_lr: float) -> float:
        raise NotImplementedError


class Constant(Schedule):
    """The base learning rate throughout."""

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr


class StepDecay(Schedule):
    """Multiply the learning rate by `factor` every `every` epochs."""

    def __init__(self, every: int, factor: float) -> None:
        self.every = whole("every", every, 1)
        self.factor = real("factor", factor, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.factor ** (epoch // self.every)

    def __repr__(self) -> str:
        return f"StepDecay(every={self.every}, factor={self.factor})"


class ExponentialDecay(Schedule):
    """Multiply the learning rate by `rate` every epoch."""

    def __init__(self, rate: float) -> None:
        self.rate = real("rate", rate, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.rate**epoch

    def __repr__(self) -> str:
        return f"ExponentialDecay(rate={self.rate})"


class CosineDecay(Schedule):
    """Cosine annealing from the base rate down to `min_lr` over `epochs` epochs, or with
    `steps=` over that many steps (a per-step schedule), then `min_lr`: torch's
    CosineAnnealingLR(T_max=epochs or steps, eta_min=min_lr) up to T_max."""

    def __init__(self, epochs: int | None = None, min_lr: float = 0.0, *, steps: int | None = None) -> None:
        if (epochs is None) == (steps is None):
            raise ValueError("CosineDecay takes epochs=N (a rate per epoch) or steps=N (a rate per step), "
                             f"one of them; got epochs={shown(epochs)}, steps={shown(steps)}")
        self.epochs = None if epochs is None else whole("epochs", epochs, 1)
        self.steps = None if steps is None else whole("steps", steps, 1)
        self.per = "epoch" if steps is None else "step"
        self.min_lr = real("min_lr", min_lr, 0.0)

    def __call__(self, i: int, base_lr: float) -> float:
        span = self.epochs if self.steps is None else self.steps
        t = min(i, span) / span
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        span = f"epochs={self.epochs}" if self.steps is None else f"steps={self.steps}"
        return f"CosineDecay({span}, min_lr={self.min_lr})"


class PerStep(Schedule):
    """Any function `fn(step, base_lr) -> lr`, called for every step (from 0) instead of
    every epoch: `gd.PerStep(lambda step, lr: lr * 0.999**step)`."""

    per = "step"

    def __init__(self, fn: Callable[[int, float], float]) -> None:
        if not callable(fn):
            raise ValueError(f"PerStep takes a function (step, base_lr) -> lr, got {shown(fn)}")
        self.fn = fn

    def __call__(self, step: int, base_lr: float) -> float:
        return self.fn(step, base_lr)

    def __repr__(self) -> str:
        return f"PerStep({self.fn!r})"


class LinearWarmup(Schedule):
    """A per-step schedule: the rate rises linearly over the first `steps` steps, base_lr *
    (step + 1) / steps, then follows `then` (a per-step schedule, called with the steps
    counted from the warm-up's end) or stays at base_lr. torch's LinearLR(start_factor=
    1/steps, total_iters=steps - 1), followed by `then` as in SequentialLR."""

    per = "step"

    def __init__(self, steps: int, then: Schedule | Callable[[int, float], float] | None = None) -> None:
        self.steps = whole("steps", steps, 1)
        if then is not None and (not callable(then) or getattr(then, "per", "step") != "step"):
            raise ValueError(f"then must be a per-step schedule such as gd.CosineDecay(steps=1000), a function "
                             f"(step, base_lr) -> lr, or None; got {shown(then)}")
        self.then = then

    def __call__(self, step: int, base_lr: float) -> float:
        if step < self.steps:
            return base_lr * (step + 1) / self.steps
        return base_lr if self.then is None else self.then(step - self.steps, base_lr)

    def __repr__(self) -> str:
        return f"LinearWarmup(steps={self.steps}, then={self.then!r})"


class OneCycle(Schedule):
    """torch's OneCycleLR, per step (without its momentum cycling): from max_lr / div_factor
    up to max_lr over the first pct_start of `total_steps`, then down to max_lr /
    div_factor / final_div_factor (three_phase: back to the start first), by cosine or
    linear annealing. It sets the rate itself (the optimizer's lr is not used; a group's
    keeps its ratio). A fit of more than total_steps steps is refused before it starts."""

    per = "step"

    def __init__(self, max_lr: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False) -> None:
        self.max_lr = real("max_lr", max_lr, 0.0)
        self.total_steps = whole("total_steps", total_steps, 1)
        self.pct_start = real("pct_start", pct_start, 0.0, 1.0)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {shown(anneal_strategy)}")
        self.anneal_strategy = anneal_strategy
        self.div_factor = positive("div_factor", div_factor)
        self.final_div_factor = positive("final_div_factor", final_div_factor)
        self.three_phase = flag("three_phase", three_phase)
        initial = self.max_lr / self.div_factor
        least = initial / self.final_div_factor
        up = self.pct_start * self.total_steps - 1
        if three_phase:
            self.phases = [(up, initial, self.max_lr), (2 * up, self.max_lr, initial),
                           (self.total_steps - 1, initial, least)]
        else:
            self.phases = [(up, initial, self.max_lr), (self.total_steps - 1, self.max_lr, least)]
        ends = [0.0] + [end for end, _, _ in self.phases]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"OneCycle(total_steps={self.total_steps}, pct_start={self.pct_start}) leaves a phase "
                             "without steps: pct_start * total_steps must exceed 1 and leave steps after it; "
                             "give more total_steps or another pct_start")

    def __call__(self, step: int, base_lr: float) -> float:
        if step >= self.total_steps:
            raise ValueError(f"OneCycle(total_steps={self.total_steps}) was asked for the rate of step {step + 1}, "
                             f"past its end; give total_steps >= the fit's steps (epochs x batches per epoch)")
        start = 0.0
        for k, (end, first, last) in enumerate(self.phases):
            if step <= end or k == len(self.phases) - 1:
                pct = (step - start) / (end - start)
                if self.anneal_strategy == "linear":
                    return (last - first) * pct + first
                return last + (first - last) / 2.0 * (math.cos(math.pi * pct) + 1)
            start = end
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return (f"OneCycle(max_lr={self.max_lr}, total_steps={self.total_steps}, pct_start={self.pct_start}, "
                f"anneal_strategy={self.anneal_strategy!r}, div_factor={self.div_factor}, "
                f"final_div_factor={self.final_div_factor}, three_phase={self.three_phase})")
