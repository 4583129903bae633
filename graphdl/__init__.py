"""graphdl: a define-then-run deep-learning framework on PyTorch tensor operations.

Describe a computation once as a graph of op nodes, differentiate it with hand-written
VJPs (`grad`), compile it to a function of torch calls (`compile`) and run it many times.
"""

from .checks import DTYPES, GraphError
from .ir import Graph, Node, Value
from .ops import (
    OPS, abs, add, bce_with_logits, broadcast_like, cross_entropy, div, exp, greater, log, log_softmax, mae, matmul,
    mbe, mean, mse, mul, neg, relu, sigmoid, sign, softmax, sub, sum, sum_to, tanh, transpose, zeros_like,
    concat, flatten, gelu, index_add, index_select, leaky_relu, permute, reshape, silu, slice, split, unslice,
)
from .ops import avg_pool2d, batch_norm, conv1d, conv2d, dropout_mask, layer_norm, max_pool2d, rsqrt, var
from .text import parse
from .autodiff import grad
from .compile import Compiled, compile
from .losses import MAE, MBE, MSE, BCEWithLogits, CrossEntropy, Loss
from .optim import (
    SGD, Adagrad, Adam, AdamW, Constant, CosineDecay, ExponentialDecay, LinearWarmup, OneCycle, Optimizer, PerStep,
    RMSprop, Schedule, StepDecay,
)
from .layers import (
    GELU, Embedding, Flatten, Layer, LeakyReLU, Linear, ReLU, Reshape, Sigmoid, SiLU, Softmax, Standardize, Tanh,
)
from .layers import AvgPool2d, BatchNorm1d, BatchNorm2d, Conv1d, Conv2d, Dropout, LayerNorm, MaxPool2d
from .step import TrainStep
from .callbacks import (
    Callback, CSVLogger, EarlyStopping, LambdaCallback, ModelCheckpoint, ReduceLROnPlateau, TensorBoard,
)
from .train import DivergedError, History
from .viz import DotNotFoundError, render, to_dot
from .io import load_graph, save_graph
from .interop import to_torch
from .onnx_io import export_onnx, import_onnx
from .model import Sequential, from_torch
from .functional import Model, load
from . import distributed

__all__ = [
    "Callback", "CSVLogger", "EarlyStopping", "LambdaCallback", "ModelCheckpoint", "ReduceLROnPlateau", "TensorBoard",
    "BCEWithLogits", "CrossEntropy", "DivergedError", "MAE", "MBE", "MSE", "SGD", "Softmax", "Standardize",
    "Adagrad", "Adam", "AdamW", "LinearWarmup", "OneCycle", "Optimizer", "PerStep", "RMSprop",
    "Constant", "CosineDecay", "ExponentialDecay", "History",
    "Layer", "Linear", "Loss", "Model", "ReLU", "Schedule", "Sequential", "Sigmoid", "StepDecay", "Tanh", "TrainStep",
    "Embedding", "Flatten", "GELU", "LeakyReLU", "Reshape", "SiLU",
    "DTYPES", "OPS", "Compiled", "DotNotFoundError", "Graph", "GraphError", "Node", "Value",
    "abs", "add", "bce_with_logits", "broadcast_like", "check_numerics", "cross_entropy", "log_softmax", "softmax",
    "compile",
    "distributed", "div", "exp", "grad", "greater", "log", "mae", "matmul", "export_onnx", "from_torch", "import_onnx",
    "to_torch",
    "load", "load_graph", "mbe", "mean", "mse", "mul", "neg", "parse", "Profile", "profile", "relu", "render",
    "save_graph", "sigmoid",
    "sign", "sub", "sum", "sum_to", "tanh", "to_dot", "transpose", "zeros_like",
    "concat", "flatten", "gelu", "index_add", "index_select", "leaky_relu", "permute", "reshape", "silu", "slice",
    "split", "unslice",
    "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv1d", "Conv2d", "Dropout", "LayerNorm", "MaxPool2d",
    "avg_pool2d", "batch_norm", "conv1d", "conv2d", "dropout_mask", "layer_norm", "max_pool2d", "rsqrt", "var",
]


def __getattr__(name: str) -> object:
    """The diagnostics, loaded on first use (`gd.profile`, `gd.Profile`, `gd.check_numerics`):
    `import graphdl` stays as fast as without them (their dataclasses alone took ~10 ms)."""
    if name in ("profile", "Profile"):
        from . import profiler
        value = getattr(profiler, name)
    elif name == "check_numerics":
        from .numerics import check_numerics as value
    else:
        raise AttributeError(f"module 'graphdl' has no attribute {name!r}")
    globals()[name] = value
    return value
