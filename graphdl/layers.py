"""Layers and the Sequential builder, which compiles a stack of layers to the IR."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from .checks import whole
from .ir import DTYPES, Graph, GraphError, Slot, Value, _check_dtype, check_param_tensor, read_shape, tensor_problem
from .losses import Loss
from .ops import add, div, matmul, relu, sigmoid, softmax, sub, tanh
from .optim import SGD, Schedule

if TYPE_CHECKING:
    from .train import History


class Param:
    """A layer attribute holding a param: reading it gives the live tensor; assigning a
    tensor (`layer.weight = t`) puts it in the param's `Slot`, so every graph and compiled
    function built from the layer computes with `t` from its next call on.

    `trainable=False` makes a buffer: a graph param that `fit` neither differentiates nor
    updates, such as Standardize's mean and std. `shape(layer)` gives the shape the layer
    declares for it (None where it is not known yet): a tensor of another shape is refused
    where it is assigned, not found later as a model that computes something else."""

    def __init__(self, trainable: bool = True,
                 shape: Callable[[Any], tuple[int | None, ...]] | None = None) -> None:
        self.trainable = trainable
        self.shape = shape

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Layer | None, owner: type | None = None) -> Any:
        return self if layer is None else layer.slot(self.name).tensor

    def __set__(self, layer: Layer, tensor: torch.Tensor) -> None:
        check_param_tensor(f"{type(layer).__name__}.{self.name}", tensor)
        expected = self.shape(layer) if self.shape is not None else None
        if expected is not None and None not in expected and tuple(tensor.shape) != expected:
            hint = ""
            if tensor.dim() == 2 and tuple(tensor.shape) == expected[::-1]:
                hint = "; did you mean to transpose it (tensor.T)? PyTorch's Linear stores its weight as [out, in]"
            raise GraphError(f"{layer!r}.{self.name} must have shape {list(expected)}, got {list(tensor.shape)}"
                             f"{hint}")
        slots = layer.__dict__.setdefault("_slots", {})
        if self.name in slots:
            slots[self.name].tensor = tensor
        else:
            slots[self.name] = Slot(tensor)


class Layer:
    """A building block: owns its tensors and emits the IR of its forward pass."""

    in_features: int | None = None  # None: keeps the width it is given
    out_features: int | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """The layer's trainable params by short name ("weight", "bias"), live tensors."""
        return {name: getattr(self, name) for name, p in self._declared() if p.trainable}

    def buffers(self) -> dict[str, torch.Tensor]:
        """The layer's non-trainable tensors by short name (Standardize's "mean" and "std"):
        graph params that the optimizer never touches and `fit` does not differentiate."""
        return {name: getattr(self, name) for name, p in self._declared() if not p.trainable}

    def _declared(self) -> list[tuple[str, Param]]:
        """The Param attributes that hold a tensor, in declaration order (a subclass's after
        those it inherits)."""
        slots = self.__dict__.get("_slots", {})
        return [(name, p) for name, p in _params_of(type(self)) if name in slots]

    def slot(self, name: str) -> Slot:
        """Where param `name` lives; graphs built from the layer share it."""
        return self.__dict__["_slots"][name]

    def forward(self, build: Build, x: Value) -> Value:
        """The IR of the layer applied to `x`; its params come from `build.param(name)`."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__}

    def to(self, device: torch.device | str) -> None:
        for name, t in {**self.params(), **self.buffers()}.items():
            setattr(self, name, t.to(device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@functools.cache
def _params_of(cls: type) -> tuple[tuple[str, Param], ...]:
    """A layer class's Param attributes, inherited ones first (cached: walking the classes'
    dicts took 5 µs a layer, paid by every `parameters()` and every predict)."""
    declared: dict[str, Param] = {}
    for base in reversed(cls.__mro__):
        declared.update((name, p) for name, p in vars(base).items() if isinstance(p, Param))
    return tuple(declared.items())


def same_memory(t: torch.Tensor) -> Hashable:
    """What makes two tensors one param: the same elements of the same memory (one tensor
    assigned in two places, or a view of the whole of it). A meta or empty tensor has no
    memory to share, so it is only itself."""
    if t.is_meta or not t.numel():
        return id(t)
    return t.data_ptr(), t.stride(), t.shape, t.dtype, t.device


class Build:
    """What a layer's `forward` builds with: the graph and the layer's params.

    `param("weight")` is the graph param holding the layer's weight, declared on first
    use under its model-wide name ("2.weight"). A tensor that an earlier place already
    holds (a tied weight, `l2.weight = l1.weight`) is that place's param: one value in
    the IR, so its gradients add up and it is trained, decayed and saved once."""

    def __init__(self, graph: Graph, prefix: str, owners: dict[str, str], slots: dict[str, Slot]) -> None:
        self.graph, self.prefix = graph, prefix
        self._owners, self._slots = owners, slots

    def param(self, name: str) -> Value:
        owner = self._owners[self.prefix + name]
        known = self.graph.params.get(owner)
        return known if known is not None else self.graph.param(owner, self._slots[owner])


def _check_width(name: str, value: int) -> int:
    return whole(name, value, 1, 2**63 - 1)  # torch cannot even describe a wider tensor (its sizes are int64)


class Linear(Layer):
    """x @ weight + bias, with weight [in_features, out_features] and bias [out_features].

    Both start uniform in (-1/sqrt(in_features), 1/sqrt(in_features)), PyTorch's default,
    drawn from `generator` or torch's global RNG.
    """

    weight = Param(shape=lambda layer: (layer.in_features, layer.out_features))
    bias = Param(shape=lambda layer: (layer.out_features,))

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.in_features = _check_width("in_features", in_features)
        self.out_features = _check_width("out_features", out_features)
        _check_dtype("Linear", dtype)  # only what the IR supports: a float8 or int weight fails here, not in torch
        read_shape((self.in_features, self.out_features), "Linear's weight", dtype)  # else torch fails to describe it
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        bound = 1.0 / math.sqrt(in_features)
        try:  # in place, so that a big layer needs its own size in memory, not three times it
            self.weight = torch.rand(in_features, out_features, generator=generator, dtype=dtype).mul_(2).sub_(1) \
                .mul_(bound)
            self.bias = torch.rand(out_features, generator=generator, dtype=dtype).mul_(2).sub_(1).mul_(bound)
        except RuntimeError as e:  # torch.OutOfMemoryError is one too
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            size = in_features * out_features * dtype.itemsize / 2**30
            raise ValueError(f"Linear({in_features}, {out_features}) needs {size:.3g} GiB for its {dtype} weight, "
                             "more than this machine can allocate; use smaller widths") from None

    def forward(self, build: Build, x: Value) -> Value:
        return add(matmul(x, build.param("weight")), build.param("bias"))

    def config(self) -> dict[str, Any]:
        return {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    """max(x, 0)."""

    def forward(self, build: Build, x: Value) -> Value:
        return relu(x)


class Tanh(Layer):
    """Hyperbolic tangent."""

    def forward(self, build: Build, x: Value) -> Value:
        return tanh(x)


class Sigmoid(Layer):
    """1 / (1 + exp(-x))."""

    def forward(self, build: Build, x: Value) -> Value:
        return sigmoid(x)


class Softmax(Layer):
    """exp(x) / sum(exp(x)) over the features: rows of class probabilities. Train a
    classifier on its logits with gd.CrossEntropy(), then add Softmax to output probabilities."""

    def forward(self, build: Build, x: Value) -> Value:
        return softmax(x)


class Standardize(Layer):
    """(x - mean) / std per feature, with the mean and std of the data given to `adapt`.

    Put it first in a model so that the model file holds every step from raw input to
    prediction. mean and std are graph params ("{k}.mean", "{k}.std": shown in the IR,
    saved in model files) but not trainable: `fit` leaves them alone, and
    `Sequential.parameters()` does not list them (`Sequential.state()` does).

    Args:
        features: the number of input features; None until `adapt` sees data. Given,
            the layer starts as the identity (mean 0, std 1).
        dtype: the dtype of mean and std, the model's dtype.
    """

    mean = Param(trainable=False, shape=lambda layer: (layer.in_features,))
    std = Param(trainable=False, shape=lambda layer: (layer.in_features,))

    def __init__(self, features: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        _check_dtype("Standardize", dtype)
        self._dtype = dtype  # until it holds statistics; then theirs
        if features is not None:
            self.in_features = self.out_features = _check_width("features", features)
            self.mean, self.std = torch.zeros(features, dtype=dtype), torch.ones(features, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of mean and std (as assigned, e.g. converted to float64), or the
        constructor's before `adapt`: what `adapt` computes into and `config` records."""
        slots = self.__dict__.get("_slots", {})
        return slots["mean"].tensor.dtype if "mean" in slots else self._dtype

    def adapt(self, X: torch.Tensor) -> Standardize:
        """Set mean and std to those of X [examples, features], per feature (the population
        std, as Keras and scikit-learn use). A constant feature (std 0) gets std 1, so it is
        centred, never divided by zero. Adapting again replaces the live tensors, so a model
        that holds this layer uses the new values from its next call on, trained or not.

        Returns:
            The layer, so that `gd.Standardize().adapt(X)` can go straight into a Sequential.
        """
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or len(X) == 0:
            got = f"shape {list(X.shape)}" if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"adapt: X must be a 2-d torch.Tensor [examples, features] with at least one "
                             f"example, got {got}")
        problem = tensor_problem(X) or ("is on the meta device, which holds no values" if X.is_meta else None) \
            or ("is complex; the statistics are of real numbers" if X.is_complex() else None)
        if problem:
            raise ValueError(f"adapt: X {problem}")
        if self.in_features is not None and X.shape[1] != self.in_features:
            raise ValueError(f"adapt: X has {X.shape[1]} features but this Standardize takes {self.in_features}")
        data = X.detach().to("cpu", torch.float64)  # statistics in float64, whatever the data's dtype
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            row, col = (~finite).nonzero()[0].tolist()
            raise ValueError(f"adapt: X has NaN or inf values, first at X[{row}, {col}] = {X[row, col].item()}; "
                             "drop or repair those examples before adapting")
        mean, std = _mean_and_std(data)
        # A std at the level of the float64 rounding noise of summing n values of this mean
        # is a constant feature, as scikit-learn judges it (relative to the mean: a feature
        # of 3e-5 +- 1e-6 is scaled, not left alone).
        constant = std <= len(data) * torch.finfo(torch.float64).eps * mean.abs()
        std = torch.where(constant, torch.ones_like(std), std)
        _check_statistics(mean, std, self.dtype)
        device = self.mean.device if self.in_features is not None else X.device
        self.in_features = self.out_features = X.shape[1]
        self.mean, self.std = mean.to(device, self.dtype), std.to(device, self.dtype)
        return self

    def forward(self, build: Build, x: Value) -> Value:
        if self.in_features is None:
            raise GraphError("Standardize has no statistics yet; call .adapt(X) on the training inputs first, "
                             "or give features= to start from the identity")
        return div(sub(x, build.param("mean")), build.param("std"))

    def config(self) -> dict[str, Any]:
        # From the tensors, not the constructor's arguments: a model converted by assigning
        # float64 statistics must be described as float64, or its file would not load.
        return {"type": "Standardize", "features": self.in_features, "dtype": str(self.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"Standardize({self.in_features})" if self.in_features is not None else "Standardize()"


def _mean_and_std(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's mean and population std, in float64 without overflow: the columns are
    scaled by their largest magnitude first, so no square exceeds 1 (data of size 1e160
    squared directly is inf, which made the std inf and mapped the feature to 0)."""
    scale = data.abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = data / scale
    return unit.mean(0) * scale, unit.std(0, correction=0) * scale


def _check_statistics(mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse statistics that `dtype` would turn into inf (or a std it would turn into 0:
    a division by zero), naming the feature. A mean that rounds to 0 only centres a little
    less exactly."""
    for what, values in (("mean", mean), ("std", std)):
        held = values.to(dtype)
        bad = (~torch.isfinite(held) | ((held == 0) & (what == "std"))).nonzero()
        if len(bad):
            k = int(bad[0])
            becomes = "0" if bool(torch.isfinite(held[k])) else "inf"
            raise ValueError(f"adapt: feature {k} has {what} {float(values[k]):.3g}, which {dtype} cannot hold "
                             f"(it becomes {becomes}); rescale that feature or use a wider dtype")


LAYERS: dict[str, type[Layer]] = {cls.__name__: cls for cls in (Linear, ReLU, Tanh, Sigmoid, Softmax, Standardize)}
_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in DTYPES.values()}  # as config() writes them


class Sequential:
    """Layers applied in order, compiled to one graph.

    The layer at position k owns params "{k}.weight" and "{k}.bias". `graph(loss)` builds
    the IR with inputs "x" (and "y" with a loss), each node tagged with its layer's scope
    "{k}:{Type}"; `fit`, `predict` and `evaluate` compile that graph once and reuse it.
    """

    def __init__(self, *layers: Layer) -> None:
        self.layers: list[Layer] = []
        self.loss: Loss | None = None  # set by fit (or load): evaluate's and fit's default
        self.history: History | None = None  # the last fit's History, kept if it stops early
        self._cache: dict[Any, Any] = {}  # compiled functions by purpose (see `compiled`)
        self._signature: tuple = ()  # the layers and their tensors' shapes, dtypes, devices the cache is for
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

    # -- the tensors, each once ----------------------------------------------------------
    #
    # A tensor held in several places (a tied weight: `l2.weight = l1.weight`) is one
    # param, named after its first place in build order: listed once, one value in the
    # IR (its gradients add up), trained, decayed and saved once. `same_memory` says when
    # two places hold one tensor.

    def _places(self) -> list[tuple[str, Layer, str, bool, torch.Tensor]]:
        """(name, layer, short name, trainable, tensor) for every tensor every layer holds, in build order."""
        return [(f"{k}.{short}", layer, short, p.trainable, layer.slot(short).tensor)
                for k, layer in enumerate(self.layers) for short, p in layer._declared()]

    def _owners(self, places: list[tuple[str, Layer, str, bool, torch.Tensor]] | None = None) -> dict[str, str]:
        """Each place's name -> the name of the first place holding the same tensor (itself if none)."""
        first: dict[Hashable, tuple[str, bool]] = {}
        owners: dict[str, str] = {}
        for name, _, _, trainable, t in self._places() if places is None else places:
            owner, trained = first.setdefault(same_memory(t), (name, trainable))
            if trained != trainable:
                kinds = ("a trained param", "a fixed buffer") if trained else ("a fixed buffer", "a trained param")
                raise GraphError(f"{name} holds the tensor that {owner} holds, but {owner} is {kinds[0]} and {name} "
                                 f"{kinds[1]}; give {name} its own tensor (e.g. .clone())")
            owners[name] = owner
        return owners

    def ties(self) -> dict[str, str]:
        """{place: the param it shares} for each tensor held in more than one place, e.g.
        {"2.weight": "0.weight"} after `model.layers[2].weight = model.layers[0].weight`."""
        return {name: owner for name, owner in self._owners().items() if owner != name}

    def parameters(self) -> dict[str, torch.Tensor]:
        """Trainable params by name ("0.weight", "0.bias", ...), in build order, each tensor
        once (a tied one under its first place's name): the live tensors that `fit`
        differentiates and updates."""
        places = self._places()
        owners = self._owners(places)
        return {name: t for name, _, _, trainable, t in places if trainable and owners[name] == name}

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the model holds, by name in build order, each once: the trainable
        params and the non-trainable buffers (Standardize's "{k}.mean", "{k}.std"). What a
        model file stores (with `ties`, so that a tie comes back on load)."""
        places = self._places()
        owners = self._owners(places)
        return {name: t for name, _, _, _, t in places if owners[name] == name}

    def graph(self, loss: Loss | None = None, name: str = "sequential", prediction: bool = False) -> Graph:
        """The IR of the forward pass (output: the prediction), or of the loss with `loss`
        (then `prediction=True` returns the prediction too, as a second output)."""
        places = self._places()
        owners = self._owners(places)
        slots = {name: layer.slot(short) for name, layer, short, _, _ in places}
        g = Graph(name)
        x = g.input("x", (None, self.in_features), self._dtype())
        layers = tuple(self.layers)
        g.stale = lambda: None if tuple(self.layers) == layers else \
            "its model's layers have changed since (a layer was replaced, added or removed); build it again"
        h = x
        for k, layer in enumerate(layers):
            with g.scope(f"{k}:{type(layer).__name__}"):
                h = layer.forward(Build(g, f"{k}.", owners, slots), h)
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

    def binding(self) -> tuple[tuple, tuple]:
        """(structure, memory): what compiled code built from the model depends on.

        structure: the layers themselves (not their ids, which a freed layer's successor
        may reuse), each tensor's shape, dtype and device, and the ties; a change needs a
        new graph. memory: where each tensor's elements are (address and strides); a
        change (`layer.weight.data = t`, a new tensor assigned) needs code that holds
        tensors or views of them (fit's arena, prepared transposes, planned updates) to
        bind again. Values changed in place (`.data.copy_()`, edits under no_grad) need
        neither: every compiled function reads the memory itself.
        """
        places = self._places()
        owners = self._owners(places)
        return self._structure(places, owners), tuple(same_memory(t) for name, *_, t in places if owners[name] == name)

    def _structure(self, places: list[tuple[str, Layer, str, bool, torch.Tensor]], owners: dict[str, str]) -> tuple:
        return tuple(self.layers), tuple((t.shape, t.dtype, t.device, owners[name]) for name, *_, t in places)

    def compiled(self, key: Any, build: Callable[[], Any]) -> Any:
        """The compiled function for `key` (such as ("predict",)), built by `build` once.

        Compiled functions read the params' live tensors, so a layer given a new tensor of
        the same shape, dtype and device keeps them; a different dtype or device, a new
        tie, or a change to `self.layers` itself (a layer replaced, added or removed)
        rebuilds them (see `binding`).
        """
        places = self._places()
        signature = self._structure(places, self._owners(places))
        if signature != self._signature:
            self._check_shapes()
            self._cache.clear()
            self._signature = signature
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = build()
        return fn

    def _check_shapes(self) -> None:
        """Each tensor has the shape its layer declares (`.data = t` can change it unseen)."""
        for name, layer, short, _, t in self._places():
            declared = getattr(type(layer), short)  # the Param itself
            expected = declared.shape(layer) if declared.shape is not None else None
            if expected is not None and None not in expected and tuple(t.shape) != expected:
                raise GraphError(f"{name} ({layer!r}.{short}) is now {list(t.shape)}, but the layer declares "
                                 f"{list(expected)}; it was changed behind the layer's back (`.data = t`?): "
                                 f"assign a tensor of shape {list(expected)}, or build a layer of the new size")

    def _dtype(self) -> torch.dtype:
        params = list(self.state().values())
        return params[0].dtype if params else torch.float32

    def to(self, device: torch.device | str) -> Sequential:
        """Move the params to `device` (compiled functions are rebuilt on next use)."""
        try:  # a bad or absent device fails here, before any layer has moved
            torch.empty(0, device=device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device {device!r} cannot hold the model: {e}") from None
        moved: dict[Hashable, torch.Tensor] = {}
        for _, layer, short, _, t in self._places():  # a tied tensor moves once, and stays tied
            key = same_memory(t)
            if key not in moved:
                moved[key] = t.to(device)
            setattr(layer, short, moved[key])
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
            if "dtype" in args:  # by name, so that "float8_e4m3fn" or "Tensor" reach Linear's check, not getattr
                args["dtype"] = _DTYPES_BY_NAME.get(str(args["dtype"]), args["dtype"])
            try:
                layers.append(LAYERS[kind](**args))
            except (TypeError, ValueError) as e:
                raise GraphError(f"layer {k} ({kind}): bad settings {args}: {e}") from None
        return cls(*layers)

    def fit(self, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None, optimizer: SGD | None = None,
            schedule: Schedule | None = None, epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            validation_data: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int | None = None,
            verbose: bool = True, metrics: list[str] | None = None, threads: int | None = None,
            distributed: bool = False, checkpoint: str | os.PathLike[str] | None = None,
            resume: str | os.PathLike[str] | None = None) -> History:
        """Train the model in place with minibatch SGD.

        Args:
            X: training inputs [N, in_features].
            Y: targets [N, out_features], or integer class labels [N]: 0 to C-1 for a
                model with C > 1 outputs (read as one-hot rows), 0 or 1 for one output.
            loss: a graphdl loss; default the model's `loss` (the last fit's, or the one
                saved in its model file), else `MSE()`. `fit` records it in `model.loss`.
            optimizer: an `SGD`; default `SGD(lr=0.01)`.
            schedule: sets the learning rate each epoch from the optimizer's base rate,
                e.g. `CosineDecay(epochs)`; default the base rate throughout.
            epochs: passes over the data (>= 0).
            batch_size: examples per step (>= 1); the last batch may be smaller.
            shuffle: reshuffle the examples every epoch.
            validation_data: (X_val, Y_val), evaluated after every epoch.
            seed: seeds the shuffling; None draws one from torch's global RNG.
            verbose: print one line per epoch.
            metrics: what to measure after each epoch, from "accuracy", "mse", "mae";
                default ["accuracy"] when Y holds class labels (0/1, one-hot rows, or
                probability rows with CrossEntropy), else none.
            threads: torch CPU threads while training; default one when a batch is small
                work (below `graphdl.train.SMALL_WORK` multiply-adds), else torch's own
                setting. Restored afterwards.
            distributed: train data-parallel over the process group of
                `gd.distributed.init()` (launched by torchrun): `batch_size` stays the
                global batch, each rank computes its share, and every rank ends with the
                params and History one process would have. Only rank 0 prints.
            checkpoint: a file to write after every epoch (rank 0 only): the model and
                fit's state, to continue from with `resume` (see graphdl.checkpoint).
            resume: a checkpoint to continue from: its weights, momentum, shuffling
                state, History and epoch count; `epochs` counts the epochs it already did.

        Returns:
            The `History`: per-epoch lists "loss", each metric, "val_loss", "val_<metric>"
            and "lr". Also kept as `model.history`, even when training stops early.

        Raises:
            ValueError: a bad argument, named. DivergedError: the loss stopped being finite.
        """
        from .train import fit
        return fit(self, X, Y, loss, optimizer, schedule, epochs, batch_size, shuffle, validation_data, seed,
                   verbose, metrics, threads, distributed, checkpoint, resume)

    def predict(self, X: torch.Tensor, threads: int | None = None, distributed: bool = False) -> torch.Tensor:
        """The model's output for X [N, in_features]: a tensor [N, out_features] (logits,
        for a classifier trained with BCEWithLogits or CrossEntropy).

        Args:
            X: the inputs.
            threads: torch CPU threads for the call, as for `fit`.
            distributed: in a data-parallel job, each rank computes its share of the rows
                and every rank gets them all (see `graphdl.distributed`).
        """
        from .train import predict
        return predict(self, X, threads, distributed)

    def evaluate(self, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
                 metrics: list[str] | None = None, threads: int | None = None,
                 distributed: bool = False) -> dict[str, float]:
        """Measure the model on (X, Y).

        Args:
            X, Y: inputs and targets, as for `fit`.
            loss: default the model's `loss`, else `MSE()`. It also says how accuracy
                reads a prediction: above 0.5 (MSE-style losses, one output), above 0
                (BCEWithLogits), the argmax (CrossEntropy, or several outputs).
            metrics: as for `fit`; default ["accuracy"] when Y holds class labels.
            threads: as for `fit`.
            distributed: in a data-parallel job, each rank scores its share of the rows
                and every rank gets the scores of them all (see `graphdl.distributed`).

        Returns:
            {"loss": the loss, one entry per metric, and "error" (1 - accuracy) when
            accuracy is measured}.
        """
        from .train import evaluate
        return evaluate(self, X, Y, loss, metrics, threads, distributed)

    def to_torch(self) -> Any:
        """A torch `nn.Sequential` with copies of this model's weights (see `graphdl.interop.to_torch`)."""
        from .interop import to_torch
        return to_torch(self)

    def save(self, path: str) -> None:
        """Write the model (IR text, layer config, weights as safetensors) atomically.

        In a data-parallel job only rank 0 writes (every rank holds the same weights);
        on the others this does nothing, so no two processes write one file."""
        from . import distributed
        from .io import save_model
        if distributed.is_main():
            save_model(self, path)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """Jupyter shows the forward graph's drawing (when Graphviz's `dot` is installed) and the repr."""
        from .viz import mimebundle
        try:
            graph = self.graph()
        except GraphError:  # not buildable yet (no layers, Standardize not adapted): the repr alone
            return {"text/plain": repr(self)}
        return mimebundle(graph, repr(self))

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({k}) {layer!r}" for k, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)" if inner else "Sequential()"
