"""PyTorch modules in and out: `from_torch(nn.Sequential)` (graphdl.model, with the layers
`torch_layers` makes here) and `Sequential.to_torch()`.

One table, `TORCH_LAYERS`, pairs each torch module type with the graphdl layer it becomes
and back. The weights are copied both ways, never shared: graphdl's `Linear` holds
weight [in, out] (x @ weight + bias) where torch's holds [out, in] (x @ weight.T + bias),
so each copy is a transpose into fresh contiguous memory owned by the receiving side.

torch.nn is only used here to read and build modules; graphdl never runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import layers
from .checks import DTYPE_NAMES, GraphError
from .layers import Layer, Linear


@dataclass(frozen=True)
class TorchLayer:
    """How one torch module type and one graphdl layer type map onto each other.

    `params` pairs each graphdl tensor with the torch parameter it is copied from and to
    ({"weight": "weight"}): what tells a tied weight on one side to stay tied on the other."""

    module: type[torch.nn.Module]
    layer: type[Layer]
    to_layer: Callable[[Any, str], Layer]  # (module, where) -> layer
    to_module: Callable[[Any], torch.nn.Module]  # layer -> module
    params: tuple[tuple[str, str], ...] = ()  # (graphdl name, torch name)


def _owned(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached copy in fresh contiguous memory (never a view of the source)."""
    return t.detach().to(dtype or t.dtype).clone(memory_format=torch.contiguous_format)


def _linear_from_torch(m: torch.nn.Linear, where: str) -> Linear:
    w = m.weight
    if w.dtype not in DTYPE_NAMES:
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
    # A graphdl model's activations are [N, features], so dim 1 (or -1, or torch's
    # legacy None, which means 1 for 2-d input) is the feature axis graphdl's Softmax uses.
    if m.dim not in (None, 1, -1):
        raise GraphError(f"{where}: Softmax(dim={m.dim}) normalises across the batch; graphdl's Softmax "
                         "normalises each row (dim=1 or -1)")
    return layers.Softmax()


def _simple(module: type[torch.nn.Module], layer: type[Layer]) -> TorchLayer:
    """A row for a parameter-free activation: the same function on both sides."""
    return TorchLayer(module, layer, lambda m, where: layer(), lambda layer: module())


TORCH_LAYERS: list[TorchLayer] = [
    TorchLayer(torch.nn.Linear, Linear, _linear_from_torch, _linear_to_torch, (("weight", "weight"), ("bias", "bias"))),
    _simple(torch.nn.ReLU, layers.ReLU),
    _simple(torch.nn.Tanh, layers.Tanh),
    _simple(torch.nn.Sigmoid, layers.Sigmoid),
    TorchLayer(torch.nn.Softmax, layers.Softmax, _softmax_from_torch, lambda layer: torch.nn.Softmax(dim=-1)),
]


def torch_layers(module: torch.nn.Module) -> list[tuple[str, Layer]]:
    """The graphdl layers computing what a torch `nn.Sequential` computes, with copies of
    its weights, each with where it came from (`module 2 (Linear(...))`): what
    `gd.from_torch` puts into a Sequential.

    Args:
        module: an `nn.Sequential` (nested ones are flattened) of the modules in
            `TORCH_LAYERS` (`Linear`, `ReLU`, `Tanh`, `Sigmoid`, `Softmax`) and
            `Identity` (dropped), or one such module alone. A `Linear`
            without a bias gets a zero bias.

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
    for k, layer in enumerate(model.layers):
        row = by_type.get(type(layer))
        if row is None:
            known = ", ".join(row.layer.__name__ for row in TORCH_LAYERS)
            raise GraphError(f"to_torch: layer {k} ({layer!r}) has no torch module; the layers that map are {known}")
        module = row.to_module(layer)
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
