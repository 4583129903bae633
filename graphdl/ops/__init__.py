"""graphdl's ops: the registry (`registry.py`) and one module per family.

    registry     OpDef, defop, OPS, apply, CODE_GLOBALS, the shared shape rules, const
    reductions   sum, mean, broadcast_like, sum_to (and unbroadcast, for every VJP)
    elementwise  add, sub, mul, div, neg, exp, log, abs, sign, greater, relu, tanh,
                 sigmoid, softmax, log_softmax, zeros_like, gelu (and gelu_backward),
                 leaky_relu, silu
    linalg       matmul (of matrices or batches of them), transpose
    shapes       reshape, flatten, permute, concat, slice (and unslice), split
    indexing     index_select, index_add (integer indices, i64)
    losses       mse, mae, mbe, bce_with_logits, cross_entropy
    fused        addmm, addmm_tanh, matmul_tn, matmul_nt, *_backward (made by passes.fuse)
    products     the products' kernels (MKL's or oneDNN's, by measurement), which their code calls
    collectives  allreduce_start, allreduce_wait, unpack (made by passes.allreduce)
    conv         conv1d, conv2d, max_pool2d, avg_pool2d and their *_backward ops
    normalization  rsqrt, var, correct_var, batch_norm (and batch_norm_backward), layer_norm
    random       dropout_mask (a pure function of a key)

Each op is an `OpDef`, which is also its builder: `add(a, b)` adds a node. Attributes
may follow the inputs positionally, in the order the op declares them (`mean(x, 1)`),
or by name (`mean(x, axis=1, keepdims=True)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..ir import Value
from . import (
    collectives,
    conv,
    elementwise,
    fused,
    indexing,
    linalg,
    losses,
    normalization,
    random,
    reductions,
    registry,
    shapes,
)
from .collectives import allreduce_start, allreduce_wait, unpack
from .conv import (
    avg_pool2d,
    avg_pool2d_backward,
    conv1d,
    conv2d,
    conv_backward_input,
    conv_backward_weight,
    max_pool2d,
    max_pool2d_backward,
    max_pool2d_select,
)
from .elementwise import (
    absolute,
    add,
    div,
    exp,
    gelu,
    gelu_backward,
    greater,
    leaky_relu,
    log,
    log_softmax,
    mul,
    neg,
    relu,
    sigmoid,
    sign,
    silu,
    softmax,
    sub,
    tanh,
    zeros_like,
)
from .fused import addmm, addmm_tanh, matmul_nt, matmul_tn, mse_backward, relu_backward, sigmoid_backward, tanh_backward
from .indexing import index_add, index_select
from .linalg import matmul, transpose
from .losses import bce_with_logits, cross_entropy, mae, mbe, mse
from .normalization import batch_norm, batch_norm_backward, correct_var, layer_norm, rsqrt, var
from .random import dropout_mask
from .reductions import broadcast_like, reduce_mean, reduce_sum, sum_to, unbroadcast
from .registry import CODE_GLOBALS, OPS, VARIADIC, Collective, Memory, OpDef, apply, const, defop
from .shapes import concat, flatten, permute, reshape, slice_, split, unslice

# The public names that are Python builtins too: bound here, for `gd.sum`, `gd.abs` and
# `gd.slice`, and nowhere inside the package.
sum = reduce_sum  # noqa: A001
abs = absolute  # noqa: A001
slice = slice_  # noqa: A001
mean = reduce_mean


# -- Value's operators ------------------------------------------------------------------
# Installed on Value from here, where the ops are (as torch.fx's proxy.py installs its
# magic methods), so ir.py needs no import of the families. An op binds as a method:
# `a + b` is add(a, b).


def _method(op: OpDef) -> Callable[..., Value]:
    def method(self: Value, *others: Any) -> Value:
        return op(self, *others)
    method.__name__ = op.name
    return method


def _reflected(op: OpDef) -> Callable[[Value, Any], Value]:
    def method(self: Value, other: Any) -> Value:
        return op(other, self)
    method.__name__ = f"r{op.name}"
    return method


VALUE_OPERATORS: dict[str, Any] = {
    "__add__": _method(add), "__radd__": _reflected(add),
    "__sub__": _method(sub), "__rsub__": _reflected(sub),
    "__mul__": _method(mul), "__rmul__": _reflected(mul),
    "__truediv__": _method(div), "__rtruediv__": _reflected(div),
    "__matmul__": _method(matmul),
    "__neg__": _method(neg),
    "T": property(_method(transpose), doc="The value with its last two dims swapped."),
}
for _name, _operator in VALUE_OPERATORS.items():
    setattr(Value, _name, _operator)

__all__ = [
    "CODE_GLOBALS", "OPS", "VARIADIC", "VALUE_OPERATORS", "Collective", "Memory", "OpDef", "apply", "defop",
    "registry", "reductions", "elementwise", "linalg", "losses", "fused", "collectives",
    "const", "reduce_sum", "reduce_mean", "sum", "mean", "broadcast_like", "sum_to", "unbroadcast",
    "absolute", "abs", "add", "div", "exp", "greater", "log", "log_softmax", "mul", "neg", "relu", "sigmoid", "sign",
    "softmax", "sub", "tanh", "zeros_like", "matmul", "transpose",
    "gelu", "gelu_backward", "leaky_relu", "silu", "shapes", "indexing",
    "reshape", "flatten", "permute", "concat", "slice", "slice_", "unslice", "split", "index_select", "index_add",
    "bce_with_logits", "cross_entropy", "mae", "mbe", "mse",
    "addmm", "addmm_tanh", "matmul_nt", "matmul_tn", "mse_backward", "relu_backward", "sigmoid_backward",
    "tanh_backward",
    "allreduce_start", "allreduce_wait", "unpack",
    "conv", "normalization", "random", "conv1d", "conv2d", "conv_backward_input", "conv_backward_weight",
    "max_pool2d", "max_pool2d_backward", "max_pool2d_select", "avg_pool2d", "avg_pool2d_backward",
    "rsqrt", "var", "correct_var", "batch_norm", "batch_norm_backward", "layer_norm", "dropout_mask",
]
