"""PyTorch modules in and out: `from_torch(nn.Sequential)` (graphdl.model, with the layers
`torch_layers` makes here) and `Sequential.to_torch()`.

One table, `TORCH_LAYERS`, pairs each torch module type with the graphdl layer it becomes
and back. The weights are copied both ways, never shared: graphdl's `Linear` holds
weight [in, out] (x @ weight + bias) where torch's holds [out, in] (x @ weight.T + bias),
so each copy is a transpose into fresh contiguous memory owned by the receiving side.

torch.nn is only used here to read and build modules; graphdl never runs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import layers
from .checks import FLOAT_DTYPES, GraphError
from .layers import Layer, Linear


@dataclass(frozen=True)
class TorchLayer:
    """How one torch module type and one graphdl layer type map onto each other.

    `params` pairs each graphdl tensor with the torch parameter it is copied from and to
    ({"weight": "weight"}): what tells a tied weight on one side to stay tied on the other."""

    module: type[torch.nn.Module]
    layer: type[Layer]
    to_layer: Callable[[Any, str], Layer]  # (module, where) -> layer
    to_module: Callable[..., torch.nn.Module]  # layer -> module; with `shaped`, (layer, its input's shape) -> module
    params: tuple[tuple[str, str], ...] = ()  # (graphdl name, torch name)
    shaped: bool = False  # to_module needs the shape of one example coming in


def _owned(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached copy in fresh contiguous memory (never a view of the source)."""
    return t.detach().to(dtype or t.dtype).clone(memory_format=torch.contiguous_format)


def _linear_from_torch(m: torch.nn.Linear, where: str) -> Linear:
    w = m.weight
    if w.dtype not in FLOAT_DTYPES.values():
        raise GraphError(f"{where}: weight dtype {w.dtype} is not one graphdl holds; "
                         f"convert the module first, e.g. module.float()")
    out_features, in_features = w.shape
    # A private generator: the throwaway initial draw must not advance the user's global RNG.
    layer = Linear(in_features, out_features, generator=torch.Generator(), dtype=w.dtype)
    layer.weight = _owned(w.T).to(w.device)
    if m.bias is not None:
        layer.bias = _owned(m.bias, w.dtype)
    else:  # graphdl's Linear always has a bias; zeros compute the same function
        layer.bias = torch.zeros(out_features, dtype=w.dtype, device=w.device)
    return layer


def _linear_to_torch(layer: Linear) -> torch.nn.Linear:
    w = layer.weight
    # Built on the meta device so that torch's own initialisation neither allocates nor
    # draws from the user's global RNG; the real weights replace it.
    module = torch.nn.Linear(layer.in_features, layer.out_features, device="meta", dtype=w.dtype)
    module.weight = torch.nn.Parameter(_owned(w.T))
    module.bias = torch.nn.Parameter(_owned(layer.bias))
    return module


def _softmax_from_torch(m: torch.nn.Softmax, where: str) -> Layer:
    # torch's legacy dim=None means dim 1 for rows [N, features], the rows graphdl's Softmax()
    # normalises; an explicit dim is kept, so that examples of more dims are normalised where torch does.
    if m.dim == 0:
        raise GraphError(f"{where}: Softmax(dim={m.dim}) normalises across the batch; graphdl's Softmax "
                         "normalises each example (dim=1 or more, or -1)")
    return _settings(where, lambda: layers.Softmax() if m.dim in (None, -1) else layers.Softmax(m.dim))


def _settings(where: str, make: Callable[[], Layer]) -> Layer:
    """The layer `make` builds from a module's settings, a GraphError naming the module if it refuses them."""
    try:
        return make()
    except ValueError as e:
        raise GraphError(f"{where}: {e}") from None


