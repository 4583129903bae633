"""Layers and the Sequential builder, which compiles a stack of layers to the IR."""

from __future__ import annotations

import math
from typing import Any

import torch

from .ir import Graph, GraphError, Value, read_int, read_shape
from .losses import Loss
from .ops import add, matmul, relu, sigmoid, tanh


class Layer:
    """A building block: owns its params and emits the IR of its forward pass."""

    in_features: int | None = None  # None: keeps the width it is given
    out_features: int | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """The layer's params by short name ("weight", "bias"), live tensors."""
        return {}

    def forward(self, graph: Graph, x: Value, prefix: str) -> Value:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__}

    def to(self, device: torch.device | str) -> None:
        for name, t in self.params().items():
            setattr(self, name, t.to(device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Linear(Layer):
    """x @ weight + bias, with weight [in_features, out_features] and bias [out_features].

    Both start uniform in (-1/sqrt(in_features), 1/sqrt(in_features)), PyTorch's default,
    drawn from `generator` or torch's global RNG.
    """

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = read_int(in_features, "in_features", low=1)
        self.out_features = read_int(out_features, "out_features", low=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
        read_shape((in_features, out_features), "Linear's weight", dtype)  # torch could not even describe it
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        bound = 1.0 / math.sqrt(in_features)
        self.weight = (torch.rand(in_features, out_features, generator=generator, dtype=dtype) * 2 - 1) * bound
        self.bias = (torch.rand(out_features, generator=generator, dtype=dtype) * 2 - 1) * bound

    def params(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def forward(self, graph: Graph, x: Value, prefix: str) -> Value:
        w = graph.param(f"{prefix}weight", self.weight)
        b = graph.param(f"{prefix}bias", self.bias)
        return add(matmul(x, w), b)

    def config(self) -> dict[str, Any]:
        return {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    """max(x, 0)."""

    def forward(self, graph: Graph, x: Value, prefix: str) -> Value:
        return relu(x)


class Tanh(Layer):
    """Hyperbolic tangent."""

    def forward(self, graph: Graph, x: Value, prefix: str) -> Value:
        return tanh(x)


class Sigmoid(Layer):
    """1 / (1 + exp(-x))."""

    def forward(self, graph: Graph, x: Value, prefix: str) -> Value:
        return sigmoid(x)


LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (Linear, ReLU, Tanh, Sigmoid)}


class Sequential:
    """Layers applied in order, compiled to one graph.

    The layer at position k owns params "{k}.weight" and "{k}.bias". `graph(loss)` builds
    the IR with inputs "x" (and "y" with a loss), each node tagged with its layer's scope
    "{k}:{Type}"; `fit`, `predict` and `evaluate` compile that graph once and reuse it.
    """

    def __init__(self, *layers: Layer) -> None:
        self.layers: list[Layer] = []
        self._cache: dict[Any, Any] = {}
        for layer in layers:
            self.add(layer)

    def add(self, layer: Layer) -> Sequential:
        """Append a layer; its width must chain with the layers before it."""
        if not isinstance(layer, Layer):
            raise GraphError(f"Sequential.add takes a layer such as gd.Linear(25, 1), got {layer!r}")
        width, source = self._width()
        if layer.in_features is not None and width is not None and layer.in_features != width:
            k = len(self.layers)
            raise GraphError(
                f"layer {k} ({layer!r}) takes {layer.in_features} features but layer {source} "
                f"({self.layers[source]!r}) gives {width}; make layer {k} {type(layer).__name__}"
                f"({width}, ...) or change layer {source}"
            )
        self.layers.append(layer)
        self._cache.clear()
        return self

    def _width(self) -> tuple[int | None, int]:
        """The output width of the stack so far and the index of the layer that sets it."""
        for k in range(len(self.layers) - 1, -1, -1):
            if self.layers[k].out_features is not None:
                return self.layers[k].out_features, k
        return None, -1

    @property
    def in_features(self) -> int:
        for layer in self.layers:
            if layer.in_features is not None:
                return layer.in_features
        raise GraphError("this Sequential has no Linear layer, so its input width is unknown; add gd.Linear(i, o)")

    @property
    def out_features(self) -> int:
        width, _ = self._width()
        if width is None:
            raise GraphError("this Sequential has no Linear layer, so its output width is unknown")
        return width

    def parameters(self) -> dict[str, torch.Tensor]:
        """Params by name ("0.weight", "0.bias", ...), in build order: the live tensors."""
        return {f"{k}.{name}": t for k, layer in enumerate(self.layers) for name, t in layer.params().items()}

    def graph(self, loss: Loss | None = None, name: str = "sequential", prediction: bool = False) -> Graph:
        """The IR of the forward pass (output: the prediction), or of the loss with `loss`
        (then `prediction=True` returns the prediction too, as a second output)."""
        g = Graph(name)
        x = g.input("x", (None, self.in_features), self._dtype())
        h = x
        for k, layer in enumerate(self.layers):
            with g.scope(f"{k}:{type(layer).__name__}"):
                h = layer.forward(g, h, f"{k}.")
        if loss is None:
            g.output(h)
            return g
        if not isinstance(loss, Loss):
            raise GraphError(f"loss must be a graphdl loss such as gd.MSE(), got {loss!r}")
        y = g.input("y", (None, self.out_features), self._dtype())
        with g.scope("loss"):
            g.output(loss(h, y))
        if prediction:
            g.output(h)
        return g

    def _dtype(self) -> torch.dtype:
        params = list(self.parameters().values())
        return params[0].dtype if params else torch.float32

    def to(self, device: torch.device | str) -> Sequential:
        """Move the params to `device` (compiled functions are rebuilt on next use)."""
        try:  # a bad or absent device fails here, before any layer has moved
            torch.empty(0, device=device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device {device!r} cannot hold the model: {e}") from None
        for layer in self.layers:
            layer.to(device)
        self._cache.clear()
        return self

    def config(self) -> list[dict[str, Any]]:
        """The architecture as JSON-able dicts, for model files."""
        return [layer.config() for layer in self.layers]

    @classmethod
    def from_config(cls, config: list[dict[str, Any]]) -> Sequential:
        """A model of this architecture with freshly initialised params."""
        layers = []
        for k, spec in enumerate(config):
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in LAYERS:
                raise GraphError(f"layer {k}: unknown layer type {kind!r}; known: {', '.join(LAYERS)}")
            args = {key: v for key, v in spec.items() if key != "type"}
            if "dtype" in args:
                args["dtype"] = getattr(torch, str(args["dtype"]))
            try:
                layers.append(LAYERS[kind](**args))
            except TypeError as e:
                raise GraphError(f"layer {k} ({kind}): bad settings {args}: {e}") from None
            except ValueError as e:
                raise GraphError(f"layer {k} ({kind}): {e}") from None
        return cls(*layers)

    def fit(self, X: torch.Tensor, Y: torch.Tensor, **kwargs: Any) -> Any:
        """Train in place; see `graphdl.train.fit` for the arguments. Returns the History."""
        from .train import fit
        return fit(self, X, Y, **kwargs)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """The model's output for X [N, in_features]: a tensor [N, out_features]."""
        from .train import predict
        return predict(self, X)

    def evaluate(self, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None) -> dict[str, float]:
        """{"loss", "accuracy", "error"} of the model on (X, Y)."""
        from .train import evaluate
        return evaluate(self, X, Y, loss)

    def save(self, path: str) -> None:
        """Write the model (IR text, layer config, weights as safetensors) atomically."""
        from .io import save_model
        save_model(self, path)

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({k}) {layer!r}" for k, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)" if inner else "Sequential()"
