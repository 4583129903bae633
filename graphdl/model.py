"""Models: `Sequential`, layers applied in order and compiled to one graph, with the
methods users train and use it by (fit, predict, evaluate, save, to_torch), and `load`,
which reads one back from its file.

This module sits on top of the others: it builds its graph from the layers
(graphdl.layers) and hands itself to the training loop (graphdl.train), the files
(graphdl.io) and PyTorch interop (graphdl.interop), none of which imports it: they take
any object with the model's methods (`graph`, `parameters`, `state`, `binding`,
`compiled`, ...), so the dependencies run one way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from . import distributed, interop, io, train
from .callbacks import Callback
from .checks import GraphError, Shape, flag, format_shape, read_shape, whole
from .ir import Graph, Value
from .layers import DTYPES_BY_NAME, LAYERS, Build, Layer, keeps_rows_apart, same_memory
from .losses import Loss
from .optim import Optimizer, Schedule
from .step import NEXT
from .train import History
from .viz import mimebundle


def finish_graph(g: Graph, h: Value, loss: Loss | None, prediction: bool, updates: dict[str, Value],
                 dtype: torch.dtype) -> Graph:
    """A model's graph completed from its prediction `h`: output h, or with `loss` the loss
    of h against a target "y" (and h too with `prediction`), then the buffers' next values,
    each labelled "next/{name}" (what Sequential's and Model's `graph` share)."""
    if loss is None:
        g.output(h)
    else:
        if not isinstance(loss, Loss):
            raise GraphError(f"loss must be a graphdl loss such as gd.MSE(), got {loss!r}")
        y = g.input("y", loss.target_shape(h.shape), dtype)
        with g.scope("loss"):
            g.output(loss(h, y))
        if prediction:
            g.output(h)
    for buffer, value in updates.items():
        g.output(value, label=NEXT + buffer)
    return g


class Sequential:
    """Layers applied in order, compiled to one graph.

    The layer at position k owns params "{k}.weight" and "{k}.bias". `graph(loss)` builds
    the IR with inputs "x" (and "y" with a loss), each node tagged with its layer's scope
    "{k}:{Type}"; `fit`, `predict` and `evaluate` compile that graph once and reuse it.
    """

    @property
    def rows_apart(self) -> bool:
        """Whether, in inference, each row of the output comes from that row of X alone, so
        that a whole data set may run in chunks of rows (`train.chunk_rows`): when every
        layer says so (`Layer.rows_apart`; every built-in one does). A functional model,
        whose ops may mix rows, does not say so."""
        return all(keeps_rows_apart(layer) for layer in self.layers)

    def __init__(self, *layers: Layer, input_shape: Sequence[int] | None = None) -> None:
        self.layers: list[Layer] = []
        self.loss: Loss | None = None  # set by fit (or load): evaluate's and fit's default
        self.history: History | None = None  # the last fit's History, kept if it stops early
        self.stop_training = False  # a callback sets it to end fit after the epoch (as in Keras)
        self._cache: dict[Any, Any] = {}  # compiled functions by purpose (see `compiled`)
        self._signature: tuple = ()  # the layers and their tensors' shapes, dtypes, devices the cache is for
        self._input_shape = None if input_shape is None else _check_input_shape(input_shape)
        for layer in layers:
            self.add(layer)

    def add(self, layer: Layer) -> Sequential:
        """Append a layer; it must take the shape of what the layers before it give."""
        if not isinstance(layer, Layer):
            raise GraphError(f"Sequential.add takes a layer such as gd.Linear(25, 1), got {layer!r}")
        shape, source = self._shape_so_far()
        if shape is not None:
            try:
                layer.output_shape(shape)
            except GraphError as e:
                raise self._mismatch(len(self.layers), layer, shape, source, e) from None
        self.layers.append(layer)
        self._cache.clear()
        return self

    def _mismatch(self, k: int, layer: Layer, shape: Shape, source: int, error: GraphError) -> GraphError:
        given = f"layer {source} ({self.layers[source]!r}) gives" if source >= 0 else "the model's input is"
        if layer.in_features is not None and shape and shape[-1] != layer.in_features:
            width = shape[-1]
            message = (f"layer {k} ({layer!r}) takes {layer.in_features} features but {given} {width}; make "
                       f"layer {k} {type(layer).__name__}({width}, ...) or change "
                       f"{f'layer {source}' if source >= 0 else 'input_shape'}")
        else:
            message = (f"layer {k} ({layer!r}) cannot take what {given.removesuffix(' is')}: examples of shape "
                       f"{format_shape(shape)}: {error}")
        if self._input_shape is None and any(not (lay.keeps_shape or lay.in_features) for lay in self.layers):
            message += (f"\n  hint: the model takes examples of shape {format_shape(self.input_shape)}, as its layers "
                        "declare; if they have another shape, give it as input_shape= (to gd.Sequential or "
                        "gd.from_torch)")
        return GraphError(message)

    def _shape_so_far(self) -> tuple[Shape | None, int]:
        """The shape of one example after the layers so far (None while the input's shape is
        unknown) and the index of the last layer that set it (-1: the input)."""
        shape = self._input(required=False)[0]
        if shape is None:
            return None, -1
        source = -1
        for k, layer in enumerate(self.layers):
            out = layer.output_shape(shape)
            if out != shape or layer.out_features is not None:
                source = k
            shape = out
        return shape, source

    def _input(self, required: bool = True) -> tuple[Shape | None, torch.dtype | None]:
        """The shape of one example the model takes and its dtype (None: the model's). The
        shape is `input_shape=`, else what the first layer that says declares (layers
        that keep any shape are looked past); None, or with `required` a GraphError, if
        no layer says."""
        dtype = None
        for layer in self.layers:
            if layer.input_dtype is not None or not layer.passes_dtype:
                dtype = layer.input_dtype
                break
        if self._input_shape is not None:
            return self._input_shape, dtype
        for k, layer in enumerate(self.layers):
            shape = layer.input_shape()
            if shape is not None:
                return tuple(shape), dtype
            if not layer.keeps_shape:
                if not required:
                    return None, dtype
                raise GraphError(f"the shape of the model's input is unknown: layer {k} ({layer!r}) comes first and "
                                 "takes examples of any shape; give the shape of one example (the batch dim left out), "
                                 "e.g. gd.Sequential(..., input_shape=(1, 28, 28))")
        if not required:
            return None, dtype
        raise GraphError("this Sequential has no Linear layer, so its input width is unknown; add gd.Linear(i, o), "
                         "or give the shape of one example: gd.Sequential(..., input_shape=(...))")

    @property
    def input_shape(self) -> Shape:
        """The shape of one example the model takes, the batch dim left out: (2,) for rows of
        2 features, (L,) for sequences of L indices into an Embedding."""
        return self._input()[0]

    @property
    def output_shape(self) -> Shape:
        """The shape of one example the model gives, the batch dim left out."""
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    @property
    def in_features(self) -> int:
        """The width of the rows the model takes (for a model whose examples are rows)."""
        shape = self.input_shape
        if len(shape) != 1:
            raise GraphError(f"this model takes examples of shape {format_shape(shape)}, not rows of features; "
                             "see its input_shape")
        return shape[0]

    @property
    def out_features(self) -> int:
        """The width of the rows the model gives (for a model whose outputs are rows)."""
        shape = self.output_shape
        if len(shape) != 1:
            raise GraphError(f"this model gives examples of shape {format_shape(shape)}, not rows of outputs; "
                             "see its output_shape")
        return shape[0]

    def layer_inputs(self) -> list[tuple[int, Layer, Shape]]:
        """Each layer with the shape of one example it is given (the batch dim left out), in order."""
        shape, shapes = self.input_shape, []
        for k, layer in enumerate(self.layers):
            shapes.append((k, layer, shape))
            shape = layer.output_shape(shape)
        return shapes

    def check_input(self, X: Any, what: str = "X") -> None:
        """Refuse what the first layer to read the input cannot take (an index outside an
        Embedding's table), naming the layer; shapes and dtypes are the compiled graph's to check."""
        if not isinstance(X, torch.Tensor):
            return
        for k, layer in enumerate(self.layers):
            layer.check_input(X, what, f"layer {k}")
            if not layer.passes_dtype:
                break

    # -- the tensors, each once ----------------------------------------------------------
    #
    # A tensor held in several places (a tied weight: `l2.weight = l1.weight`) is one
    # param, named after its first place in build order: listed once, one value in the
    # IR (its gradients add up), trained, decayed and saved once. `same_memory` says when
    # two places hold one tensor.

    def places(self) -> list[tuple[str, Layer, str, bool, torch.Tensor]]:
        """(name, layer, short name, trainable, tensor) for every tensor every layer holds, in build order."""
        return [(f"{k}.{short}", layer, short, p.trainable, layer.slot(short).tensor)
                for k, layer in enumerate(self.layers) for short, p in layer.declared()]

    def owners(self, places: list[tuple[str, Layer, str, bool, torch.Tensor]] | None = None) -> dict[str, str]:
        """Each place's name -> the name of the first place holding the same tensor (itself if none)."""
        first: dict[Hashable, tuple[str, bool]] = {}
        owners: dict[str, str] = {}
        for name, _, _, trainable, t in self.places() if places is None else places:
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
        return {name: owner for name, owner in self.owners().items() if owner != name}

    def parameters(self) -> dict[str, torch.Tensor]:
        """Trainable params by name ("0.weight", "0.bias", ...), in build order, each tensor
        once (a tied one under its first place's name): the live tensors that `fit`
        differentiates and updates."""
        places = self.places()
        owners = self.owners(places)
        return {name: t for name, _, _, trainable, t in places if trainable and owners[name] == name}

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the model holds, by name in build order, each once: the trainable
        params and the non-trainable buffers (Standardize's "{k}.mean", "{k}.std"). What a
        model file stores (with `ties`, so that a tie comes back on load)."""
        places = self.places()
        owners = self.owners(places)
        return {name: t for name, _, _, _, t in places if owners[name] == name}

    def graph(self, loss: Loss | None = None, name: str = "sequential", prediction: bool = False,
              training: bool = False) -> Graph:
        """The IR of the forward pass (output: the prediction), or of the loss with `loss`
        (then `prediction=True` returns the prediction too, as a second output).

        `training=True` builds the graph in training mode, the one `fit` differentiates:
        Dropout drops and BatchNorm uses the batch's statistics, and after the outputs
        above come the next values of the buffers the layers update (BatchNorm's running
        statistics, Dropout's key), each labelled "next/{name}" (see graphdl.step).
        Without it, the graph is in inference mode, as `predict` and `evaluate` run it."""
        places = self.places()
        owners = self.owners(places)
        slots = {name: layer.slot(short) for name, layer, short, _, _ in places}
        g = Graph(name)
        shape, dtype = self._input()
        x = g.input("x", (None, *shape), dtype or self.dtype())
        layers = tuple(self.layers)
        g.stale = lambda: None if tuple(self.layers) == layers else \
            "its model's layers have changed since (a layer was replaced, added or removed); build it again"
        h = x
        updates: dict[str, Value] = {}
        for k, layer in enumerate(layers):
            with g.scope(f"{k}:{type(layer).__name__}"):
                h = layer.forward(Build(g, f"{k}.", owners, slots, flag("training", training), updates), h)
        return finish_graph(g, h, loss, prediction, updates, self.dtype())

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
        places = self.places()
        owners = self.owners(places)
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
        places = self.places()
        signature = self._structure(places, self.owners(places))
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
        for name, layer, short, _, t in self.places():
            declared = getattr(type(layer), short)  # the Param itself
            expected = declared.shape(layer) if declared.shape is not None else None
            if expected is not None and None not in expected and tuple(t.shape) != expected:
                raise GraphError(f"{name} ({layer!r}.{short}) is now {list(t.shape)}, but the layer declares "
                                 f"{list(expected)}; it was changed behind the layer's back (`.data = t`?): "
                                 f"assign a tensor of shape {list(expected)}, or build a layer of the new size")

    def dtype(self) -> torch.dtype:
        """The dtype of the model's tensors (its first tensor's, of those in the model's dtype, not
        Dropout's f64 key; float32 with none): its inputs' dtype."""
        owners = self.owners()
        for name, layer, short, _, t in self.places():
            if owners[name] == name and getattr(type(layer), short).model_dtype:
                return t.dtype
        return torch.float32

    def to(self, device: torch.device | str) -> Sequential:
        """Move the params to `device` (compiled functions are rebuilt on next use)."""
        try:  # a bad or absent device fails here, before any layer has moved
            torch.empty(0, device=device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device {device!r} cannot hold the model: {e}") from None
        moved: dict[Hashable, torch.Tensor] = {}
        for _, layer, short, _, t in self.places():  # a tied tensor moves once, and stays tied
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
    def from_config(cls, config: list[dict[str, Any]], input_shape: Sequence[int] | None = None) -> Sequential:
        """A model of this architecture with freshly initialised params (taking examples of
        `input_shape`, if given)."""
        return cls(*(layer_from_config(k, spec) for k, spec in enumerate(config)), input_shape=input_shape)

    def fit(self, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None, optimizer: Optimizer | None = None,
            schedule: Schedule | None = None, epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            validation_data: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int | None = None,
            verbose: bool = True, metrics: list[str] | None = None, threads: int | None = None,
            distributed: bool = False, checkpoint: str | os.PathLike[str] | None = None,
            resume: str | os.PathLike[str] | None = None, callbacks: list[Callback] | None = None,
            validation_split: float = 0.0, clip_norm: float | None = None, clip_value: float | None = None,
            accumulate: int = 1, sample_weight: torch.Tensor | None = None,
            class_weight: dict[int, float] | None = None, monitor: list[str] | None = None) -> History:
        """Train the model in place with minibatch gradient descent.

        Args:
            X: training inputs [N, in_features].
            Y: targets [N, out_features], or integer class labels [N]: 0 to C-1 for a
                model with C > 1 outputs (read as one-hot rows), 0 or 1 for one output.
            loss: a graphdl loss; default the model's `loss` (the last fit's, or the one
                saved in its model file), else `MSE()`. `fit` records it in `model.loss`.
            optimizer: a graphdl optimizer (`SGD`, `Adam`, `AdamW`, `RMSprop`, `Adagrad`, with
                per-param `groups` if wanted); default `SGD(lr=0.01)`.
            schedule: sets the learning rate each epoch from the optimizer's base rate,
                e.g. `CosineDecay(epochs)`, or each step (a schedule whose `per` is
                "step": `LinearWarmup`, `OneCycle`, `CosineDecay(steps=...)`,
                `PerStep(fn)`); default the base rate throughout.
            epochs: passes over the data (>= 0).
            batch_size: examples per step (>= 1); the last batch may be smaller.
            shuffle: reshuffle the examples every epoch.
            validation_data: (X_val, Y_val), evaluated after every epoch; (X_val, Y_val,
                weights) weighs val_loss by example, as sample_weight does the loss.
            validation_split: instead of validation_data, hold out this last fraction of
                the rows of X and Y (in [0, 1), as Keras: not shuffled first).
            seed: seeds the shuffling; None draws one from torch's global RNG.
            verbose: print one line per epoch.
            metrics: what to measure after each epoch, from "accuracy", "precision",
                "recall", "f1", "auc", "top_k_accuracy" (k=2; "top_5_accuracy"...), "mse",
                "mae", "r2", as scikit-learn computes them (graphdl.metrics says where not);
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
            resume: a checkpoint to continue from: its weights, optimizer state, shuffling
                state, History and epoch count; `epochs` counts the epochs it already did.
            callbacks: `gd.Callback`s called at the start and end of training and of each
                epoch with its logs (EarlyStopping, ModelCheckpoint, ReduceLROnPlateau,
                CSVLogger, LambdaCallback, TensorBoard); one may stop the run.
            clip_norm: scale each update's gradients by min(1, clip_norm / (norm + 1e-6)),
                norm their global L2 norm (PyTorch's clip_grad_norm_); None: no clipping.
            clip_value: clamp each gradient element to [-clip_value, clip_value], before
                clip_norm (PyTorch's clip_grad_value_); None: no clipping.
            accumulate: batches per update (>= 1): the gradients of each group of this
                many batches are averaged by rows, so that for a mean loss the update is
                that of one batch of accumulate * batch_size rows (the epoch's last
                group may be shorter). Rates and per-step schedules count updates.
            sample_weight: each example's weight in the loss, a 1-d tensor [N] (as Keras:
                the mean over every element of weight * term; the metrics are not weighted).
            class_weight: {class: weight}, multiplying each example's weight by its class's
                (integer labels, one-hot rows, or 0/1 for one output; a class left out
                weighs 1).
            monitor: gradient health per layer, each epoch, from "grad_norm" (the
                batch gradients' L2 norm, before clipping), "update_ratio" (the update's
                ‖Δw‖/‖w‖, as the optimizer made it) and "dead_relu": History (and the
                callbacks' logs) get e.g. "grad_norm/2:Linear" (see graphdl.monitor).
                Computed on the device and read with the loss, once per epoch; one
                process only (not with distributed=True); the step is not captured.

        Returns:
            The `History`: per-epoch lists "loss", each metric, "val_loss", "val_<metric>"
            and "lr". Also kept as `model.history`, even when training stops early.

        Raises:
            ValueError: a bad argument, named. DivergedError: the loss stopped being finite.
        """
        settings = train.FitSettings.check(
            self, loss=loss, optimizer=optimizer, schedule=schedule, epochs=epochs, batch_size=batch_size,
            shuffle=shuffle, validation_data=validation_data, seed=seed, verbose=verbose, metrics=metrics,
            threads=threads, distributed=distributed, checkpoint=checkpoint, resume=resume, callbacks=callbacks,
            validation_split=validation_split, clip_norm=clip_norm, clip_value=clip_value, accumulate=accumulate,
            sample_weight=sample_weight, class_weight=class_weight, monitor=monitor)
        self.check_input(X)
        if settings.validation_data is not None:
            self.check_input(settings.validation_data[0], "X_val")
        return train.fit(self, X, Y, settings)

    def predict(self, X: torch.Tensor, threads: int | None = None, distributed: bool = False) -> torch.Tensor:
        """The model's output for X [N, in_features]: a tensor [N, out_features] (logits,
        for a classifier trained with BCEWithLogits or CrossEntropy). On the CPU, X runs
        in chunks of rows that fit the core's caches (as do evaluate and fit's metrics;
        see docs/performance.md): the same numbers, to float rounding, as one pass.

        Args:
            X: the inputs.
            threads: torch CPU threads for the call, as for `fit`.
            distributed: in a data-parallel job, each rank computes its share of the rows
                and every rank gets them all (see `graphdl.distributed`).
        """
        self.check_input(X)
        return train.predict(self, X, threads, distributed)

    def evaluate(self, X: torch.Tensor, Y: torch.Tensor, loss: Loss | None = None,
                 metrics: list[str] | None = None, threads: int | None = None,
                 distributed: bool = False, sample_weight: torch.Tensor | None = None) -> dict[str, float]:
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
            sample_weight: each example's weight in the loss, as for `fit`.

        Returns:
            {"loss": the loss, one entry per metric, and "error" (1 - accuracy) when
            accuracy is measured}.
        """
        self.check_input(X)
        return train.evaluate(self, X, Y, loss, metrics, threads, distributed, sample_weight)

    def to_torch(self) -> Any:
        """A torch `nn.Sequential` with copies of this model's weights (see `graphdl.interop.to_torch`)."""
        return interop.to_torch(self)

    _summary_title = "Sequential model"  # summary's first line (graphdl.functional's Model names itself)

    def summary(self, print_fn: Callable[[str], Any] | None = print) -> str:
        """Print (with `print_fn`; None: don't) and return a table of the layers: each one's
        output shape (from the IR: "N" is the batch), its parameter count and its ties, then
        the totals of trainable params and non-trainable buffers (Standardize's mean and
        std), each tied tensor counted once, in its first place."""
        shapes = self._output_shapes()
        state, trainable, ties = self.state(), self.parameters(), self.ties()
        rows = [("layer", "output shape", "params")]
        for k, layer in enumerate(self.layers):
            count = sum(t.numel() for name, t in state.items() if name.startswith(f"{k}."))
            tied = [f"{name} is {owner}" for name, owner in ties.items() if name.startswith(f"{k}.")]
            rows.append((f"{k}: {type(layer).__name__}", shapes[k], f"{count:,}" + (f" ({', '.join(tied)})"
                                                                                     if tied else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [self._summary_title] + [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
        total = sum(t.numel() for t in state.values())
        trained = sum(t.numel() for t in trainable.values())
        lines += [f"Total params: {total:,}", f"Trainable params: {trained:,}",
                  f"Non-trainable params: {total - trained:,}"]
        if ties:
            lines.append(f"Tied: {len(ties)} place(s) share a tensor with an earlier one, counted once")
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    def _output_shapes(self) -> list[str]:
        """Each layer's output shape, read off the IR of the forward pass: the shape of the
        last node built in the layer's scope (the input's, for a layer that builds none)."""
        g = self.graph()
        last = {node.scope: node.out.shape for node in g.nodes}
        shape = g.inputs["x"].shape
        shapes = []
        for k, layer in enumerate(self.layers):
            shape = last.get(f"{k}:{type(layer).__name__}", shape)
            shapes.append(format_shape(shape))
        return shapes

    def save(self, path: str) -> None:
        """Write the model (IR text, layer config, weights as safetensors) atomically.

        In a data-parallel job only rank 0 writes (every rank holds the same weights);
        on the others this does nothing, so no two processes write one file."""
        if distributed.is_main():
            io.save_model(self, path)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """Jupyter shows the forward graph's drawing (when Graphviz's `dot` is installed) and the repr."""
        try:
            graph = self.graph()
        except GraphError:  # not buildable yet (no layers, Standardize not adapted): the repr alone
            return {"text/plain": repr(self)}
        return mimebundle(graph, repr(self))

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({k}) {layer!r}" for k, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)" if inner else "Sequential()"


def layer_from_config(k: int, spec: Any) -> Layer:
    """Layer k of a model file's layer list (`layer.config()`), freshly initialised."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in LAYERS:
        raise GraphError(f"layer {k}: unknown layer type {kind!r}; known: {', '.join(LAYERS)}")
    args = {key: v for key, v in spec.items() if key != "type"}
    if "dtype" in args:  # by name, so that "float8_e4m3fn" or "Tensor" reach Linear's check, not getattr
        args["dtype"] = DTYPES_BY_NAME.get(str(args["dtype"]), args["dtype"])
    try:
        return LAYERS[kind](**args)
    except (TypeError, ValueError) as e:
        raise GraphError(f"layer {k} ({kind}): bad settings {args}: {e}") from None


def _check_input_shape(shape: Any) -> Shape:
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"input_shape must be the shape of one example, the batch dim left out, such as (12,) or "
                         f"(1, 28, 28), got {shape!r}")
    dims = tuple(whole(f"input_shape[{i}]", d, 1) for i, d in enumerate(shape))
    try:
        read_shape(dims, "input_shape", torch.float64)
    except GraphError as e:
        raise ValueError(str(e)) from None
    return dims


def load(path: str | os.PathLike[str]) -> Sequential:
    """Load a model saved with `model.save(path)` (or a checkpoint fit wrote).

    Args:
        path: the model file.

    Returns:
        A `gd.Sequential` with the saved layers, ties and bit-identical weights.

    Raises:
        GraphError: the file is missing, truncated, corrupt, not a graphdl model (a
            pickle, a zip, a bare graph, another program's safetensors file), or its
            weights do not match the shapes its IR declares.
    """
    return io.load_model(path, Sequential)[0]


def from_torch(module: Any, input_shape: Sequence[int] | None = None) -> Sequential:
    """A `gd.Sequential` computing what a torch `nn.Sequential` computes, with copies of its
    weights (see `graphdl.interop.torch_layers`, which maps each module). `input_shape`, the
    shape of one example without the batch dim, is needed where the modules do not say it
    (an Embedding of sequences, a Flatten first)."""
    model = Sequential(input_shape=input_shape)
    for where, layer in interop.torch_layers(module):
        try:
            model.add(layer)
        except GraphError as e:
            raise GraphError(f"from_torch: {where}: {e}") from None
    return model
