"""Kernels with several ways to compute the same numbers, each call taking the way
measured fastest for its inputs' shapes.

Which of torch's CPU kernels is fast depends on the shape, the memory layout and the
machine. Max pooling of [32, 16, 8, 8] NCHW activations with a 2x2 window took 200 us
through `aten.max_pool2d_with_indices` and 70 us through the channels-last kernel (the
copies to and from that layout included); at [2, 3, 224, 224] with a 3x3 window the
NCHW kernel won, 1.5 against 2.6 ms (one thread, the development machine's Xeon). So a
`Fastest` holds the ways, and the first time it is called with a signature (each
tensor's shape, strides, dtype and device, and the other arguments) it times each way
on those very inputs, alternately, and keeps the fastest for that signature for the rest
of the process. Every way must return the same numbers, exactly: tests pin that
(tests/test_choice.py), so the choice never changes a result, only its speed.

Only CPU calls are timed; on other devices the first way (torch's own kernel) runs.
The signature includes torch's thread count. `GRAPHDL_KERNELS=default` in the
environment makes every choice made from then on the first way (set it before the
process first computes, to have none other). `chosen()` says what was picked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

ROUNDS = 3  # timed calls of each way after a warm-up call, alternated; the smallest time counts
LONG_S = 0.02  # ways that take this long together are chosen by their first call alone
MAX_SIGNATURES = 4096  # choices a kernel keeps before it starts afresh
_ALL: list[Fastest] = []


class Fastest:
    """A kernel: `Fastest(name, first, other, ...)` with each way a function of the same
    arguments that reads them and returns a new tensor (never writing into an input, as
    each runs on the same inputs while they are timed), `first` torch's own. Calling it
    runs the way chosen for the arguments' signature (about 1 us to look up), choosing
    it on first sight."""

    def __init__(self, name: str, *ways: Callable[..., Any]) -> None:
        if not ways:
            raise ValueError(f"kernel {name} needs at least one way to compute it")
        self.name, self.ways = name, ways
        self._chosen: dict[tuple, Callable[..., Any]] = {}
        _ALL.append(self)

    def __call__(self, *args: Any) -> Any:
        key = (torch.get_num_threads(), *map(_signature, args))  # (a choice on 1 thread may not hold on 2)
        way = self._chosen.get(key)
        if way is None:
            way = self._chosen[key] = self._choose(args)
        return way(*args)

    def _choose(self, args: tuple) -> Callable[..., Any]:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(self.ways) == 1 or os.environ.get("GRAPHDL_KERNELS") == "default" or \
                any(t.device.type != "cpu" for t in tensors):
            return self.ways[0]
        if len(self._chosen) >= MAX_SIGNATURES:  # (a process feeding ever new shapes)
            self._chosen.clear()
        times: list[list[float]] = [[] for _ in self.ways]
        for round_ in range(1 + ROUNDS):  # the first round warms each way up
            for k, way in enumerate(self.ways):
                start = time.perf_counter()
                way(*args)
                times[k].append(time.perf_counter() - start)
            if round_ == 0 and sum(min(t) for t in times) > LONG_S:
                break  # each way long enough that one run tells (and more would cost the first step dearly)
        counted = [t[1:] or t for t in times]
        return self.ways[min(range(len(self.ways)), key=lambda k: min(counted[k]))]

    def chosen(self) -> dict[tuple, str]:
        """Signature -> the name of the way chosen for it."""
        return {key: way.__name__ for key, way in self._chosen.items()}


def chosen() -> dict[str, dict[tuple, str]]:
    """Every kernel's choices so far: {kernel name: {signature: way name}}."""
    return {k.name: k.chosen() for k in _ALL if k._chosen}


def _signature(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.shape, a.stride(), a.dtype, a.device
    return tuple(a) if isinstance(a, list) else a