def _embedding_from_torch(m: torch.nn.Embedding, where: str) -> Layer:
    w = m.weight
    if w.dtype not in FLOAT_DTYPES.values():
        raise GraphError(f"{where}: weight dtype {w.dtype} is not one graphdl holds; convert the module first, "
                         "e.g. module.float()")
    unlike = [f"{name}={value!r}" for name, value, default in (
        ("padding_idx", m.padding_idx, None), ("max_norm", m.max_norm, None),
        ("scale_grad_by_freq", m.scale_grad_by_freq, False), ("sparse", m.sparse, False)) if value != default]
    if unlike:
        raise GraphError(f"{where}: {', '.join(unlike)} changes how torch's Embedding computes or trains, which "
                         "graphdl's Embedding does not do; build the module without it")
    layer = layers.Embedding(m.num_embeddings, m.embedding_dim, generator=torch.Generator(), dtype=w.dtype)
    layer.weight = _owned(w).to(w.device)  # the same layout on both sides: [num_embeddings, embedding_dim]
    return layer


def _embedding_to_torch(layer: layers.Embedding) -> torch.nn.Embedding:
    module = torch.nn.Embedding(layer.num_embeddings, layer.embedding_dim, device="meta", dtype=layer.weight.dtype)
    module.weight = torch.nn.Parameter(_owned(layer.weight))
    return module


def _unflatten_from_torch(m: torch.nn.Unflatten, where: str) -> Layer:
    # graphdl's Reshape shapes the whole of each example: what Unflatten(1, sizes) does to rows
    # [N, features] (a model with examples of more dims refuses it where it is added).
    if m.dim != 1 or not isinstance(m.unflattened_size, (tuple, list)):
        raise GraphError(f"{where}: Unflatten(dim={m.dim}) is not supported; graphdl's Reshape unflattens rows "
                         "(dim=1) into the shape of each example")
    return _settings(where, lambda: layers.Reshape(tuple(m.unflattened_size)))


def _reshape_to_torch(layer: layers.Reshape, shape: tuple) -> torch.nn.Module:
    """Unflatten(1, the example's shape) of rows; examples of more dims are flattened first."""
    out = layer.output_shape(shape)
    unflatten = torch.nn.Unflatten(1, out)
    return unflatten if len(shape) == 1 else torch.nn.Sequential(torch.nn.Flatten(), unflatten)


def _floating(t: torch.Tensor, where: str) -> torch.dtype:
    if t.dtype not in FLOAT_DTYPES.values():
        raise GraphError(f"{where}: weight dtype {t.dtype} is not one graphdl holds; "
                         f"convert the module first, e.g. module.float()")
    return t.dtype


def _refuse(where: str, what: str, fix: str) -> GraphError:
    return GraphError(f"from_torch: {where}: {what}, which graphdl's layer does not have; {fix}")


def _conv_padding(m: torch.nn.Module, where: str) -> tuple[int, ...]:
    """torch's padding as numbers: "valid" is none, "same" (stride 1) half the dilated kernel."""
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        spans = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(s % 2 for s in spans):
            raise _refuse(where, "padding='same' with an even kernel pads one side more than the other",
                          "use an odd kernel size or explicit padding")
        return tuple(s // 2 for s in spans)
    return tuple(m.padding)


def _conv_from_torch(m: torch.nn.Conv1d | torch.nn.Conv2d, where: str) -> Layer:
    dtype = _floating(m.weight, where)
    if m.padding_mode != "zeros":
        raise _refuse(where, f"padding_mode={m.padding_mode!r}", "use padding_mode='zeros'")
    layer_type = layers.Conv1d if isinstance(m, torch.nn.Conv1d) else layers.Conv2d
    layer = layer_type(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=_conv_padding(m, where),
                       dilation=m.dilation, groups=m.groups, bias=m.bias is not None, generator=torch.Generator(),
                       dtype=dtype)
    layer.weight = _owned(m.weight).to(m.weight.device)
    if m.bias is not None:
        layer.bias = _owned(m.bias, dtype)
    return layer


def _conv_to_torch(layer: layers.Conv1d | layers.Conv2d) -> torch.nn.Module:
    module_type = torch.nn.Conv1d if isinstance(layer, layers.Conv1d) else torch.nn.Conv2d
    w = layer.weight
    module = module_type(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=layer.has_bias,
                         device="meta", dtype=w.dtype)
    module.weight = torch.nn.Parameter(_owned(w))
    if layer.has_bias:
        module.bias = torch.nn.Parameter(_owned(layer.bias))
    return module


def _pool_from_torch(m: torch.nn.MaxPool2d | torch.nn.AvgPool2d, where: str) -> Layer:
    if m.ceil_mode:
        raise _refuse(where, "ceil_mode=True", "use ceil_mode=False (pad the input instead)")
    if isinstance(m, torch.nn.MaxPool2d):
        if m.return_indices or m.dilation not in (1, (1, 1)):
            raise _refuse(where, "dilation or return_indices", "use a MaxPool2d without them")
        return layers.MaxPool2d(m.kernel_size, m.stride, m.padding)
    if m.divisor_override is not None:
        raise _refuse(where, "divisor_override", "leave it None")
    return layers.AvgPool2d(m.kernel_size, m.stride, m.padding, count_include_pad=m.count_include_pad)


def _pool_to_torch(layer: layers.MaxPool2d | layers.AvgPool2d) -> torch.nn.Module:
    if isinstance(layer, layers.MaxPool2d):
        return torch.nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    return torch.nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding,
                              count_include_pad=layer.count_include_pad)


