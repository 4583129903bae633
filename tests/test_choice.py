"""graphdl.ops.choice: a kernel with several ways takes the one measured fastest for each
signature, once; every way of graphdl's own kernels gives the same numbers, exactly, so
the choice changes no result."""

from __future__ import annotations

import time

import pytest
import torch

import graphdl as gd
from graphdl.ops import conv
from graphdl.ops.choice import Fastest, chosen


def _ways(calls: list[str]):
    def slow(x):
        calls.append("slow")
        time.sleep(0.002)
        return x + 1

    def fast(x):
        calls.append("fast")
        return x + 1
    return slow, fast


def test_the_fastest_way_is_chosen_once_per_signature():
    calls: list[str] = []
    kernel = Fastest("test: plus one", *_ways(calls))
    x = torch.zeros(3)
    assert torch.equal(kernel(x), x + 1)
    timed = len(calls)
    assert calls.count("slow") == calls.count("fast") - 1 >= 2  # each timed, then the winner ran
    for _ in range(3):
        kernel(x)
    assert calls[timed:] == ["fast"] * 3  # chosen: no more timing for this signature
    assert chosen()["test: plus one"] == {(torch.get_num_threads(), (x.shape, x.stride(), x.dtype, x.device)): "fast"}
    kernel(torch.zeros(4))  # a new shape is a new signature: timed again
    assert len(calls) == timed + 3 + timed


def test_ways_that_take_long_are_chosen_by_one_call_each():
    """On inputs where the ways take 20 ms or more together, one call of each tells: the
    first call of a large pool does not cost four of each."""
    calls: list[str] = []

    def slow(x):
        calls.append("slow")
        time.sleep(0.015)
        return x

    def fast(x):
        calls.append("fast")
        time.sleep(0.008)
        return x
    Fastest("test: long", slow, fast)(torch.zeros(1))
    assert calls == ["slow", "fast", "fast"]


def test_the_choice_can_be_turned_off_and_other_devices_take_the_first_way(monkeypatch):
    calls: list[str] = []
    kernel = Fastest("test: default", *_ways(calls))
    monkeypatch.setenv("GRAPHDL_KERNELS", "default")
    kernel(torch.zeros(2))
    assert calls == ["slow"]
    monkeypatch.delenv("GRAPHDL_KERNELS")
    calls.clear()
    kernel(torch.zeros(2, device="meta"))  # not a CPU tensor: never timed
    assert calls == ["slow"]


def _pool_inputs():
    """Inputs where the ways could disagree: ties (integers, ReLU's zeros), NaN and
    infinities, and layouts other than contiguous NCHW."""
    gen = torch.Generator().manual_seed(0)
    ints = torch.randint(-2, 3, (2, 3, 7, 6), generator=gen).float()
    relu = torch.randn(4, 5, 8, 8, generator=gen).relu()
    special = torch.randn(2, 2, 6, 6, generator=gen)
    special[0, 0, 0, 0] = float("nan")
    special[0, 1, :2, :2] = float("-inf")
    special[1, 0, 3, 3] = float("inf")
    special[1, 1, 4, :] = float("nan")
    yield ints
    yield relu
    yield special
    yield relu.contiguous(memory_format=torch.channels_last)
    yield torch.randn(3, 8, 9, 4, generator=gen).permute(0, 3, 1, 2)  # strided
    yield torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)[:, :, 1:, ::2]


@pytest.mark.parametrize("kernel,stride,padding", [([2, 2], [2, 2], [0, 0]), ([3, 3], [2, 2], [1, 1]),
                                                   ([2, 3], [1, 2], [1, 0]), ([3, 3], [3, 3], [0, 0])])
def test_max_pooling_ways_give_the_same_values_and_indices(kernel, stride, padding):
    for x in _pool_inputs():
        if any(p > k // 2 for p, k in zip(padding, kernel)) or min(x.shape[2:]) < kernel[0]:
            continue
        values = [way(x, kernel, stride, padding) for way in conv.pool_max.ways]
        indices = [way(x, kernel, stride, padding) for way in conv.pool_argmax.ways]
        reference = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding)
        for got in values:
            assert got.is_contiguous() and got.dtype == x.dtype
            torch.testing.assert_close(got, reference[0], rtol=0, atol=0, equal_nan=True)
        for got in indices:
            assert got.is_contiguous() and torch.equal(got, reference[1].contiguous())


def test_a_pooled_cnn_step_is_the_same_whichever_way_pooling_takes(monkeypatch):
    """The training step through either layout: the same loss and gradients, bit for bit."""
    def gradients() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        model = gd.Sequential(gd.Conv2d(2, 4, 3, padding=1, generator=gen), gd.ReLU(), gd.MaxPool2d(2),
                              gd.Flatten(), gd.Linear(4 * 3 * 3, 2, generator=gen), input_shape=(2, 6, 6))
        graph = gd.grad(model.graph(loss=gd.MSE()), list(model.parameters()))
        x, y = torch.randn(5, 2, 6, 6, generator=gen), torch.randn(5, 2, generator=gen)
        return list(gd.compile(graph)(x, y))

    results = []
    for way in range(2):
        for kernel in (conv.pool_max, conv.pool_argmax):
            monkeypatch.setattr(kernel, "_decide", lambda key, args, kwargs, k=kernel, w=way: k.ways[w])
            kernel._chosen.clear()
        results.append(gradients())
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
