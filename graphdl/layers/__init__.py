"""Layers: each owns its tensors (`Param`s) and builds the IR of its forward pass.

A model (graphdl.model's Sequential) names each layer's tensors by position and builds
its graph through `Build`, which makes a tensor held in several places one param."""

from __future__ import annotations

from ..checks import FLOAT_DTYPES
from .base import Build, Layer, Param, keeps_rows_apart, same_memory
from .conv import AvgPool2d, Conv1d, Conv2d, MaxPool2d
from .dense import GELU, Embedding, Flatten, LeakyReLU, Linear, ReLU, Reshape, Sigmoid, SiLU, Softmax, Standardize, Tanh
from .normalization import BatchNorm1d, BatchNorm2d, Dropout, LayerNorm

LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (Linear, ReLU, Tanh, Sigmoid, Softmax, Standardize,
                                                                 GELU, LeakyReLU, SiLU, Flatten, Reshape, Embedding)}
LAYERS.update((cls.__name__, cls) for cls in (Conv1d, Conv2d, MaxPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d,
                                              LayerNorm, Dropout))
DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES.values()}  # as config() writes them

__all__ = [
    "Build", "Layer", "Param", "keeps_rows_apart", "same_memory", "LAYERS", "DTYPES_BY_NAME",
    "Linear", "ReLU", "Tanh", "Sigmoid", "Softmax", "GELU", "LeakyReLU", "SiLU", "Flatten", "Reshape", "Embedding",
    "Standardize", "Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Dropout",
]