def _batch_norm_from_torch(m: torch.nn.BatchNorm1d | torch.nn.BatchNorm2d, where: str) -> Layer:
    if not m.affine or not m.track_running_stats or m.momentum is None:
        raise _refuse(where, "affine=False, track_running_stats=False or momentum=None",
                      "use affine=True, track_running_stats=True and a momentum")
    dtype = _floating(m.weight, where)
    layer_type = layers.BatchNorm1d if isinstance(m, torch.nn.BatchNorm1d) else layers.BatchNorm2d
    layer = layer_type(m.num_features, eps=m.eps, momentum=m.momentum, dtype=dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(layer, name, _owned(getattr(m, name), dtype).to(m.weight.device))
    return layer


def _batch_norm_to_torch(layer: layers.BatchNorm1d | layers.BatchNorm2d) -> torch.nn.Module:
    module_type = torch.nn.BatchNorm1d if isinstance(layer, layers.BatchNorm1d) else torch.nn.BatchNorm2d
    w = layer.weight
    module = module_type(layer.num_features, eps=layer.eps, momentum=layer.momentum, device=w.device, dtype=w.dtype)
    module.weight = torch.nn.Parameter(_owned(w))
    module.bias = torch.nn.Parameter(_owned(layer.bias))
    module.running_mean.copy_(layer.running_mean)
    module.running_var.copy_(layer.running_var)
    return module


def _layer_norm_from_torch(m: torch.nn.LayerNorm, where: str) -> Layer:
    if not m.elementwise_affine or m.bias is None:
        raise _refuse(where, "no elementwise affine weight or no bias", "use elementwise_affine=True, bias=True")
    dtype = _floating(m.weight, where)
    layer = layers.LayerNorm(m.normalized_shape, eps=m.eps, dtype=dtype)
    layer.weight, layer.bias = _owned(m.weight).to(m.weight.device), _owned(m.bias, dtype)
    return layer


def _layer_norm_to_torch(layer: layers.LayerNorm) -> torch.nn.Module:
    w = layer.weight
    module = torch.nn.LayerNorm(layer.normalized_shape, eps=layer.eps, device="meta", dtype=w.dtype)
    module.weight = torch.nn.Parameter(_owned(w))
    module.bias = torch.nn.Parameter(_owned(layer.bias))
    return module


def _dropout_from_torch(m: torch.nn.Dropout, where: str) -> Layer:
    # The seed comes from the module's place, not torch's global RNG (converting must not
    # advance it): one model's Dropouts draw different masks, and converting again the same.
    seed = int.from_bytes(hashlib.blake2b(where.encode(), digest_size=8).digest(), "little") % 2**63
    return layers.Dropout(m.p, seed=seed)


def _simple(module: type[torch.nn.Module], layer: type[Layer]) -> TorchLayer:
    """A row for a parameter-free activation: the same function on both sides."""
    return TorchLayer(module, layer, lambda m, where: layer(), lambda layer: module())


TORCH_LAYERS: list[TorchLayer] = [
    TorchLayer(torch.nn.Linear, Linear, _linear_from_torch, _linear_to_torch, (("weight", "weight"), ("bias", "bias"))),
    _simple(torch.nn.ReLU, layers.ReLU),
    _simple(torch.nn.Tanh, layers.Tanh),
    _simple(torch.nn.Sigmoid, layers.Sigmoid),
    TorchLayer(torch.nn.Softmax, layers.Softmax, _softmax_from_torch, lambda layer: torch.nn.Softmax(dim=layer.dim)),
    TorchLayer(torch.nn.GELU, layers.GELU, lambda m, where: _settings(where, lambda: layers.GELU(m.approximate)),
               lambda layer: torch.nn.GELU(approximate=layer.approximate)),
    TorchLayer(torch.nn.LeakyReLU, layers.LeakyReLU,
               lambda m, where: _settings(where, lambda: layers.LeakyReLU(m.negative_slope)),
               lambda layer: torch.nn.LeakyReLU(layer.negative_slope)),
    _simple(torch.nn.SiLU, layers.SiLU),
    TorchLayer(torch.nn.Flatten, layers.Flatten,
               lambda m, where: _settings(where, lambda: layers.Flatten(m.start_dim, m.end_dim)),
               lambda layer: torch.nn.Flatten(layer.start_dim, layer.end_dim)),
    TorchLayer(torch.nn.Unflatten, layers.Reshape, _unflatten_from_torch, _reshape_to_torch, shaped=True),
    TorchLayer(torch.nn.Embedding, layers.Embedding, _embedding_from_torch, _embedding_to_torch,
               (("weight", "weight"),)),
    *(TorchLayer(module, layer, _conv_from_torch, _conv_to_torch, (("weight", "weight"), ("bias", "bias")))
      for module, layer in ((torch.nn.Conv1d, layers.Conv1d), (torch.nn.Conv2d, layers.Conv2d))),
    *(TorchLayer(module, layer, _pool_from_torch, _pool_to_torch)
      for module, layer in ((torch.nn.MaxPool2d, layers.MaxPool2d), (torch.nn.AvgPool2d, layers.AvgPool2d))),
    *(TorchLayer(module, layer, _batch_norm_from_torch, _batch_norm_to_torch,
                 (("weight", "weight"), ("bias", "bias")))
      for module, layer in ((torch.nn.BatchNorm1d, layers.BatchNorm1d), (torch.nn.BatchNorm2d, layers.BatchNorm2d))),
    TorchLayer(torch.nn.LayerNorm, layers.LayerNorm, _layer_norm_from_torch, _layer_norm_to_torch,
               (("weight", "weight"), ("bias", "bias"))),
    TorchLayer(torch.nn.Dropout, layers.Dropout, _dropout_from_torch, lambda layer: torch.nn.Dropout(layer.p)),
]


def torch_layers(module: torch.nn.Module) -> list[tuple[str, Layer]]:
    """The graphdl layers computing what a torch `nn.Sequential` computes, with copies of
    its weights, each with where it came from (`module 2 (Linear(...))`): what
    `gd.from_torch` puts into a Sequential.

    Args:
        module: an `nn.Sequential` (nested ones are flattened) of the modules in
            `TORCH_LAYERS` (`Linear`, `ReLU`, `Tanh`, `Sigmoid`, `Softmax`, `GELU`,
            `LeakyReLU`, `SiLU`, `Flatten`, `Unflatten` of rows, `Embedding`, `Conv1d`,
            `Conv2d`, `MaxPool2d`, `AvgPool2d`, `BatchNorm1d`, `BatchNorm2d`,
            `LayerNorm`, `Dropout`) and `Identity` (dropped), or one such module alone.
            A `Linear` without a bias gets a zero bias. BatchNorm's running statistics
            come along; whether the module is in train or eval mode does not matter
            (graphdl trains in `fit` and infers in `predict`).

    Returns:
        The layers. Their weights are graphdl-owned contiguous copies in the module's
        dtype and on its device: changing one side never changes the other. A torch
        parameter shared between modules is one tensor, tied between their layers.

    Raises:
        GraphError: a module has no graphdl counterpart (named with its position, e.g.
            `module 2 (Conv2d(...))`), or the modules' dtypes differ.
    """
    if not isinstance(module, torch.nn.Module):
        raise GraphError(f"from_torch takes a torch.nn.Module such as nn.Sequential(...), got {type(module).__name__}")
    by_type = {row.module: row for row in TORCH_LAYERS}
    made: list[tuple[str, Layer]] = []
    dtype: tuple[torch.dtype, str] | None = None
    tied: dict[int, tuple[Layer, str]] = {}  # id of a torch parameter -> the graphdl layer and name it became
    for position, m in _flatten(module, ""):
        where = f"module {position} ({_short(m)})"
        if type(m) is torch.nn.Identity:
            continue
        row = by_type.get(type(m))
        if row is None:
            known = ", ".join(row.module.__name__ for row in TORCH_LAYERS)
            raise GraphError(f"from_torch: {where} has no graphdl layer; graphdl takes {known} and Identity, "
                             "in an nn.Sequential")
        layer = row.to_layer(m, where)
        _tie_shared(row, m, layer, tied)
        for t in layer.params().values():
            if dtype is None:
                dtype = (t.dtype, where)
            elif t.dtype != dtype[0]:
                raise GraphError(f"from_torch: {where} is {t.dtype} but {dtype[1]} is {dtype[0]}; "
                                 f"one model has one dtype: convert the module with .to({dtype[0]})")
        made.append((where, layer))
    return made


def _tie_shared(row: TorchLayer, module: torch.nn.Module, layer: Layer, tied: dict[int, tuple[Layer, str]]) -> None:
    """Give `layer` the tensor of an earlier layer wherever torch shares the parameter."""
    for name, torch_name in row.params:
        p = getattr(module, torch_name, None)
        if p is None:
            continue
        if id(p) in tied:
            first, first_name = tied[id(p)]
            setattr(layer, name, getattr(first, first_name))
        else:
            tied[id(p)] = (layer, name)


def to_torch(model: Any) -> torch.nn.Sequential:
    """A torch `nn.Sequential` computing what `model` computes, with copies of its weights.

    Args:
        model: a `gd.Sequential` of layers that `TORCH_LAYERS` maps.

    Returns:
        The module, its parameters fresh `nn.Parameter`s (copies, in the model's dtype
        and on its device) that torch can train.

    Raises:
        GraphError: a layer has no torch counterpart, named with its position.
    """
    if not (hasattr(model, "layers") and hasattr(model, "owners")):  # a Sequential (graphdl.model imports this)
        raise GraphError(f"to_torch takes a gd.Sequential, got {type(model).__name__}")
    by_type = {row.layer: row for row in TORCH_LAYERS}
    modules = []
    owners = model.owners()
    made: dict[str, torch.nn.Parameter] = {}  # a graphdl param's name -> the torch parameter made for it
    shapes: list[tuple] = []  # of one example into each layer, worked out if a layer needs them
    for k, layer in enumerate(model.layers):
        row = by_type.get(type(layer))
        if row is None:
            known = ", ".join(row.layer.__name__ for row in TORCH_LAYERS)
            raise GraphError(f"to_torch: layer {k} ({layer!r}) has no torch module; the layers that map are {known}")
        if row.shaped and not shapes:
            shapes = _example_shapes(model)
        module = row.to_module(layer, shapes[k]) if row.shaped else row.to_module(layer)
        for name, torch_name in row.params:  # a tied tensor becomes one shared torch parameter
            owner = owners.get(f"{k}.{name}")
            if owner is None:
                continue
            if owner in made:
                setattr(module, torch_name, made[owner])
            else:
                made[owner] = getattr(module, torch_name)
        modules.append(module)
    return torch.nn.Sequential(*modules)


def _example_shapes(model: Any) -> list[tuple]:
    """The shape of one example coming into each layer of the model."""
    shape = model.input_shape
    shapes = []
    for layer in model.layers:
        shapes.append(shape)
        shape = layer.output_shape(shape)
    return shapes


def _flatten(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """The leaf modules of (nested) nn.Sequentials with their positions, "2" or "1.0"."""
    if type(module) is not torch.nn.Sequential:
        yield prefix or "0", module
        return
    # Its own list, not named_children(), which skips a module the Sequential holds twice
    # (nn.Sequential(shared, nn.ReLU(), shared) would lose its third layer).
    for name, child in module._modules.items():
        if child is not None:
            yield from _flatten(child, f"{prefix}{name}" if not prefix else f"{prefix}.{name}")


def _short(module: torch.nn.Module) -> str:
    text = " ".join(repr(module).split())
    return text if len(text) <= 60 else text[:57] + "..."
