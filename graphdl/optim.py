"""SGD with momentum, Nesterov and weight decay, and learning-rate schedules.

The update is u <- momentum * u + lr * g, w <- w - u, applied to the live param tensors
in place by one fused multi-tensor kernel (torch's `_fused_sgd_`, the kernel behind
`torch.optim.SGD(fused=True)`), or by a few `torch._foreach_*` ops where that kernel is
missing: either way a handful of kernel launches per step whatever the number of params.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .checks import flag, real, whole


def _fused_kernel_works(p: torch.Tensor) -> bool:
    """Whether `torch._fused_sgd_` updates `p` right. On CPU it leaves every full SIMD block
    of a float16 or bfloat16 param untouched (pytorch/pytorch#191763, seen in torch 2.13):
    f16 training then silently stops; those params take the foreach path."""
    return p.device.type == "cuda" or (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64))


class SGD:
    """Stochastic gradient descent.

    Args:
        lr: the learning rate η (>= 0).
        momentum: γ in [0, 1): u <- γu + ηg, w <- w - u.
        nesterov: look ahead: w <- w - (γu + ηg) with the updated u.
        weight_decay: λ >= 0, adds λw to each gradient (L2 regularisation).

    The velocity u is stored as it is, not divided by the rate as torch stores it, so a
    rate that changes (a schedule) needs no rescaling and u stays bounded however far the
    rate decays.
    """

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        self.lr = real("lr", lr, 0.0)
        self.momentum = real("momentum", momentum, 0.0, 1.0, high_open=True)
        self.weight_decay = real("weight_decay", weight_decay, 0.0)
        self.nesterov = flag("nesterov", nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.buffers: list[torch.Tensor] = []  # the velocities u, one per param
        self.fused = hasattr(torch, "_fused_sgd_")  # use torch's fused kernel where it applies
        self._inverse_lr: tuple[float, torch.Tensor | None] = (math.nan, None)  # 1/lr for the fused kernel
        self._rates: dict[tuple, torch.Tensor] = {}  # the plans' rates, by (1/lr?, device, dtype)
        self._rate_lr = math.nan  # the lr the plans' rates hold

    def reset(self, params: list[torch.Tensor]) -> None:
        """Start from zero velocity for these params."""
        self.buffers = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params] \
            if self.momentum else []

    def carry(self, before: list[Hashable], after: list[Hashable], params: list[torch.Tensor]) -> None:
        """Re-align the state with a new list of params: `before` and `after` identify the
        params of the old and new lists (their slots); a param in both keeps its velocity
        if its shape is unchanged (moved to its new dtype and device, as the param was),
        and every other starts from zero."""
        if not self.momentum:
            return
        old = dict(zip(before, self.buffers))
        fresh = []
        for key, p in zip(after, params):
            u = old.get(key)
            fresh.append(u.to(p.device, p.dtype) if u is not None and u.shape == p.shape else
                         torch.zeros_like(p, memory_format=torch.contiguous_format))
        self.buffers = fresh

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float | None = None) -> None:
        """Update `params` in place from `grads` (same order as at `reset`); `grads` are not modified.

        Any memory layout works (transposed, sliced, expanded gradients; transposed or
        sliced params); a param whose elements share memory (an expanded tensor) cannot
        be updated in place and is refused.
        """
        lr = self.lr if lr is None else real("lr", lr, 0.0)
        _check_step(params, grads)
        if self.momentum and len(self.buffers) == len(params):
            for k, (p, u) in enumerate(zip(params, self.buffers)):
                if (p.shape, p.dtype, p.device) != (u.shape, u.dtype, u.device):
                    raise ValueError(f"step: param {k} is {p.dtype}{list(p.shape)} on {p.device} but the velocity "
                                     f"kept for it is {u.dtype}{list(u.shape)} on {u.device}: these are not the params "
                                     "it was made for; call reset(params) to start them from zero velocity")
        self.update(params, grads, lr)

    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
               overwrite_grads: bool = False) -> None:
        """`step` without its checks, for a caller that made the gradients itself (fit).

        With `overwrite_grads` the update may scale the gradients in place, which lets
        contiguous float32 params (on CUDA also float16/bfloat16) take torch's fused kernel
        (~5 µs a step for the disk net against ~30 µs for the separate multi-tensor ops).
        """
        if not params:  # a model with nothing to train (only Standardize, say)
            return
        if self.momentum and len(self.buffers) != len(params):
            self.reset(params)
        with torch.inference_mode():  # params that require grad, or made in inference mode, update too
            if self._fusable(params, grads, overwrite_grads):
                self._fused(params, grads, lr)
            else:
                self._foreach(params, grads, lr)

    def _fusable(self, params: list[torch.Tensor], grads: list[torch.Tensor], overwrite_grads: bool) -> bool:
        """torch's fused kernel walks param, gradient and buffer as flat arrays, so they must
        all be contiguous; with momentum it takes ηg by scaling the gradients in place
        (grad_scale = 1/η, a float32), which is exact enough only below float64."""
        first = params[0]
        if not self.fused or not _fused_kernel_works(first):
            return False
        if self.momentum and (not overwrite_grads or first.dtype == torch.float64):
            return False  # one kernel call takes one dtype and device: a mixed list goes the foreach way
        return all(p.dtype == first.dtype and p.device == first.device and p.is_contiguous() and g.is_contiguous()
                   for p, g in zip(params, grads))

    def _fused(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        fused_sgd = _fused_sgd_for(params)
        if not self.momentum:  # w <- w - η(g + λw): torch's rule exactly
            fused_sgd(params, grads, [], weight_decay=self.weight_decay, momentum=0.0, lr=lr,
                      dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
            return
        # torch's kernel: g <- g / grad_scale + λ'w, b <- γb + g, w <- w - lr'(g + γb if nesterov else b).
        # With grad_scale = 1/η, λ' = ηλ and lr' = 1, b is u and the rule is ours.
        fused_sgd(params, grads, self.buffers, weight_decay=lr * self.weight_decay, momentum=self.momentum,
                  lr=1.0, dampening=0.0, nesterov=self.nesterov, maximize=False, is_first_step=False,
                  grad_scale=self._inverse(lr, params[0].device))

    def _inverse(self, lr: float, device: torch.device) -> torch.Tensor:
        """1/lr as a float32 tensor on `device`, made once per rate (a rate of 0 gives inf, so ηg = 0)."""
        cached_lr, tensor = self._inverse_lr
        if cached_lr != lr or tensor is None or tensor.device != device:
            tensor = torch.tensor(_inverse_of(lr), dtype=torch.float32, device=device)
            self._inverse_lr = (lr, tensor)
        return tensor

    def plan(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
        """A function applying one update to `params` from what `grads` hold when it is
        called, at the rate last given to `set_lr`; it overwrites the gradients.

        For a caller whose gradients land in the same tensors at every step (fit's
        arena, a captured CUDA graph): the layout checks and the kernel choice happen
        here, once (the disk net's update: 4.4 µs a step against 13.3 µs for `update`,
        one CPU thread), and the rate is read from a tensor on the params' device, so a
        CUDA graph can capture the update and replay it at a new rate. Weight decay is added
        to the gradients first (g + λw), then the rule runs as in `update`.
        """
        if self.momentum and len(self.buffers) != len(params):
            self.reset(params)
        params, grads, buffers = list(params), list(grads), self.buffers
        if not params:
            return lambda: None
        device, low = params[0].device, params[0].dtype != torch.float64
        fused = low and self._fusable(params, grads, overwrite_grads=True)
        # The fused kernel reads a float32 rate: 1/η as grad_scale with momentum (see
        # _fused), η as lr without; float64 params take the multi-tensor ops and an exact
        # rate (the multi-tensor ops take a rate of the params' dtype).
        rate = self._rate(fused and bool(self.momentum), device, torch.float32 if fused else params[0].dtype)
        decay, momentum, nesterov = self.weight_decay, self.momentum, self.nesterov
        fused_sgd = _fused_sgd_for(params)

        def apply() -> None:
            if decay and (momentum or not fused):
                torch._foreach_add_(grads, params, alpha=decay)
            if fused and momentum:
                fused_sgd(params, grads, buffers, weight_decay=0.0, momentum=momentum, lr=1.0, dampening=0.0,
                          nesterov=nesterov, maximize=False, is_first_step=False, grad_scale=rate)
            elif fused:
                fused_sgd(params, grads, [], weight_decay=decay, momentum=0.0, lr=rate, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False)
            else:
                torch._foreach_mul_(grads, rate)  # ηg, or η(g + λw)
                if not momentum:
                    torch._foreach_sub_(params, grads)
                    return
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                if nesterov:
                    torch._foreach_add_(params, buffers, alpha=-momentum)
                    torch._foreach_sub_(params, grads)
                else:
                    torch._foreach_sub_(params, buffers)
        return apply

    def set_lr(self, lr: float) -> None:
        """The rate the functions from `plan` apply next (written into their rate tensors
        in place, only when it changes: a kernel launch on CUDA)."""
        if lr != self._rate_lr:
            self._rate_lr = lr
            for (inverse, _, dtype), t in self._rates.items():
                t.fill_(_rounded(_inverse_of(lr) if inverse else lr, dtype))

    def _rate(self, inverse: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (inverse, device, dtype)
        t = self._rates.get(key)
        if t is None:
            value = self.lr if math.isnan(self._rate_lr) else self._rate_lr
            t = self._rates[key] = torch.tensor(_inverse_of(value) if inverse else value, dtype=dtype, device=device)
            self._rate_lr = value
        return t

    def _foreach(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        """The rule with torch's multi-tensor ops, which take any layout."""
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if not self.momentum:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        torch._foreach_mul_(self.buffers, self.momentum)
        torch._foreach_add_(self.buffers, grads, alpha=lr)
        if self.nesterov:
            torch._foreach_add_(params, self.buffers, alpha=-self.momentum)
            torch._foreach_add_(params, grads, alpha=-lr)
        else:
            torch._foreach_sub_(params, self.buffers)

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")


# torch's fused SGD kernel on CPU forks every thread for each tensor, whatever its size:
# with 2 threads the disk net's update took 115 µs (210 µs on a loaded machine) against
# 4 µs on one thread, and 8 µs switching to one thread for the call. Below ATen's own
# grain for parallel work (32768 elements) the update runs on one thread.
_SERIAL_BELOW = 32768


def checked_optimizer(optimizer: Any) -> SGD:
    """`optimizer` if it is a graphdl optimizer; otherwise a ValueError saying what to pass."""
    if not isinstance(optimizer, SGD):
        raise ValueError(f"optimizer must be a graphdl optimizer such as gd.SGD(lr=0.01), got {optimizer!r}")
    return optimizer


def _fused_sgd_for(params: list[torch.Tensor]) -> Callable[..., None]:
    """torch._fused_sgd_, or for a few small CPU params, a call of it on one thread."""
    if params[0].device.type != "cpu" or sum(p.numel() for p in params) >= _SERIAL_BELOW:
        return torch._fused_sgd_

    def on_one_thread(*args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        if threads == 1:
            torch._fused_sgd_(*args, **kwargs)
            return
        torch.set_num_threads(1)
        try:
            torch._fused_sgd_(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return on_one_thread


def _inverse_of(lr: float) -> float:
    """1/lr, the fused kernel's grad_scale; a rate of 0 gives inf, so ηg = 0."""
    return 1.0 / lr if lr else math.inf


def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it: past the dtype's range, inf (fill_ refuses
    to overflow; 1/lr of a rate decayed to 1e-60 is such a value)."""
    return value if value <= torch.finfo(dtype).max else math.inf


def _check_step(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Params and gradients must pair up: same count, shape, dtype and device; each param
    writable in place."""
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise ValueError("step takes a list of params and a list of gradients")
    if len(params) != len(grads):
        raise ValueError(f"step got {len(params)} params but {len(grads)} gradients; give one gradient per param")
    for k, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise ValueError(f"step: param {k} and its gradient must be torch.Tensors, "
                             f"got {type(p).__name__} and {type(g).__name__}")
        if (p.shape, p.dtype, p.device) != (g.shape, g.dtype, g.device):
            raise ValueError(f"step: param {k} is {p.dtype}{list(p.shape)} on {p.device} but its gradient is "
                             f"{g.dtype}{list(g.shape)} on {g.device}; they must match")
        if not p.is_floating_point():
            raise ValueError(f"step: param {k} is {p.dtype}; SGD updates floating-point params only")
        check_updatable(f"step: param {k}", p)


def check_apart(tensors: dict[str, torch.Tensor]) -> None:
    """Params updated in place one by one must not share elements: a view of part of
    another param would be updated twice a step, once through each. (One tensor held in
    two places is one param, and comes here once.)"""
    spans = []
    for name, t in tensors.items():
        if t.numel() and not t.is_meta:
            reach = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # torch's strides are >= 0
            spans.append((t.untyped_storage().data_ptr(), t.data_ptr(), t.data_ptr() + reach * t.itemsize, name, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    for i, (storage, _, end, name, t) in enumerate(spans):
        for storage2, begin2, _, name2, t2 in spans[i + 1:]:
            if storage2 != storage or begin2 >= end:
                break
            if not _share_elements(t, t2):
                continue
            raise ValueError(f"params {name} and {name2} share elements but are not one tensor (they view "
                             f"overlapping parts of one), so training would update those elements twice a step; give "
                             f"{name2} its own memory (.clone()), or tie the two as one tensor "
                             "(layer.weight = other.weight)")


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage have an element in common (exactly, for one dtype)."""
    if a.dtype != b.dtype:
        return True
    size = a.untyped_storage().nbytes() // a.itemsize
    index = torch.arange(size, device="cpu")
    elements = [torch.as_strided(index, t.shape, t.stride(), t.storage_offset()).reshape(-1) for t in (a, b)]
    return bool(torch.isin(elements[0], elements[1]).any())


def check_updatable(what: str, p: torch.Tensor) -> None:
    """A param updated in place needs memory of its own for each element (not an expanded view)."""
    if not p.is_contiguous() and torch._debug_has_internal_overlap(p) == 1:
        raise ValueError(f"{what} (stride {p.stride()}) has elements that share memory, such as an expanded "
                         "tensor, so it cannot be updated in place; give it its own memory with .clone()")


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
    """Cosine annealing from the base rate down to `min_lr` over `epochs` epochs."""

    def __init__(self, epochs: int, min_lr: float = 0.0) -> None:
        self.epochs = whole("epochs", epochs, 1)
        self.min_lr = real("min_lr", min_lr, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        t = min(epoch, self.epochs) / self.epochs
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        return f"CosineDecay(epochs={self.epochs}, min_lr={self.min_lr})"
