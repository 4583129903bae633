"""Every op, driven by one table: VJP vs float64 central differences and vs
torch.autograd, the shape rule vs the kernel's real output, and the round trip; then the
messages of the shape rules, of `apply` and of Value's operators."""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from messages import message, names

import graphdl as gd

HERE = r"test_ops\.py:\d+"  # "created at" must point at the test's own line


@dataclass
class Case:
    op: str  # the registry name this case exercises
    build: Callable[..., gd.Value]  # graphdl builder over the input values
    ref: Callable[..., torch.Tensor]  # the same computation in plain torch (the oracle)
    shapes: list[tuple[int, ...]]
    domain: str = "any"  # "positive": inputs in (0.5, 2); "away": |x| > 0.1 (kinks)
    differentiable: bool = True
    second_order: bool = True  # False: its VJP emits an op without a VJP of its own
    ints: dict[int, int] = field(default_factory=dict)  # input position -> n: i64 indices in [0, n), graph inputs


def _sum_to_ref(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    lead = x.dim() - len(shape)
    x = x.sum(tuple(range(lead))) if lead else x
    kept = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    return x.sum(kept, keepdim=True) if kept else x


def _conv_backward_ref(which: int, **attrs: object) -> Callable[..., torch.Tensor]:
    """aten's convolution_backward for the input (0) or weight (1) gradient."""
    def ref(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        d = w.dim() - 2
        spread = lambda v: [v] * d if isinstance(v, int) else list(v)  # noqa: E731
        mask = [which == 0, which == 1, False]
        return torch.ops.aten.convolution_backward(
            g, x, w, None, spread(attrs.get("stride", 1)), spread(attrs.get("padding", 0)),
            spread(attrs.get("dilation", 1)), False, [0] * d, attrs.get("groups", 1), mask)[which]
    return ref


def _max_pool_backward_ref(g: torch.Tensor, x: torch.Tensor, **attrs: object) -> torch.Tensor:
    y = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(F.max_pool2d(y, **attrs), y, g, create_graph=True)
    return gx


def _max_pool_select_ref(c: torch.Tensor, x: torch.Tensor, **attrs: object) -> torch.Tensor:
    _, idx = F.max_pool2d(x, **attrs, return_indices=True)
    return c.flatten(2).gather(2, idx.flatten(2)).view_as(idx)


def _splitmix_mask(key: float, shape: tuple[int, ...], seed: int, p: float) -> torch.Tensor:
    """The dropout mask written out with Python's unbounded ints and unsigned wrap-around,
    as splitmix64 is published: an oracle independent of torch's int64 arithmetic."""
    full = 2**64 - 1
    golden = 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & full
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & full
        return z ^ (z >> 31)

    stream = mix((int(key) * golden + seed) & full)
    count = int(np.prod(shape))
    kept = [mix((stream + (i + 1) * golden) & full) & (2**24 - 1) >= round(p * 2**24) for i in range(count)]
    return torch.tensor(kept, dtype=torch.float64).reshape(shape) / (1 - p)


def _batch_norm_ref(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """BatchNorm's formula with the statistics as differentiable inputs (torch's kernel
    takes no gradient for the running statistics); checked against it below."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - m.view(shape)) / torch.sqrt(v.view(shape) + 1e-5) * w.view(shape) + b.view(shape)


def _batch_norm_backward_ref(g: torch.Tensor, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                             w: torch.Tensor) -> torch.Tensor:
    """x's cotangent through training BatchNorm, with the statistics as inputs (checked
    against torch.autograd through F.batch_norm below)."""
    shape, axes = (1, -1) + (1,) * (x.dim() - 2), (0, *range(2, x.dim()))
    r, d, w = (v + 1e-5).rsqrt().view(shape), x - m.view(shape), w.view(shape)
    return w * r * (g - g.mean(axes, keepdim=True)) - w * r**3 * d * (g * d).mean(axes, keepdim=True)


def test_the_batch_norm_backward_oracle_is_torchs_gradient_through_training_batch_norm():
    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 3, 2, 2), (5, 3, 4), (6, 3)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
        w, b = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        (F.batch_norm(x, None, None, w, b, training=True) * g).sum().backward()
        axes = (0, *range(2, x.dim()))
        stats = x.detach().mean(axes), x.detach().var(axes, correction=0)
        torch.testing.assert_close(_batch_norm_backward_ref(g, x.detach(), *stats, w), x.grad)


def test_second_order_through_batch_norm_stays_finite_for_a_constant_channel_in_float16():
    """A constant channel's var is 0, so r = 1 / sqrt(eps) and r**3 is past float16's
    range; the terms it scales are 0 there, and the second-order graph multiplies r in
    one factor at a time, so they stay 0 instead of inf * 0 (torch gives 0 too)."""
    gen = torch.Generator().manual_seed(0)
    X, XP = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    X[:, 0], XP[:, 0] = 0.5, 1.0
    xp = XP.double().requires_grad_()
    h = X.double() * xp
    first = torch.autograd.grad(torch.tanh(F.batch_norm(h, None, None, torch.ones(3, dtype=torch.float64), None,
                                                        training=True)).sum(), xp, create_graph=True)[0]
    want = torch.autograd.grad((first * first).sum(), xp)[0]
    for dtype in (torch.float16, torch.float32):
        g = gd.Graph("t")
        x = g.input("x", (8, 3), dtype)
        h = gd.mul(x, g.param("xp", XP.to(dtype)))
        w, b = g.param("w", torch.ones(3, dtype=dtype)), g.param("b", torch.zeros(3, dtype=dtype))
        g.output(gd.sum(gd.tanh(gd.batch_norm(h, gd.mean(h, axis=0), gd.var(h, axis=0), w, b))))
        step = gd.grad(g, wrt=["xp"])
        total = gd.sum(gd.mul(step.outputs[1], step.outputs[1]))
        step.output(total)
        got = gd.compile(gd.grad(step, wrt=["xp"], of=total))(x=X.to(dtype))[-1]
        assert torch.isfinite(got).all(), dtype
        assert torch.equal(got[:, 0].double(), want[:, 0])  # the constant channel: 0


def test_the_batch_norm_oracle_is_torchs_inference_batch_norm():
    x, m, v, w, b = (torch.rand(s, dtype=torch.float64) + 0.5 for s in [(4, 3, 2, 2), (3,), (3,), (3,), (3,)])
    torch.testing.assert_close(_batch_norm_ref(x, m, v, w, b), F.batch_norm(x, m, v, w, b, training=False))


CONV_CASES = [
    Case("conv1d", lambda x, w, b: gd.conv1d(x, w, b, stride=2, padding=1, dilation=2, groups=2),
         lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1, dilation=2, groups=2), [(2, 4, 9), (6, 2, 3), (6,)]),
    Case("conv1d", gd.conv1d, F.conv1d, [(2, 3, 7), (4, 3, 3)]),
    Case("conv2d", lambda x, w, b: gd.conv2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
         lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
         [(2, 4, 6, 5), (6, 2, 3, 2), (6,)]),
    Case("conv2d", lambda x, w: gd.conv2d(x, w, padding=1), lambda x, w: F.conv2d(x, w, padding=1),
         [(1, 3, 4, 4), (2, 3, 3, 3)]),
    Case("conv_backward_input", lambda g, x, w: gd.ops.conv_backward_input(g, x, w, stride=2, padding=1),
         _conv_backward_ref(0, stride=2, padding=1), [(2, 4, 3, 3), (2, 3, 6, 5), (4, 3, 3, 3)]),
    Case("conv_backward_weight", lambda g, x, w: gd.ops.conv_backward_weight(g, x, w, stride=2, padding=1, groups=3),
         _conv_backward_ref(1, stride=2, padding=1, groups=3), [(2, 6, 3, 3), (2, 3, 6, 5), (6, 1, 3, 3)]),
    Case("conv_backward_input", lambda g, x, w: gd.ops.conv_backward_input(g, x, w, dilation=2),
         _conv_backward_ref(0, dilation=2), [(2, 4, 3), (2, 3, 7), (4, 3, 3)]),
    Case("max_pool2d", lambda x: gd.max_pool2d(x, 3, stride=2, padding=1),
         lambda x: F.max_pool2d(x, 3, stride=2, padding=1), [(2, 3, 6, 5)]),
    Case("max_pool2d", lambda x: gd.max_pool2d(x, (2, 3)), lambda x: F.max_pool2d(x, (2, 3)), [(1, 2, 4, 6)]),
    Case("max_pool2d_backward", lambda g, x: gd.ops.max_pool2d_backward(g, x, 3, stride=2, padding=1),
         lambda g, x: _max_pool_backward_ref(g, x, kernel_size=3, stride=2, padding=1), [(2, 3, 3, 3), (2, 3, 6, 5)]),
    Case("max_pool2d_select", lambda c, x: gd.ops.max_pool2d_select(c, x, 3, stride=2, padding=1),
         lambda c, x: _max_pool_select_ref(c, x, kernel_size=3, stride=2, padding=1), [(2, 3, 6, 5), (2, 3, 6, 5)]),
    Case("avg_pool2d", lambda x: gd.avg_pool2d(x, 3, stride=2, padding=1),
         lambda x: F.avg_pool2d(x, 3, stride=2, padding=1), [(2, 3, 6, 5)]),
    Case("avg_pool2d", lambda x: gd.avg_pool2d(x, 2, padding=1, count_include_pad=False),
         lambda x: F.avg_pool2d(x, 2, padding=1, count_include_pad=False), [(1, 2, 5, 4)]),
    Case("avg_pool2d_backward", lambda g, x: gd.ops.avg_pool2d_backward(g, x, 3, stride=2, padding=1),
         lambda g, x: torch.ops.aten.avg_pool2d_backward(g, x, [3, 3], [2, 2], [1, 1], False, True, None),
         [(2, 3, 3, 3), (2, 3, 6, 5)]),
    Case("rsqrt", gd.rsqrt, torch.rsqrt, [(3, 4)], "positive"),
    Case("var", lambda x: gd.var(x, axis=0), lambda x: x.var(0, correction=0), [(3, 4)]),
    Case("var", lambda x: gd.var(x, axis=(0, 2), keepdims=True, correction=1),
         lambda x: x.var((0, 2), keepdim=True, correction=1), [(3, 2, 4)]),
    Case("correct_var", lambda v, x: gd.ops.correct_var(v, x, axis=(0, 2, 3)),
         lambda v, x: v * (3 * 2 * 2) / (3 * 2 * 2 - 1), [(5,), (3, 5, 2, 2)]),
    Case("correct_var", lambda v, x: gd.ops.correct_var(v, x, axis=1, keepdims=True, correction=2),
         lambda v, x: v * 4 / 2, [(3, 1), (3, 4)]),
    Case("batch_norm", gd.batch_norm,  # inference: the statistics given
         _batch_norm_ref, [(4, 3, 2, 2), (3,), (3,), (3,), (3,)],
         "positive"),
    Case("batch_norm", lambda x, w, b: gd.batch_norm(x, gd.mean(x, axis=(0, 2)), gd.var(x, axis=(0, 2)), w, b),
         lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),  # training: the batch's statistics
         [(4, 3, 5), (3,), (3,)]),
    Case("batch_norm", lambda x, w, b: gd.batch_norm(x, gd.mean(x, axis=(0, 2, 3)), gd.var(x, axis=(0, 2, 3)), w, b),
         lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), [(4, 3, 2, 2), (3,), (3,)]),
    Case("batch_norm_backward", gd.ops.batch_norm_backward, _batch_norm_backward_ref,
         [(4, 3, 2, 2), (4, 3, 2, 2), (3,), (3,), (3,)], "positive"),
    Case("batch_norm_backward", gd.ops.batch_norm_backward, _batch_norm_backward_ref,
         [(5, 3), (5, 3), (3,), (3,), (3,)], "positive"),
    Case("layer_norm", gd.layer_norm, lambda x, w, b: F.layer_norm(x, (4, 5), w, b), [(3, 4, 5), (4, 5), (4, 5)]),
    Case("layer_norm", gd.layer_norm, lambda x, w, b: F.layer_norm(x, (5,), w, b), [(3, 5), (5,), (5,)]),
    Case("dropout_mask", lambda k, x: gd.dropout_mask(k, x, p=0.3, seed=5),
         lambda k, x: _splitmix_mask(k.item(), tuple(x.shape), 5, 0.3), [(), (6, 7)], differentiable=False),
]


CASES = [
    Case("add", gd.add, torch.add, [(3, 4), (3, 4)]),
    Case("add", gd.add, torch.add, [(3, 4), (4,)]),  # bias broadcast: the gradient sums back
    Case("add", gd.add, torch.add, [(3, 1), (1, 4)]),
    Case("sub", gd.sub, torch.sub, [(3, 4), (3, 1)]),
    Case("mul", gd.mul, torch.mul, [(3, 4), (4,)]),
    Case("div", gd.div, torch.div, [(3, 4), (3, 4)], "positive"),
    Case("neg", gd.neg, torch.neg, [(3, 4)]),
    Case("exp", gd.exp, torch.exp, [(3, 4)]),
    Case("log", gd.log, torch.log, [(3, 4)], "positive"),
    Case("abs", gd.abs, torch.abs, [(3, 4)], "away"),
    Case("sign", gd.sign, torch.sign, [(3, 4)], "away", differentiable=False),
    Case("greater", gd.greater, lambda a, b: (a > b).to(a.dtype), [(3, 4), (4,)], "away", differentiable=False),
    Case("relu", gd.relu, torch.relu, [(3, 4)], "away"),
    Case("tanh", gd.tanh, torch.tanh, [(3, 4)]),
    Case("sigmoid", gd.sigmoid, torch.sigmoid, [(3, 4)]),
    Case("softmax", gd.softmax, lambda x: torch.softmax(x, -1), [(3, 4)]),
    Case("softmax", lambda x: gd.softmax(x, axis=0), lambda x: torch.softmax(x, 0), [(3, 4)]),
    Case("log_softmax", gd.log_softmax, lambda x: torch.log_softmax(x, -1), [(3, 4)]),
    Case("log_softmax", lambda x: gd.log_softmax(x, axis=0), lambda x: torch.log_softmax(x, 0), [(3, 4)]),
    Case("bce_with_logits", gd.bce_with_logits, F.binary_cross_entropy_with_logits, [(5, 1), (5, 1)]),
    Case("bce_with_logits", gd.bce_with_logits,  # a target that broadcasts to the logits
         lambda a, b: F.binary_cross_entropy_with_logits(a, b.expand_as(a)), [(3, 4), (4,)]),
    Case("cross_entropy", gd.cross_entropy, F.cross_entropy, [(3, 4), (3, 4)]),
    Case("matmul", gd.matmul, torch.mm, [(3, 4), (4, 5)]),
    Case("transpose", gd.transpose, lambda x: x.transpose(-2, -1), [(3, 4)]),
    Case("sum", gd.sum, torch.sum, [(3, 4)]),
    Case("sum", lambda x: gd.sum(x, axis=1), lambda x: x.sum(1), [(3, 4)]),
    Case("sum", lambda x: gd.sum(x, axis=0, keepdims=True), lambda x: x.sum(0, keepdim=True), [(3, 4)]),
    Case("mean", gd.mean, torch.mean, [(3, 4)]),
    Case("mean", lambda x: gd.mean(x, axis=-1), lambda x: x.mean(-1), [(3, 4)]),
    Case("mean", lambda x: gd.mean(x, axis=0, keepdims=True), lambda x: x.mean(0, keepdim=True), [(3, 4)]),
    Case("mse", gd.mse, lambda a, b: ((a - b) ** 2).mean(), [(5, 1), (5, 1)]),
    Case("mae", gd.mae, lambda a, b: (a - b).abs().mean(), [(5, 1), (5, 1)], "away"),
    Case("mbe", gd.mbe, lambda a, b: (a - b).mean(), [(5, 1), (5, 1)]),
    Case("broadcast_like", lambda g, r: gd.broadcast_like(g, r), lambda g, r: g.expand_as(r), [(4,), (3, 4)]),
    Case("broadcast_like", lambda g, r: gd.broadcast_like(g, r, axis=1, mean=True),
         lambda g, r: (g / 4).unsqueeze(1).expand_as(r), [(3,), (3, 4)]),
    Case("sum_to", lambda x: gd.sum_to(x, (1, 4)), lambda x: _sum_to_ref(x, (1, 4)), [(2, 3, 4)]),
    Case("zeros_like", gd.zeros_like, torch.zeros_like, [(3, 4)], differentiable=False),
    # fused ops (graphdl.passes.fuse makes them; built directly here)
    Case("addmm", gd.ops.addmm, torch.addmm, [(4,), (3, 5), (5, 4)]),
    Case("addmm", gd.ops.addmm, torch.addmm, [(3, 4), (3, 5), (5, 4)]),
    Case("addmm_tanh", gd.ops.addmm_tanh, lambda c, a, b: torch.tanh(torch.addmm(c, a, b)), [(4,), (3, 5), (5, 4)]),
    Case("matmul_tn", gd.ops.matmul_tn, lambda a, b: a.t() @ b, [(5, 3), (5, 4)]),
    Case("matmul_nt", gd.ops.matmul_nt, lambda a, b: a @ b.t(), [(3, 5), (4, 5)]),
    Case("relu_backward", gd.ops.relu_backward, lambda g, y: g * (y > 0).to(g.dtype), [(3, 4), (3, 4)], "away"),
    Case("tanh_backward", gd.ops.tanh_backward, lambda g, y: g * (1 - y * y), [(3, 4), (3, 4)]),
    Case("sigmoid_backward", gd.ops.sigmoid_backward, lambda g, y: g * y * (1 - y), [(3, 4), (3, 4)]),
    Case("mse_backward", gd.ops.mse_backward, lambda g, a, b: g * 2 * (a - b) / a.numel(), [(), (5, 1), (5, 1)]),
    *CONV_CASES,
]


def _unslice_ref(g: torch.Tensor, axis: int, start: int, stop: int, step: int, size: int) -> torch.Tensor:
    shape = list(g.shape)
    shape[axis] = size
    out = g.new_zeros(shape)
    out[(slice(None),) * axis + (slice(start, stop, step),)] = g
    return out


def _index_add_ref(x: torch.Tensor, i: torch.Tensor, src: torch.Tensor, axis: int) -> torch.Tensor:
    flat = src.reshape(*x.shape[:axis], i.numel(), *x.shape[axis + 1:])
    return torch.index_add(x, axis, i.reshape(-1), flat)


def _take(x: torch.Tensor, i: torch.Tensor, axis: int) -> torch.Tensor:
    return x[(slice(None),) * axis + (i,)]


_aten = torch.ops.aten

# The ops beyond two dims, each at ranks 1 to 4.
CASES_BEYOND_2D = [
    Case("reshape", lambda x: gd.reshape(x, (6, -1)), lambda x: x.reshape(6, -1), [(2, 3, 4)]),
    Case("reshape", lambda x: gd.reshape(x, (2, 2, 1, 3)), lambda x: x.reshape(2, 2, 1, 3), [(12,)]),
    Case("reshape", lambda x: gd.reshape(x, (-1,)), lambda x: x.reshape(-1), [(2, 3, 1, 2)]),
    Case("flatten", gd.flatten, lambda x: x.flatten(1), [(2, 3, 4)]),
    Case("flatten", lambda x: gd.flatten(x, 0), lambda x: x.flatten(), [(5,)]),
    Case("flatten", lambda x: gd.flatten(x, 1, 2), lambda x: x.flatten(1, 2), [(2, 3, 2, 2)]),
    Case("flatten", lambda x: gd.flatten(x, -3, -2), lambda x: x.flatten(-3, -2), [(2, 3, 2, 2)]),
    Case("permute", lambda x: gd.permute(x, (1, 0)), lambda x: x.permute(1, 0), [(3, 4)]),
    Case("permute", lambda x: gd.permute(x, (2, 0, 1)), lambda x: x.permute(2, 0, 1), [(2, 3, 4)]),
    Case("permute", lambda x: gd.permute(x, (0, -1, 1, 2)), lambda x: x.permute(0, 3, 1, 2), [(2, 3, 1, 2)]),
    Case("permute", lambda x: gd.permute(x, (0,)), lambda x: x.permute(0), [(4,)]),
    Case("matmul", gd.matmul, torch.matmul, [(2, 3, 4), (4, 5)]),  # a Linear over [N,L,in]
    Case("matmul", gd.matmul, torch.matmul, [(3, 4), (2, 4, 2)]),
    Case("matmul", gd.matmul, torch.matmul, [(2, 1, 3, 4), (3, 4, 2)]),  # batch dims broadcast both ways
    Case("concat", lambda a, b: gd.concat(a, b, axis=1), lambda a, b: torch.cat([a, b], 1), [(2, 3), (2, 1)]),
    Case("concat", gd.concat, lambda *xs: torch.cat(xs), [(4,), (2,), (3,)]),
    Case("concat", lambda a, b: gd.concat(a, b, axis=-3), lambda a, b: torch.cat([a, b], -3),
         [(2, 2, 3, 2), (2, 1, 3, 2)]),
    Case("concat", lambda a: gd.concat(a, axis=1), lambda a: torch.cat([a], 1), [(2, 3, 2)]),
    Case("slice", lambda x: gd.slice(x, 0, 1, 4), lambda x: x[1:4], [(5, 3)]),
    Case("slice", lambda x: gd.slice(x, 0, -4), lambda x: x[-4:], [(6,)]),
    Case("slice", lambda x: gd.slice(x, 1, -6, None, 2), lambda x: x[:, -6::2], [(2, 7, 3)]),
    Case("slice", lambda x: gd.slice(x, axis=2, stop=100, step=3), lambda x: x[:, :, ::3], [(2, 2, 5, 2)]),
    Case("unslice", lambda g: gd.unslice(g, axis=1, start=1, stop=7, step=2, size=7),
         lambda g: _unslice_ref(g, 1, 1, 7, 2, 7), [(2, 3)]),
    Case("unslice", lambda g: gd.unslice(g, start=2, stop=4, size=5), lambda g: _unslice_ref(g, 0, 2, 4, 1, 5), [(2,)]),
    Case("unslice", lambda g: gd.unslice(g, axis=3, start=0, stop=3, size=4),
         lambda g: _unslice_ref(g, 3, 0, 3, 1, 4), [(2, 1, 2, 3)]),
    Case("index_select", gd.index_select, lambda x, i: x.index_select(0, i), [(5, 3), (7,)], ints={1: 5}),
    Case("index_select", gd.index_select, lambda x, i: x[i], [(6,), (2, 3)], ints={1: 6}),
    Case("index_select", lambda x, i: gd.index_select(x, i, axis=1), lambda x, i: _take(x, i, 1),
         [(3, 4), (2, 3)], ints={1: 4}),
    Case("index_select", lambda x, i: gd.index_select(x, i, axis=-2), lambda x, i: _take(x, i, 2),
         [(2, 1, 3, 2), (5,)], ints={1: 3}),
    Case("index_add", gd.index_add, lambda x, i, s: torch.index_add(x, 0, i, s), [(5, 3), (7,), (7, 3)],
         ints={1: 5}),
    Case("index_add", lambda x, i, s: gd.index_add(x, i, s, axis=1), lambda x, i, s: _index_add_ref(x, i, s, 1),
         [(3, 4), (2, 2), (3, 2, 2)], ints={1: 4}),
    Case("gelu", gd.gelu, lambda x: _aten.gelu(x), [(3, 4)]),
    Case("gelu", lambda x: gd.gelu(x, approximate="tanh"), lambda x: _aten.gelu(x, approximate="tanh"), [(2, 3, 4)]),
    Case("gelu", gd.gelu, lambda x: _aten.gelu(x), [(7,)]),
    Case("gelu", lambda x: gd.gelu(x, "tanh"), lambda x: _aten.gelu(x, approximate="tanh"), [(2, 1, 3, 2)]),
    Case("gelu_backward", gd.ops.gelu_backward, _aten.gelu_backward, [(3, 4), (3, 4)]),
    Case("gelu_backward", lambda g, x: gd.ops.gelu_backward(g, x, approximate="tanh"),
         lambda g, x: _aten.gelu_backward(g, x, approximate="tanh"), [(2, 3, 2), (2, 3, 2)]),
    Case("leaky_relu", gd.leaky_relu, lambda x: _aten.leaky_relu(x), [(3, 4)], "away"),
    Case("leaky_relu", lambda x: gd.leaky_relu(x, 0.2), lambda x: _aten.leaky_relu(x, 0.2), [(2, 3, 4)], "away"),
    Case("leaky_relu", lambda x: gd.leaky_relu(x, negative_slope=-1.5), lambda x: _aten.leaky_relu(x, -1.5), [(6,)],
         "away"),
    Case("silu", gd.silu, lambda x: _aten.silu(x), [(3, 4)]),
    Case("silu", gd.silu, lambda x: _aten.silu(x), [(2, 1, 3, 2)]),
    # reductions and broadcasting, which were rank-general already, at ranks 3 and 4
    Case("sum", lambda x: gd.sum(x, axis=(1, 3)), lambda x: x.sum((1, 3)), [(2, 3, 2, 2)]),
    Case("mean", lambda x: gd.mean(x, axis=(0, 2), keepdims=True), lambda x: x.mean((0, 2), keepdim=True),
         [(2, 3, 4)]),
    Case("add", gd.add, torch.add, [(2, 1, 3, 2), (3, 1)]),
    Case("mul", gd.mul, torch.mul, [(2, 3, 1), (1, 3, 4)]),
    Case("softmax", lambda x: gd.softmax(x, axis=1), lambda x: torch.softmax(x, 1), [(2, 3, 2, 2)]),
]
CASES += CASES_BEYOND_2D


def _inputs(case: Case, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, shape in enumerate(case.shapes):
        if k in case.ints:
            out.append(torch.randint(0, case.ints[k], shape, generator=gen))
            continue
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        if case.domain == "positive":
            t = 0.5 + 1.5 * t
        else:
            t = 2 * t - 1
            if case.domain == "away":
                t = torch.where(t.abs() < 0.1, t.sign() * 0.1 + t, t)  # keep off the kink at 0
                t = t + 0.05 * torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) / t.numel()
        out.append(t)
    return out


def _values(case: Case, g: gd.Graph, tensors: list[torch.Tensor]) -> list[gd.Value]:
    """The case's inputs in g: params "a0", "a1", ..., and the integer indices as i64 inputs."""
    return [g.input(f"a{i}", tuple(t.shape), torch.int64) if i in case.ints else g.param(f"a{i}", t)
            for i, t in enumerate(tensors)]


def _feeds(case: Case, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"a{i}": tensors[i] for i in case.ints}


def _wrt(case: Case) -> list[str]:
    """What a case differentiates: every input but the indices."""
    return [f"a{i}" for i in range(len(case.shapes)) if i not in case.ints]


def _graph(case: Case, tensors: list[torch.Tensor]) -> tuple[gd.Graph, torch.Tensor]:
    """loss = sum(op(params) * R) with a fixed random R, so the cotangent is generic."""
    g = gd.Graph("case")
    out = case.build(*_values(case, g, tensors))
    r = torch.rand(tuple(out.shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g.output(gd.sum(gd.mul(out, g.param("r", r))))
    return g, r


def _id(case: Case) -> str:
    return f"{case.op}-{'x'.join('_'.join(map(str, s)) for s in case.shapes)}"


# The collectives need a process group; tests/test_distributed.py runs them.
COLLECTIVES = {"allreduce_start", "allreduce_wait", "unpack"}


def test_every_op_has_a_case():
    assert {c.op for c in CASES} | {"const"} | COLLECTIVES == set(gd.OPS)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_torch_and_shape_rule(case: Case):
    tensors = _inputs(case)
    g = gd.Graph("fwd")
    out = case.build(*_values(case, g, tensors))
    g.output(out)
    g.verify()
    (result,) = gd.compile(g)(**_feeds(case, tensors))
    expected = case.ref(*tensors)
    assert tuple(result.shape) == out.shape == tuple(expected.shape)
    assert result.dtype == out.dtype == torch.float64
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_shape_rule_returns_what_it_normalises_and_edits_no_attrs(case: Case):
    """A rule is given a read-only view of the attrs (editing it raises TypeError) and
    returns the attrs it normalises, which the node keeps."""
    g = gd.Graph("rule")
    node = case.build(*_values(case, g, _inputs(case))).node
    given = {**node.op.attrs, **node.attrs}
    shape, dtype, *normalised = node.op.rule(list(node.inputs), MappingProxyType(given))
    assert (shape, dtype) == (node.out.shape, node.out.dtype)
    assert {**given, **(normalised[0] if normalised else {})} == node.attrs


def test_const_rule_returns_its_value_as_a_float():
    attrs = {"value": 2, "dtype": "f64"}
    assert gd.OPS["const"].rule([], MappingProxyType(attrs)) == ((), torch.float64, {"value": 2.0})
    assert attrs == {"value": 2, "dtype": "f64"}
    assert gd.OPS["const"].infer([], attrs)[2] == {"value": 2.0, "dtype": "f64"}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_vjp_matches_central_differences(case: Case):
    tensors = _inputs(case)
    g, _ = _graph(case, tensors)
    feeds = _feeds(case, tensors)
    grads = gd.compile(gd.grad(g, _wrt(case)))(**feeds)[1:]
    forward = functools.partial(gd.compile(g), **feeds)
    eps = 1e-6
    for t, analytic in zip([t for i, t in enumerate(tensors) if i not in case.ints], grads, strict=True):
        numeric = torch.zeros_like(t)
        flat, nflat = t.view(-1), numeric.view(-1)
        for i in range(flat.numel()):
            saved = flat[i].item()
            flat[i] = saved + eps
            (up,) = forward()
            flat[i] = saved - eps
            (down,) = forward()
            flat[i] = saved
            nflat[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_vjp_matches_torch_autograd(case: Case):
    tensors = _inputs(case, seed=1)
    g, r = _graph(case, tensors)
    grads = gd.compile(gd.grad(g, _wrt(case)))(**_feeds(case, tensors))[1:]
    leaves = [t if i in case.ints else t.clone().requires_grad_() for i, t in enumerate(tensors)]
    floats = [t for i, t in enumerate(leaves) if i not in case.ints]
    loss = (case.ref(*leaves) * r).sum()
    if case.differentiable:
        expected = torch.autograd.grad(loss, floats, allow_unused=True)
        expected = [torch.zeros_like(t) if e is None else e for t, e in zip(floats, expected)]
    else:
        expected = [torch.zeros_like(t) for t in floats]  # no gradient flows through it
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", [c for c in CASES if c.differentiable and c.second_order], ids=_id)
def test_second_order_matches_torch_autograd(case: Case):
    """grad of a gradient graph: d/da sum(dL/da * dL/da), against autograd's double backward."""
    tensors = _inputs(case, seed=2)
    g, r = _graph(case, tensors)
    gg = gd.grad(g, ["a0"])
    da = gg.outputs[1]
    h = gd.sum(gd.mul(da, da))
    gg.output(h)
    got = gd.compile(gd.grad(gg, ["a0"], of=h))(**_feeds(case, tensors))[-1]
    leaves = [t if i in case.ints else t.clone().requires_grad_() for i, t in enumerate(tensors)]
    (first,) = torch.autograd.grad((case.ref(*leaves) * r).sum(), leaves[0], create_graph=True)
    if not first.requires_grad:  # a linear op: its gradient does not depend on a0
        want = None
    else:
        (want,) = torch.autograd.grad((first * first).sum(), leaves[0], allow_unused=True)
    torch.testing.assert_close(got, torch.zeros_like(tensors[0]) if want is None else want)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_round_trip_of_forward_and_gradient_graphs(case: Case):
    g, _ = _graph(case, _inputs(case))
    for graph in (g, gd.grad(g, _wrt(case))):
        text = str(graph)
        again = gd.parse(text)
        again.verify()
        assert str(again) == text


# -- classification ops at the edges of float range ----------------------------------------


def _loss_and_grad(op: Callable, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g = gd.Graph("cls")
    z = g.param("z", logits.clone())
    y = g.input("y", tuple(target.shape), target.dtype)
    g.output(op(z, y))
    return gd.compile(gd.grad(g, ["z"]))(y=target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op, ref, logits, target", [
    (gd.bce_with_logits, F.binary_cross_entropy_with_logits,
     [[1000.0], [-1000.0], [1000.0], [-1000.0], [0.0]], [[1.0], [0.0], [0.0], [1.0], [1.0]]),
    (gd.cross_entropy, F.cross_entropy,
     [[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),
], ids=["bce_with_logits", "cross_entropy"])
def test_classification_losses_stay_finite_and_exact_for_huge_logits(op, ref, logits, target, dtype):
    """Logits of ±1000 (confidently right and confidently wrong): no inf or NaN in the loss
    or its gradient, and both equal PyTorch's (which computes them stably)."""
    z = torch.tensor(logits, dtype=dtype, requires_grad=True)
    y = torch.tensor(target, dtype=dtype)
    loss, dz = _loss_and_grad(op, z.detach(), y)
    want = ref(z, y)
    (want_dz,) = torch.autograd.grad(want, z)
    assert torch.isfinite(loss) and torch.isfinite(dz).all()
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(dz, want_dz)


def test_softmax_of_huge_logits_is_a_probability_row():
    g = gd.Graph("sm")
    z = g.input("z", (None, 3))
    g.output(gd.softmax(z), gd.log_softmax(z))
    p, logp = gd.compile(g)(z=torch.tensor([[1000.0, -1000.0, 0.0], [5.0, 5.0, 5.0]]))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert torch.isfinite(logp).all() and logp[0, 1] == -2000.0


@pytest.mark.parametrize("build, message", [
    (lambda g: gd.cross_entropy(g.input("z", (None, 3)), g.input("y", (None, 1))),
     r"(?s)logits \[N,3\] and target \[N,1\] differ.*hint: give one row of class probabilities per example"),
    (lambda g: gd.cross_entropy(g.input("z", (None,)), g.input("y", (None,))), r"must be 2-d, \[examples, classes\]"),
    (lambda g: gd.softmax(g.input("z", (None, 3)), axis=2), r"axis=2 is not an axis of \[N,3\]"),
    (lambda g: gd.softmax(g.input("z", (None, 3)), axis=True), r"axis=True is not an axis"),
    (lambda g: gd.bce_with_logits(g.input("z", (None, 1)), g.input("y", (None, 2))), r"prediction \[N,1\] and "),
])
def test_classification_op_shape_errors(build, message):
    with pytest.raises(gd.GraphError, match=message):
        build(gd.Graph("g"))


# -- shape rules accept only what the lowering and the VJP can run -----------------------------

SHAPES = [(), (1,), (3,), ("N",), (2, 3), (1, 3), ("N", 3), ("N", 1), (2, 3, 4)]
AXES = [None, 0, -1, 1, -2, 2, -3, 3, (), [], (0,), [0], (0, 1), (1, 0), (-1, 0), (0, 0), True, 1.0, (0, True)]
ATTRS = {
    "sum": [{"axis": a, "keepdims": k} for a in AXES for k in (False, True)],
    "mean": [{"axis": a, "keepdims": k} for a in AXES for k in (False, True)],
    "broadcast_like": [{"axis": a, "mean": m} for a in AXES for m in (False, True)],
    "sum_to": [{"shape": s} for s in [(), (1,), (3,), ("N",), (1, 1), (1, 3), (2, 3), ("N", 3), (3, 4), (1, 3, 4)]],
    "reshape": [{"shape": s} for s in [(), (-1,), (None, -1), ("N",), (None, 3), (3, -1), (-1, 1), (1, -1, 1), (2, -1),
                                       (6,), (0,), (-1, -1), ("M",), (None, 1.5), (3, "N")]],
    "flatten": [{"start_dim": a, "end_dim": b} for a in (0, 1, -1, 2, True) for b in (-1, 0, 1)],
    "permute": [{"dims": d} for d in [(), (0,), (1, 0), (0, 1), (1, 2, 0), (0, 0), (2,), (-1, 0), 0]],
    "concat": [{"axis": a} for a in (0, 1, -1, 2, True)],
    "slice": [{"axis": a, "start": b, "stop": c, "step": d} for a, b, c, d in [
        (0, 0, None, 1), (1, 1, 3, 1), (-1, -2, None, 2), (0, 5, 1, 1), (1, 0, None, 0), (0, None, -1, 1),
        (2, 1, 2, 1), (0, 1.0, None, 1)]],
    "unslice": [{"axis": a, "start": b, "stop": c, "step": d, "size": e} for a, b, c, d, e in [
        (0, 0, 1, 1, 3), (1, 1, 4, 1, 4), (-1, 0, None, 2, 5), (0, 0, None, 1, 1), (0, 0, 1, 1, -1)]],
    "index_select": [{"axis": a} for a in (0, 1, -1, 2)],
    "index_add": [{"axis": a} for a in (0, 1, -1)],
    "gelu": [{"approximate": a} for a in ("none", "tanh", "erf")],
    "gelu_backward": [{"approximate": a} for a in ("none", "tanh", None)],
    "leaky_relu": [{"negative_slope": a} for a in (0.01, -2, True, math.nan)],
}


def _accepted_builds():
    """Every (op, input shapes, attrs) of the grid above that the op's shape rule accepts."""
    for name, op in gd.OPS.items():
        if op.arity == 0 or name in COLLECTIVES:
            continue
        arities = (2, 3) if op.arity == gd.ops.VARIADIC else (op.arity,)  # conv: with and without a bias
        for shapes in (s for arity in arities for s in itertools.product(SHAPES, repeat=arity)):
            if len(shapes) == 3 and len({len(s) for s in shapes[1:]}) > 1 and not op.indices:
                continue  # addmm, mse_backward, the convolutions: keep the grid small
            if len(shapes) > 3 and len(set(shapes[1:])) > 1:
                continue  # batch_norm: its statistics and affine params share one shape
            for attrs in ATTRS.get(name, [{}]):
                g = gd.Graph("rule")
                values = [g.input(f"a{i}", s, torch.int64 if i in op.indices else torch.float64)
                          for i, s in enumerate(shapes)]
                try:
                    out = gd.ops.apply(op, *values, **attrs)
                except gd.GraphError:
                    continue  # refused at build time, as it should be if anything below would fail
                yield g, out, shapes


@pytest.mark.slow
def test_every_build_a_shape_rule_accepts_compiles_differentiates_and_runs():
    """`mean(x, axis=0)` on a 0-d x used to build and then fail in grad + compile with an
    IndexError: a rule must refuse what the lowering or the VJP cannot run."""
    gen = torch.Generator().manual_seed(0)
    n = 5  # the symbolic N, bound at run time
    accepted = 0
    for g, out, shapes in _accepted_builds():
        sizes = [[n if d == "N" else d for d in s] for s in shapes]
        feeds = {f"a{i}": torch.zeros(size, dtype=torch.int64) if i in out.node.op.indices else  # index 0 is in range
                 0.5 + torch.rand(size, generator=gen, dtype=torch.float64) for i, size in enumerate(sizes)}
        g.output(gd.sum(out))
        g.output(out)
        loss, result = gd.compile(g)(**feeds)
        assert tuple(result.shape) == tuple(n if d == "N" else d for d in out.shape), str(g)
        if out.node.op.vjp is not None:
            wrt = [k for k, t in feeds.items() if t.is_floating_point()]
            gg = gd.grad(g, wrt)
            grads = gd.compile(gg)(**feeds)[2:]
            assert [tuple(t.shape) for t in grads] == [tuple(feeds[k].shape) for k in wrt], str(gg)
            assert str(gd.parse(str(gg))) == str(gg)
        accepted += 1
    assert accepted > 500  # the grid exercises the rules, not only their refusals


@pytest.mark.parametrize("expr, op, order", [
    (lambda x, w: x + 2.0, "add", "xc"), (lambda x, w: 2.0 + x, "add", "cx"),
    (lambda x, w: x - 2.0, "sub", "xc"), (lambda x, w: 2.0 - x, "sub", "cx"),
    (lambda x, w: x * 2.0, "mul", "xc"), (lambda x, w: 2.0 * x, "mul", "cx"),
    (lambda x, w: x / 2.0, "div", "xc"), (lambda x, w: 2.0 / x, "div", "cx"),
    (lambda x, w: x @ w, "matmul", "xw"), (lambda x, w: -x, "neg", "x"), (lambda x, w: w.T, "transpose", "w"),
])
def test_value_operators_build_their_op_with_operands_in_order(expr, op, order):
    g = gd.Graph("g")
    x, w = g.input("x", (None, 2)), g.param("w", torch.zeros(2, 2))
    node = expr(x, w).node
    assert node.op.name == op
    assert "".join("c" if v.node is not None else v.name for v in node.inputs) == order
    assert re.search(r"test_ops\.py:\d+", node.where)  # the user's line, not ops.py's


def test_shape_error_names_node_op_shapes_location_and_hint():
    g = gd.Graph("bad")
    x = g.input("x", (None, 25))
    w = g.param("fc1.weight", torch.zeros(30, 25))
    with pytest.raises(gd.GraphError) as err:
        gd.matmul(x, w)
    msg = str(err.value)
    assert "matmul %0" in msg and "[N,25] @ [30,25]" in msg and "inner dims differ (25 vs 30)" in msg
    assert "did you mean to transpose fc1.weight?" in msg
    assert re.search(r"test_ops\.py:\d+", msg)


# -- building: shapes, with node, op, shapes, location and hint -------------------------


def test_matmul_mismatch_names_node_op_shapes_location_and_transpose_hint():
    g = gd.Graph("mlp")
    h = g.input("h", (None, 25))
    w = g.param("fc1.weight", torch.zeros(30, 25))
    msg = message(lambda: gd.matmul(h, w))
    names(msg, r"^matmul %0\(h: f32\[N,25\], fc1.weight: f32\[30,25\]\)", r"\[N,25\] @ \[30,25\]",
          r"inner dims differ \(25 vs 30\)", rf"created at .*{HERE}", r"hint: did you mean to transpose fc1.weight\?")


def test_broadcast_error_names_shapes_and_explains_symbolic_dims():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    b = g.param("b", torch.zeros(4))
    msg = message(lambda: gd.add(x, b))
    names(msg, r"add %0\(x: f32\[N,3\], b: f32\[4\]\)", r"\[N,3\] and \[4\] do not broadcast", HERE,
          "hint: shapes broadcast when", "symbolic dim such as N only matches itself or 1")


def test_loss_shape_error_tells_to_give_the_target_the_predictions_shape():
    g = gd.Graph("g")
    msg = message(lambda: gd.mse(g.input("p", (None, 1)), g.input("y", (None, 3))))
    names(msg, r"mse %0", r"prediction \[N,1\] and target \[N,3\] differ", HERE,
          r"hint: give the target the prediction's shape, \[N,1\]: declare it with shape \(None, 1\)")


def test_a_target_that_would_broadcast_the_prediction_is_refused():
    """pred [N,1] against y [N] broadcasts to [N,N]: a silently wrong loss, not a shape error, in torch."""
    g = gd.Graph("g")
    msg = message(lambda: gd.mse(g.input("p", (None, 1)), g.input("y", ("N",))))
    names(msg, r"^mse %0\(p: f32\[N,1\], y: f32\[N\]\)", r"prediction \[N,1\] and target \[N\] differ",
          r"they broadcast to \[N,N\]", HERE, r"hint: .*\[N,1\].*y\.reshape\(-1, 1\)")


def test_a_scalar_target_still_broadcasts():
    g = gd.Graph("g")
    w = g.param("w", torch.ones(3))
    g.output(gd.mse(w, 0.0))
    assert gd.compile(g)()[0].item() == 1.0


def test_dtype_mismatch_names_both_values():
    g = gd.Graph("g")
    msg = message(gd.matmul, g.input("x", (None, 3)), g.param("w", torch.zeros(3, 3, dtype=torch.float64)))
    names(msg, r"dtypes differ \(x: f32, w: f64\)", "hint: make every input of the op the same dtype")


def test_value_of_another_graph_names_node_both_graphs_and_location():
    g, h = gd.Graph("g"), gd.Graph("h")
    msg = message(lambda: gd.add(g.input("x", (None, 2)), h.input("y", (None, 2))))
    names(msg, r"add %0\(x: f32\[N,2\], y: f32\[N,2\]\)", "y belongs to graph 'h', not 'g'", HERE,
          "hint: build each graph from its own inputs and params")


@pytest.mark.parametrize("bad, kind", [(torch.zeros(2), "Tensor"), (np.zeros(2), "ndarray"), ("x", "str"),
                                       (None, "NoneType"), (True, "bool"), ([1.0], "list")])
def test_op_input_of_the_wrong_type_is_named_with_its_position(bad, kind):
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    msg = message(lambda: gd.add(x, bad))
    names(msg, rf"add %0\(x: f32\[N,2\], {kind}\): input 1 is a {kind}", HERE)
    if kind == "Tensor":
        names(msg, "hint: wrap tensors with Graph.param or Graph.input")


@pytest.mark.parametrize("args", [(1, 2), ("x",), ()])
def test_op_without_any_graph_value_says_where_values_come_from(args):
    msg = message(lambda: (gd.add if len(args) == 2 else gd.relu)(*args))
    names(msg, "at least one input must be a graph value", "Graph.input, Graph.param", HERE)


def test_a_failed_op_leaves_the_graph_as_it_was():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    before = str(g)
    message(gd.matmul, x, 2.0)  # the 2.0 became a const node before the shape rule failed
    assert str(g) == before and g.nodes == []


@pytest.mark.parametrize("axis, expect", [(1.0, "axis must be None, an int or a tuple of ints, got 1.0"),
                                          ("1", "axis must be None, an int or a tuple of ints"),
                                          (5, r"axis 5 is out of range for shape \[N,2\]"),
                                          ((0, 0), "repeats an axis"), ((), r"axis=\(\) names no axis")])
def test_bad_reduction_axes(axis, expect):
    g = gd.Graph("g")
    msg = message(lambda: gd.sum(g.input("x", (None, 2)), axis=axis))
    names(msg, r"^sum %0\(x: f32\[N,2\]\)", expect, HERE)


def test_empty_axis_is_refused_because_torch_would_reduce_everything():
    g = gd.Graph("g")
    msg = message(gd.mean, g.input("x", (3, 4)), axis=[])
    names(msg, "names no axis", "hint: use axis=None to reduce every axis")


@pytest.mark.parametrize("axis", [0, -1, (0,), [0]])
@pytest.mark.parametrize("reduce", [gd.sum, gd.mean])
def test_a_0d_value_has_no_axis_to_reduce(reduce, axis):
    """mean(x, axis=0) on a 0-d x used to build and then fail in grad + compile with an IndexError."""
    g = gd.Graph("g")
    msg = message(lambda: reduce(g.param("w", torch.tensor(2.0)), axis=axis))
    names(msg, rf"^{reduce.__name__} %0\(w: f32\[\]\): axis .* is out of range for shape \[\]",
          "hint: a 0-d value has no axes; use axis=None", HERE)


@pytest.mark.parametrize("g_shape, ref_shape, axis, expect", [
    ((3,), (3,), 0, r"\[3\] is not \[3\] reduced over axes \(0,\)"),
    ((1,), (2, 3), (0, 1), r"\[1\] is not \[2,3\] reduced over axes \(0, 1\)"),
    ((3,), (2, 3), (), r"axis=\(\) names no axis"),
])
def test_broadcast_like_axis_must_describe_a_reduction(g_shape, ref_shape, axis, expect):
    """Its VJP reduces over `axis`: a g that is not such a reduction failed only in grad."""
    g = gd.Graph("g")
    msg = message(gd.broadcast_like, g.input("g", g_shape), g.input("ref", ref_shape), axis=axis)
    names(msg, "^broadcast_like", expect)


def test_numpy_integer_axes_are_axes():
    g = gd.Graph("g")
    out = gd.sum(g.input("x", (3, 4)), axis=np.int64(-1))
    assert out.shape == (3,) and out.node.attrs["axis"] == (1,) and type(out.node.attrs["axis"][0]) is int


def test_keepdims_and_mean_must_be_flags():
    g = gd.Graph("g")
    x = g.input("x", (3, 4))
    names(message(gd.sum, x, axis=1, keepdims="no"), "keepdims='no' must be True or False")
    names(message(gd.broadcast_like, g.input("s", (3,)), x, axis=1, mean=[1]), r"mean=\[1\] must be True or False")


@pytest.mark.parametrize("shape", [5, 1.5, (1.5,), (-1,), ("a b",)])
def test_sum_to_shape_must_be_a_shape(shape):
    g = gd.Graph("g")
    names(message(gd.sum_to, g.input("x", (3, 4)), shape), r"sum_to %0", "must be a tuple of non-negative ints")


def test_unknown_attribute_lists_the_ops_attributes():
    g = gd.Graph("g")
    x = g.input("x", (3,))
    names(message(lambda: gd.relu(x, foo=1)), "unknown attribute", "foo", "hint: relu takes no attributes")


def test_wrong_number_of_inputs():
    g = gd.Graph("g")
    x = g.input("x", (3,))
    names(message(gd.relu, x, x), r"relu %0\(x: f32\[3\], x: f32\[3\]\): takes 1 input\(s\), got 2")


def test_attrs_may_follow_the_inputs_in_the_order_the_op_declares_them():
    g = gd.Graph("g")
    x = g.input("x", (3, 4))
    for built, want in ((gd.mean(x, 1), {"axis": (1,), "keepdims": False}),
                        (gd.sum(x, 0, True), {"axis": (0,), "keepdims": True}),
                        (gd.softmax(x, 0), {"axis": 0}),
                        (gd.sum_to(x, (1, 4)), {"shape": (1, 4)})):
        assert built.node.attrs == want
    names(message(lambda: gd.mean(x, 1, axis=0)), "mean: axis is given twice, by position and by name")
    names(message(gd.relu, x, x), r"takes 1 input\(s\), got 2")  # no attrs to bind: the arity error stands


def test_ops_are_their_builders_and_compare_by_identity():
    for name, op in gd.OPS.items():
        assert op.name == name and op.__name__ == name
    assert gd.sum is gd.OPS["sum"] and gd.abs is gd.OPS["abs"] and gd.mean is gd.OPS["mean"]
    with pytest.raises(AssertionError, match="defined twice"):
        gd.ops.defop("add", "torch.add({0}, {1})", gd.ops.registry.unary, None)


def test_no_module_of_the_ops_package_shadows_a_builtin():
    """gd.sum and gd.abs are bound in graphdl/ops/__init__.py only: inside a family, sum()
    and abs() are Python's, so a VJP rule cannot call the op when it meant the builtin."""
    import ast
    import builtins
    from pathlib import Path

    package = Path(gd.ops.__file__).parent
    for path in sorted(package.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        bound = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        bound |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not bound & set(dir(builtins)), f"{path.name} binds {sorted(bound & set(dir(builtins)))}"


# -- shapes beyond two dims: what a rule refuses, it names with the shapes and the fix ---------------


def _x(g: gd.Graph) -> gd.Value:
    return g.input("x", (None, 4, 5))


@pytest.mark.parametrize("build, expect", [
    (lambda g: gd.reshape(_x(g), (None, 21)),
     [r"^reshape %0\(x: f32\[N,4,5\]\): cannot reshape \[N,4,5\] \(N\*20 elements\) to shape \(None, 21\) "
      r"\(N\*21 elements\)", "hint: the element counts must be equal; a -1 infers one dim"]),
    (lambda g: gd.reshape(_x(g), (-1,)),
     [r"shape \(-1,\) would fold the symbolic dim N of \[N,4,5\] into another dim",
      r"hint: keep N as a dim of its own, e.g. None first for the batch dim: \(None, 20\)"]),
    (lambda g: gd.reshape(_x(g), (None, -1, -1)), [r"has more than one -1", "at most one dim can be inferred"]),
    (lambda g: gd.reshape(_x(g), ("N", 3, -1)),
     [r"cannot reshape \[N,4,5\] to shape \('N', 3, -1\): 20 is not a multiple of 3", r"holds N\*20 elements"]),
    (lambda g: gd.reshape(_x(g), ("M", 20)), [r"names M, which is no dim of \[N,4,5\]"]),
    (lambda g: gd.reshape(_x(g), 20), [r"shape 20 must be a tuple such as \(None, 64\)"]),
    (lambda g: gd.flatten(_x(g), 0),
     [r"flattening dims 0 to 2 of \[N,4,5\] would fold the symbolic dim N", "hint: flatten from the dim after N, "
      "e.g. start_dim=1"]),
    (lambda g: gd.flatten(_x(g), 2, 1), [r"start_dim=2 comes after end_dim=1 in \[N,4,5\]"]),
    (lambda g: gd.flatten(_x(g), 3), [r"start_dim=3 is not an axis of \[N,4,5\]", r"hint: use an int in \[-3, 2\]"]),
    (lambda g: gd.permute(_x(g), (0, 1)),
     [r"dims=\(0, 1\) is not an order of the 3 dims of \[N,4,5\]", r"hint: give each of 0..2 once"]),
    (lambda g: gd.concat(_x(g), g.input("y", (None, 4, 2))),
     [r"^concat %0\(x: f32\[N,4,5\], y: f32\[N,4,2\]\): shapes \[N,4,5\], \[N,4,2\] differ outside axis 0",
      "hint: every input needs the same dims except along axis 0"]),
    (lambda g: gd.concat(_x(g), g.input("y", (None, 4, 5))),
     [r"axis 0 is the symbolic dim N in \[N,4,5\]", "hint: concat along a dim of known size"]),
    (lambda g: gd.slice(_x(g), 0, 0, 2), [r"axis 0 of \[N,4,5\] is the symbolic dim N, whose size is unknown"]),
    (lambda g: gd.slice(_x(g), 1, 0, 2, 0), [r"step=0 must be a whole number >= 1"]),
    (lambda g: gd.split(_x(g), [1, 2], axis=1),
     [r"^split %0\(x: f32\[N,4,5\]\): sizes=\[1, 2\] must be a whole number >= 1, or lengths that add up to 4"]),
    (lambda g: gd.matmul(g.input("a", (2, 5, 4)), g.input("b", (3, 4, 2))),
     [r"\[2,5,4\] @ \[3,4,2\]: the batch dims \[2\] and \[3\] do not broadcast"]),
    (lambda g: gd.matmul(_x(g), g.param("w", torch.zeros(3, 5))),
     [r"\[N,4,5\] @ \[3,5\]: inner dims differ \(5 vs 3\)", r"hint: did you mean to transpose w\?"]),
    (lambda g: gd.matmul(g.input("v", (5,)), g.param("w", torch.zeros(5, 3))),
     [r"matmul takes matrices \(2-d\) or batches of them"]),
    (lambda g: gd.index_select(g.param("w", torch.zeros(3, 5)), g.input("i", (None, 2, 2), torch.int64), axis=2),
     [r"axis=2 is not an axis of \[3,5\]"]),
    (lambda g: gd.index_add(g.param("w", torch.zeros(3, 5)), g.input("i", (4,), torch.int64), g.input("s", (3, 5))),
     [r"src \[3,5\] is not what index_select of \[3,5\] by \[4\] along axis 0 gives, \[4,5\]"]),
    (lambda g: gd.gelu(_x(g), "erf"), [r"approximate='erf' is not a form of GELU", "hint: use 'none'"]),
    (lambda g: gd.leaky_relu(_x(g), negative_slope=math.inf), [r"negative_slope=inf must be a finite number"]),
])
def test_shape_rules_beyond_2d_name_the_shapes_and_the_fix(build, expect):
    msg = message(lambda: build(gd.Graph("g")))
    names(msg, *expect, HERE)


def test_reshape_keeps_the_batch_dim_given_as_none_or_by_name():
    g = gd.Graph("g")
    x = g.input("x", (None, 4, 5))
    for shape in [(None, 20), ("N", 20), (None, -1), ("N", -1, 1)]:
        out = gd.reshape(x, shape)
        assert out.shape[0] == "N" and out.node.attrs["shape"] == out.shape
    assert gd.reshape(x, (5, None, 4)).shape == (5, "N", 4)  # N may move: the elements are read in order
    y = gd.reshape(x, (None, 2, 10))
    g.output(y)
    X = torch.rand(3, 4, 5)
    torch.testing.assert_close(gd.compile(g)(x=X)[0], X.reshape(3, 2, 10))


def test_split_cuts_an_axis_as_torch_split():
    g = gd.Graph("g")
    x = g.input("x", (None, 7))
    parts = gd.split(x, 3, axis=1)
    assert [p.shape for p in parts] == [("N", 3), ("N", 3), ("N", 1)]
    g.output(*parts, *gd.split(x, [2, 5], axis=-1))
    X = torch.rand(2, 7)
    for got, want in zip(gd.compile(g)(x=X), [*X.split(3, 1), *X.split([2, 5], 1)], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rank", [3, 4])
def test_reductions_and_broadcasting_at_rank_3_and_4(rank):
    """sum, mean and a broadcast add over chosen axes of rank-3 and rank-4 values, their gradients against autograd."""
    shape = (2, 3, 4, 5)[:rank]
    gen = torch.Generator().manual_seed(rank)
    X = torch.rand(shape, generator=gen, dtype=torch.float64)
    B = torch.rand((1,) * (rank - 2) + shape[-2:-1] + (1,), generator=gen, dtype=torch.float64)
    g = gd.Graph("r")
    x, b = g.param("x", X.clone()), g.param("b", B.clone())
    h = gd.tanh(x + b)
    loss = gd.sum(gd.mean(h, axis=(1, -1), keepdims=True) * 2.0) + gd.sum(gd.sum(h, axis=0) * gd.sum(h, axis=0))
    g.output(loss)
    got = gd.compile(gd.grad(g, ["x", "b"]))()
    xs, bs = X.clone().requires_grad_(), B.clone().requires_grad_()
    hs = torch.tanh(xs + bs)
    want = (hs.mean((1, -1), keepdim=True) * 2).sum() + (hs.sum(0) * hs.sum(0)).sum()
    torch.testing.assert_close(got[0], want.detach())
    for a, e in zip(got[1:], torch.autograd.grad(want, [xs, bs]), strict=True):
        torch.testing.assert_close(a, e)


def test_integer_indices_move_through_the_shape_ops_and_stay_i64():
    g = gd.Graph("g")
    i = g.input("i", (None, 2, 3), torch.int64)
    moved = gd.concat(gd.slice(gd.permute(i, (0, 2, 1)), 1, 1), gd.reshape(gd.slice(i, 2, 0, 2), (None, 2, 2)), axis=1)
    table = g.param("t", torch.arange(12.0).reshape(6, 2))
    g.output(moved, gd.index_select(table, moved, axis=0))
    assert moved.dtype == torch.int64 and moved.shape == ("N", 4, 2)
    ids = torch.randint(0, 6, (3, 2, 3), generator=torch.Generator().manual_seed(0))
    want = torch.cat([ids.permute(0, 2, 1)[:, 1:], ids[:, :, 0:2].reshape(3, 2, 2)], 1)
    got, rows = gd.compile(g)(i=ids)
    assert torch.equal(got, want) and torch.equal(rows, table.data[want])


# -- convolution, pooling, normalisation and dropout: what is wrong and how to fix it ---------


def _conv_error(x: tuple, w: tuple, **attrs: object) -> str:
    g = gd.Graph("g")
    op = gd.conv1d if len(w) == 3 else gd.conv2d
    return message(lambda: op(g.input("x", x), g.param("w", torch.zeros(w)), **attrs))


@pytest.mark.parametrize("x, w, attrs, parts", [
    ((None, 1, 2, 2), (4, 1, 3, 3), {},
     [r"the kernel \[3,3\] spans 3 along H \(dim 2\) but the input is only 2 there, 2 padded",
      "hint: use a smaller kernel, padding of at least 1 along H, or a larger input"]),
    ((None, 1, 9, 4), (4, 1, 3, 3), {"dilation": (1, 2)},
     [r"dilated by \(1, 2\) spans 5 along W \(dim 3\) but the input is only 4 there", "padding of at least 1"]),
    ((None, 1, 8, 8), (4, 1, 3, 3), {"stride": (1, 0)},
     [r"stride=\(1, 0\): a zero stride would never move the window", "hint: use stride=1 or more"]),
    ((None, 3, 8, 8), (4, 2, 3, 3), {},
     [r"x has 3 channels but the weight \[4,2,3,3\] takes 2",
      "hint: make the layer's in_channels 3, or make the layer before it give 2 channels"]),
    ((None, 4, 8, 8), (6, 1, 3, 3), {"groups": 2},
     [r"takes 2 \(1 per group x 2 groups\)"]),
    ((None, 4, 8, 8), (6, 2, 3, 3), {"groups": 3},
     ["groups=3 does not divide x's 4 channels", "hint: groups must divide both in_channels and out_channels"]),
    ((None, 64), (4, 1, 3, 3), {},
     [r"x \[N,64\] must be 4-d, \[N, C, H, W\]",
      r"hint: conv2d reads channels-first values .* gd.Reshape\(\(C, H, W\)\)"]),
    ((None, 2, 8), (4, 2, 3, 3), {}, [r"x \[N,2,8\] must be 4-d"]),
    ((None, 2, 8), (4, 2, 3), {"padding": -1}, [r"padding=-1: each must be >= 0"]),
    ((None, 2, 8), (4, 2, 3), {"stride": (1, 1)}, [r"stride=\(1, 1\) must be an int or 1 int, one per spatial dim"]),
    ((None, "C", 8), (4, 2, 3), {}, [r"x \[N,C,8\] has a symbolic C \(dim 1\)"]),
])
def test_conv_shape_errors_say_what_is_wrong_and_how_to_fix_it(x, w, attrs, parts):
    msg = _conv_error(x, w, **attrs)
    names(msg, rf"^conv{len(w) - 2}d %0\(x: ", *parts, HERE)


def test_a_conv_bias_must_have_one_entry_per_out_channel():
    g = gd.Graph("g")
    msg = message(gd.conv2d, g.input("x", (None, 1, 4, 4)), g.param("w", torch.zeros(3, 1, 2, 2)),
                  g.param("b", torch.zeros(2)))
    names(msg, r"bias \[2\] must be \[3\], one per out_channel")


@pytest.mark.parametrize("attrs, parts", [
    ({"kernel_size": 5}, [r"the pooling window 5 spans 5 along H \(dim 2\) but the input is only 4 there"]),
    ({"kernel_size": 2, "padding": 2},
     [r"padding=2 is more than half the kernel size 2", "hint: use padding of at most 1"]),
    ({"kernel_size": 2, "stride": 0}, [r"stride=0: a zero stride would never move the window"]),
    ({"kernel_size": 0}, [r"kernel_size=0: each must be >= 1"]),
])
@pytest.mark.parametrize("pool", [gd.max_pool2d, gd.avg_pool2d])
def test_pool_shape_errors(pool, attrs, parts):
    g = gd.Graph("g")
    names(message(lambda: pool(g.input("x", (None, 3, 4, 6)), **attrs)), rf"^{pool.name} %0", *parts, HERE)


def test_normalisation_shape_errors():
    g = gd.Graph("g")
    x = g.input("x", (None, 3, 4, 4))
    c, d = g.param("c", torch.ones(3)), g.param("d", torch.ones(4))
    names(message(gd.batch_norm, x, c, d, c, c), r"var \[4\] must be \[3\], one per channel of x \[N,3,4,4\]")
    names(message(gd.batch_norm, x, c, c, d, c), r"weight \[4\] must be \[3\]", "hint: make the layer's num_features 3")
    names(message(gd.batch_norm, x, c, c, c, c, eps=0.0), "eps=0.0 must be a finite number > 0")
    names(message(gd.layer_norm, x, c, c), r"x \[N,3,4,4\] does not end in the normalised shape \[3\]",
          "hint: make the layer's normalized_shape the last dims of its input")
    names(message(gd.var, x, axis=1, correction=-1), "correction=-1 must be a whole number >= 0")


@pytest.mark.filterwarnings(r"ignore:var\(\)")  # (the oracle's, at n <= correction)
def test_the_variances_hold_their_range_in_float16_and_divide_as_torch_var():
    """Half dtypes: var's VJP divides the cotangent by n before doubling it, correct_var
    scales by n / (n - correction) (not v * n, then / (n - c)), and var sums the squares in
    float32, as torch.var does; n <= correction divides by zero, as torch.var does."""
    from graphdl.ops.normalization import variance
    g = gd.Graph("g")
    x = g.input("x", (8,), torch.float16)
    g.output(gd.mul(gd.var(x), g.param("w", torch.tensor(40000.0, dtype=torch.float16))))
    X = torch.linspace(-1, 1, 8, dtype=torch.float16)
    got = gd.compile(gd.grad(g, wrt=["x"]))(x=X)[1]
    want = 40000.0 * 2 * (X.double() - X.double().mean()) / 8
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0)
    g = gd.Graph("g")
    x, v = g.input("x", (8192, 4), torch.float16), g.input("v", (4,), torch.float16)
    g.output(gd.ops.correct_var(v, x, axis=0))
    V = torch.tensor([1.0, 8.0, 9.0, 100.0], dtype=torch.float16)
    (got,) = gd.compile(g)(x=torch.zeros(8192, 4, dtype=torch.float16), v=V)
    torch.testing.assert_close(got, (V.double() * 8192 / 8191).half())
    spread = torch.tensor([-300.0, 0, 0, 0, 0, 0, 0, 300.0], dtype=torch.float16)  # 300 ** 2 is past 65504
    torch.testing.assert_close(variance(spread, (0,), 0, False), spread.var(0, correction=0))
    wide = torch.randn(70000, 2, generator=torch.Generator().manual_seed(0)).half()
    torch.testing.assert_close(variance(wide, (0,), 0, False), wide.float().var(0, correction=0).half())
    few = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(variance(few, (0,), 3, False), few.var(0, correction=3))  # inf, as torch's
    g = gd.Graph("g")
    x = g.input("x", (2, 3), torch.float64)
    g.output(gd.ops.correct_var(gd.var(x, axis=0), x, axis=0, correction=3))
    torch.testing.assert_close(gd.compile(g)(x=few)[0], few.var(0, correction=3))


def test_dropout_mask_errors():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    key = g.param("key", torch.zeros((), dtype=torch.float64))
    names(message(gd.dropout_mask, g.param("k32", torch.zeros(())), x),
          r"the key k32 is f32\[\]; a key is an f64\[\] step counter")
    names(message(gd.dropout_mask, key, x, p=1.5), r"p=1.5 must be a probability in \[0, 1\]")
    names(message(gd.dropout_mask, key, x, seed=-1), r"seed=-1 must be a whole number from 0 to 2\*\*63 - 1")


def test_a_dropout_mask_keeps_one_minus_p_and_scales_what_it_keeps():
    """Over 100,000 elements the kept fraction is 1 - p within 5 standard deviations, every
    kept element is 1/(1 - p), neighbouring elements and consecutive keys are uncorrelated,
    and the mask is the same for the same key, seed and shape."""
    g = gd.Graph("g")
    x = g.input("x", (None, 1000))
    key = g.input("key", (), torch.float64)
    g.output(gd.dropout_mask(key, x, p=0.3, seed=11), gd.dropout_mask(key + 1.0, x, p=0.3, seed=11),
             gd.dropout_mask(key, x, p=0.3, seed=12))
    fn = gd.compile(g)
    X = torch.zeros(100, 1000)
    m, next_key, other_seed = fn(x=X, key=torch.tensor(7.0, dtype=torch.float64))
    kept = (m > 0).double()
    sd = (0.3 * 0.7 / kept.numel()) ** 0.5
    assert abs(kept.mean().item() - 0.7) < 5 * sd
    assert torch.equal(m[m > 0], torch.full_like(m[m > 0], 1 / 0.7))
    flat = kept.flatten() - 0.7
    for other in (flat.roll(1), (next_key > 0).double().flatten() - 0.7, (other_seed > 0).double().flatten() - 0.7):
        assert abs((flat * other).mean().item()) / 0.21 < 5 / kept.numel() ** 0.5  # correlation within 5 sd
    again = fn(x=X, key=torch.tensor(7.0, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(again, (m, next_key, other_seed)))
    assert not torch.equal(m, next_key)


def test_the_mask_hashes_its_stream_on_the_host_to_the_same_bits_as_on_the_device():
    """On the CPU the key's stream is hashed in Python (a dispatch mode, such as the CUDA
    graph stand-in's recorder, keeps the tensor ops): both give the same bits, for keys up
    to 2**53 and seeds up to 2**63."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from graphdl.ops.random import _stream, dropout_mask_kernel

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    like = torch.zeros(3, 41)
    for k, seed in [(0.0, 0), (1.0, 11), (7.0, 2**63 - 1), (2.0**53, 12345), (123456789.0, 2**62 + 3),
                    (2.0**64, 1), (1e30, 5), (-2.0**64, 1), (-3.0, 2), (float("nan"), 1), (float("inf"), 1), (0.5, 3)]:
        key = torch.tensor(k, dtype=torch.float64)
        on_host = _stream(key, seed)
        assert isinstance(on_host, int) == (0 <= k <= 2**53 and k == int(k))  # else the device's conversion
        with Passing():
            on_device = _stream(key, seed)
            assert isinstance(on_device, torch.Tensor)
            recorded = dropout_mask_kernel(key, like, seed, 0.4)
        assert int(on_host) == on_device.item()
        assert torch.equal(dropout_mask_kernel(key, like, seed, 0.4), recorded)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_a_dropout_mask_at_the_ends_keeps_all_or_nothing(p):
    g = gd.Graph("g")
    x = g.input("x", (None, 7))
    g.output(gd.dropout_mask(g.param("key", torch.tensor(3.0, dtype=torch.float64)), x, p=p))
    (m,) = gd.compile(g)(x=torch.zeros(5, 7))
    assert torch.equal(m, torch.full((5, 7), 1.0 - p))
