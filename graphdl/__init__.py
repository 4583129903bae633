"""graphdl: a define-then-run deep-learning framework on PyTorch tensor operations.

Describe a computation once as a graph of op nodes, differentiate it with hand-written
VJPs (`grad`), compile it to a function of torch calls (`compile`) and run it many times.
"""

from .ir import DTYPES, Graph, GraphError, Node, Value
from .ops import (
    OPS, abs, add, broadcast_like, div, exp, greater, log, mae, matmul, mbe, mean, mse, mul, neg,
    relu, sigmoid, sign, sub, sum, sum_to, tanh, transpose, zeros_like,
)
from .text import parse
from .autodiff import grad
from .compile import Compiled, compile
from .losses import MAE, MBE, MSE, Loss
from .optim import SGD, Constant, CosineDecay, ExponentialDecay, Schedule, StepDecay
from .layers import Layer, Linear, ReLU, Sequential, Sigmoid, Tanh
from .step import TrainStep
from .train import DivergedError, History
from .viz import DotNotFoundError, render, to_dot
from .io import load, load_graph, save_graph

__all__ = [
    "DivergedError", "MAE", "MBE", "MSE", "SGD", "Constant", "CosineDecay", "ExponentialDecay", "History",
    "Layer", "Linear", "Loss", "ReLU", "Schedule", "Sequential", "Sigmoid", "StepDecay", "Tanh", "TrainStep",
    "DTYPES", "OPS", "Compiled", "DotNotFoundError", "Graph", "GraphError", "Node", "Value",
    "abs", "add", "broadcast_like", "compile", "div", "exp", "grad", "greater", "log", "mae", "matmul",
    "load", "load_graph", "mbe", "mean", "mse", "mul", "neg", "parse", "relu", "render", "save_graph", "sigmoid",
    "sign", "sub", "sum", "sum_to", "tanh", "to_dot", "transpose", "zeros_like",
]
