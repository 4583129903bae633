"""torch's fused optimizer kernels: which are right for a dtype and device (probed once),
how to call them, and the scalars they take."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def fused_works(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused `kernel` updates params of `dtype` on `device` right. On CUDA
    torch has them all but `_fused_adagrad_`; on the CPU each is tried once per dtype
    (`_probe`): torch 2.13's `_fused_sgd_` leaves every full SIMD block of a float16 or
    bfloat16 param untouched there (pytorch/pytorch#191763), so that f16 training would
    silently stop; such params take the multi-tensor ops."""
    if not hasattr(torch, kernel):
        return False
    if device.type == "cuda":
        return kernel != "_fused_adagrad_"
    if device.type != "cpu":
        return False
    key = (kernel, dtype)
    if key not in _WORKS:
        _WORKS[key] = _probe(kernel, dtype)
    return _WORKS[key]


def _probe(kernel: str, dtype: torch.dtype) -> bool:
    """One step of `kernel` from w = 1 with g = 1 at rate 0.25, after which each rule gives
    w = 0.75, on tensors of 1, 7, 64 and 515 elements (whole SIMD blocks and tails):
    whether every element got there."""
    sizes = (1, 7, 64, 515)

    def ones() -> list[torch.Tensor]:
        return [torch.ones(n, dtype=dtype) for n in sizes]

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros(n, dtype=dtype) for n in sizes]

    def steps() -> list[torch.Tensor]:
        return [torch.ones((), dtype=torch.float32) for _ in sizes]

    runs: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        try:
            fn = getattr(torch, kernel)
            if kernel == "_fused_sgd_":
                for momentum in (0.0, 0.9):  # both of its paths, called as `SGD._part` calls them
                    params = ones()
                    if momentum:
                        fn(params, ones(), zeros(), weight_decay=0.0, momentum=momentum, lr=1.0, dampening=0.0,
                           nesterov=False, maximize=False, is_first_step=False,
                           grad_scale=torch.tensor(4.0, dtype=torch.float32))
                    else:
                        fn(params, ones(), [], weight_decay=0.0, momentum=0.0, lr=torch.tensor(0.25), dampening=0.0,
                           nesterov=False, maximize=False, is_first_step=False)
                    runs.append(params)
            elif kernel == "_fused_adagrad_":
                params = ones()
                fn(params, ones(), zeros(), steps(), lr=torch.tensor(0.25, dtype=torch.float64), lr_decay=0.0,
                   weight_decay=0.0, eps=1e-10, maximize=False)
                runs.append(params)
            else:
                for amsgrad in (False, True):
                    params = ones()
                    fn(params, ones(), zeros(), zeros(), zeros() if amsgrad else [], steps(),
                       lr=torch.tensor(0.25, dtype=torch.float64), beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                       amsgrad=amsgrad, maximize=False)
                    runs.append(params)
        except (RuntimeError, TypeError):
            return False
    return all(bool(((p.double() - 0.75).abs() <= 1e-2).all()) for params in runs for p in params)


# torch's fused kernels on CPU fork every thread for each tensor, whatever its size: with 2
# threads the disk net's SGD update took 115 µs (210 µs on a loaded machine) against 4 µs
# on one thread, and 8 µs switching to one thread for the call (Adam's: 86 µs against 64).
# Below ATen's own grain for parallel work (32768 elements) the update runs on one thread.
_SERIAL_BELOW = 32768


def kernel_for(kernel: str, params: list[torch.Tensor]) -> Callable[..., None]:
    """torch's fused `kernel`, or for a few small CPU params, a call of it on one thread."""
    fn = getattr(torch, kernel)
    if params[0].device.type != "cpu" or sum(p.numel() for p in params) >= _SERIAL_BELOW:
        return fn

    def on_one_thread(*args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        if threads == 1:
            fn(*args, **kwargs)
            return
        torch.set_num_threads(1)
        try:
            fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return on_one_thread


def inverse_of(lr: float) -> float:
    """1/lr, the fused SGD kernel's grad_scale; a rate of 0 gives inf, so ηg = 0."""
    return 1.0 / lr if lr else math.inf


def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it: past the dtype's range, inf (fill_ refuses
    to overflow; 1/lr of a rate decayed to 1e-60 is such a value)."""
    return value if value <= torch.finfo(dtype).max else math.inf


def factor_of(value: float, like: torch.Tensor) -> float | torch.Tensor:
    """A constant factor for `torch._foreach_mul_` on tensors like `like`: for float32 and
    float64 on the CPU a 0-d tensor of their dtype (a Python scalar costs ~1.5 µs a tensor
    there to wrap: 14 µs against 4 for the disk net's 8), else the number (CUDA's scalar
    overload is the fused one; float16 kernels take a number in float32, a tensor in float16)."""
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def adder_of(value: float, tensors: list[torch.Tensor]) -> float | list[torch.Tensor]:
    """A constant to add with `torch._foreach_add_` to `tensors`: on the CPU views of one
    0-d tensor expanded to each one's shape (its scalar and 0-d-tensor overloads take
    ~14 µs for the disk net's 8 tensors, a list 5), on CUDA the number."""
    if tensors[0].device.type != "cpu" or tensors[0].dtype not in (torch.float32, torch.float64):
        return value
    one = torch.tensor(value, dtype=tensors[0].dtype, device=tensors[0].device)
    return [one.expand_as(t) for t in tensors]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the multi-tensor paths' scalars (rates, bias corrections)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
