"""The compiled training step, built one way for everything that trains: `fit` (in one
process or data-parallel, checkpointed or not) and the benchmark.

A `TrainStep` is forward, loss, backward and the optimizer's update. It runs the
gradient graph in its arena form (`lower(..., arena=True)`): every intermediate and
gradient lands in buffers planned by liveness, made once per batch size and reused at
every step, and the weights' transposes are prepared views instead of new ones per
call; the optimizer's update is planned once on those gradient buffers
(`Optimizer.plan`). On CUDA a whole epoch of steps, update included, is captured as one CUDA
graph (per data set and batch size) and replayed: the batches are gathered on the
device from a permutation copied there once per epoch, the learning rate is a device
tensor, and nothing waits on the host until the caller reads the losses.

The step trains the model's graph in training mode (`model.graph(loss, training=True)`).
Layers that keep state besides their params (BatchNorm's running statistics, Dropout's
key) make that graph output the state's next values after the loss, labelled
"next/{name}" (`NEXT`); the step writes them into the model's buffers with each
update, inside the same compiled step (and the same captured CUDA graph).

Data-parallel (`distributed=True`), the step is `step_graph`'s: it
takes a third input, `scale` (the rank's share of the global batch), and sums the
gradients over every rank with the all-reduce ops in the graph before the update.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .autodiff import grad
from .batches import epoch_batches
from .capture import CapturedEpoch, CudaGraphs
from .checks import flag, real, whole
from .compile import ArenaCompiled, Compiled, compile, lower
from .ir import Graph, Slot, Value
from .losses import Loss, checked_loss
from .monitor import Watch, add_monitors, checked_monitor
from .ops import mul
from .optim import Optimizer, check_apart, check_updatable, checked_optimizer
from .passes.allreduce import DEFAULT_BUCKET_MIB, allreduce

# Capturing records every kernel of the epoch; past this many steps the graph would
# take long to capture and much memory to hold, and the steps run uncaptured. (A bound
# chosen without a GPU to measure on: ~100k kernels, some seconds of capture.)
MAX_CAPTURED_STEPS = 4096

# An uncaptured epoch's arenas above this size are let go when it ends, so that what
# runs between epochs (fit's evaluation of the whole training set) can reuse their
# memory: at width 1024, batch 1024 keeping them raised fit's peak from 74 to 97 MiB
# above a bare process (eager PyTorch's loop: 65; tools/bench.py's memory worker).
# Re-making them is nothing beside such an epoch (~1 s); the disk net's (~10 KiB) stay.
KEEP_ARENA_BYTES = 1 << 20

NEXT = "next/"  # the label of a training graph's output that is a buffer's next value


def state_updates(graph: Graph) -> list[str]:
    """The buffers whose next values `graph` outputs, in output order (they follow the loss)."""
    return [label.removeprefix(NEXT) for label in graph.output_labels if label.startswith(NEXT)]


@runtime_checkable
class Model(Protocol):
    """What the training step needs of a model (graphdl.model's Sequential has it): its
    loss graph, its trainable tensors, what its compiled code depends on, and a cache
    for the code."""

    def graph(self, loss: Loss | None = None, name: str = ..., prediction: bool = ...) -> Graph: ...

    def parameters(self) -> dict[str, torch.Tensor]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def binding(self) -> tuple[tuple, tuple]: ...

    def compiled(self, key: Any, build: Callable[[], Any]) -> Any: ...


_GRAPHS: Any = CudaGraphs()


class _Arena:
    """The step's bindings at one batch size: the arena (params, buffers, transposes) and
    the update planned on its gradient buffers (None with accumulation, whose update is
    planned on the group's gradients).

    A gradient made afresh at each call (by a kernel with no out= form, such as a
    convolution's weight gradient) is copied into a buffer of its own, on which the update
    is planned too: `take(out)` copies it, before `update()`. Planning the update again at
    every step instead cost ~80 us of the digits CNN's ~1.3 ms step."""

    def __init__(self, fn: ArenaCompiled, batch: int, optimizer: Optimizer, params: list[torch.Tensor],
                 control: Callable[[list[torch.Tensor]], Callable[[], None] | None] | None,
                 first_grad: int = 1) -> None:
        self.run, self.batch = fn.fn, batch  # run(*feed, bindings): unchecked, for a feed of `batch` rows
        buffers = fn.buffers({d: batch for d in fn.symbols})
        self.bindings = fn.bind_params() + buffers
        self.bytes = sum(b.untyped_storage().nbytes() for b in buffers[:len(fn.layout.buffers)])
        self.update: Callable[[], None] | None = None
        self.take: Callable[[tuple[torch.Tensor, ...]], None] | None = None
        if control is None:  # accumulated, updated elsewhere
            return
        # (after the loss and the buffers' next values; after the gradients, any monitored values)
        grads, fresh, held = [], [], []
        for k, (j, p) in enumerate(zip(fn.layout.output_buffers[first_grad:first_grad + len(params)], params)):
            if j is None:
                fresh.append(first_grad + k)
                held.append(torch.empty_like(p, memory_format=torch.contiguous_format))
            grads.append(buffers[j] if j is not None else held[-1])
        self.update = _then(control(grads), optimizer.plan(params, grads))
        if fresh:
            self.take = lambda out: torch._foreach_copy_(held, [out[i] for i in fresh])

    def __call__(self, feed: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The step's outputs for a batch of this arena's size. A batch of another size
        would have torch resize the out= buffers, leaving the prepared transposes viewing
        the old ones: refused (0.1 µs)."""
        if feed[0].shape[0] != self.batch:
            raise RuntimeError(f"graphdl: a batch of {feed[0].shape[0]} rows reached the arena for {self.batch}")
        return self.run(*feed, self.bindings)


class TrainStep:
    """One model's compiled training step with its optimizer: what `fit` runs per batch.

    Args:
        model: the model to train, a `gd.Sequential` (its params are updated in place).
        loss: the graphdl loss.
        optimizer: a graphdl optimizer (`gd.SGD`, `gd.Adam`, ...); its state starts afresh.
        capture: capture epochs as CUDA graphs: None (the default) on CUDA, unless the
            environment sets GRAPHDL_CUDA_GRAPHS=0; False never. Where capture fails,
            the step says so in one warning and runs uncaptured.
        distributed: the data-parallel step (see the module doc), whose feeds are
            (x, y, scale); it is never captured.
        clip_norm: scale the gradients by min(1, clip_norm / (norm + 1e-6)), their
            global L2 norm over every param (PyTorch's clip_grad_norm_ rule).
        clip_value: clamp each gradient element to [-clip_value, clip_value] (first).
        accumulate: update once per group of this many batches, from their gradients
            averaged by rows (each batch's weight its share of the group's rows, the
            epoch's last group as long as it is), so that for a mean loss a group is
            one batch of all its rows. Rates, per-step schedules and step counts count
            updates. Each is applied in the step, on the device: no host sync.
        monitor: names from graphdl.monitor.MONITORS: the step's graph also computes
            them, after its gradients, and each batch's are kept with each update's
            ratios (`take_monitored`); the step is then never captured.

    `step(x, y, lr)` runs one batch and returns its loss; `step.epoch(X, Y, batch_size,
    order, lr)` runs every batch of an epoch and returns their losses; `step.steps(feeds,
    lr)` runs one step per feed tuple, such as a rank's (x, y, scale). For these two, `lr`
    is one rate, or a list of one per step (a per-step schedule's). Losses are
    tensors on the device, made in inference mode (reading one is a host sync; fit
    reads them once per epoch). Nothing here records autograd history.
    """

    def __init__(self, model: Model, loss: Loss, optimizer: Optimizer, capture: bool | None = None,
                 distributed: bool = False, clip_norm: float | None = None, clip_value: float | None = None,
                 accumulate: int = 1, monitor: tuple[str, ...] | list[str] = ()) -> None:
        _check_arguments(model, loss, optimizer, capture, distributed)
        self.model, self.loss, self.optimizer, self.distributed = model, loss, optimizer, distributed
        self.clip_norm, self.clip_value = (None if v is None else _positive(name, v)
                                           for name, v in (("clip_norm", clip_norm), ("clip_value", clip_value)))
        self.accumulate = whole("accumulate", accumulate, 1)
        self.monitor = checked_monitor(monitor or None)
        if self.monitor and distributed:
            raise ValueError("monitor is not available with distributed=True yet")
        self._watch: Watch | None = None  # the monitored values kept, with monitor
        self._arenas: dict[int, _Arena] = {}
        self._epochs: dict[tuple, CapturedEpoch] = {}
        self._last: tuple[_Arena, tuple[torch.Tensor, ...]] | None = None
        self._checked: tuple | None = None  # the last data `epoch` checked, so that fit's epochs check once
        self._build()
        optimizer.reset(self.params, self.names, self.aliases)
        self.capture = False if distributed or self.monitor else \
            _GRAPHS.available(self.compiled.device) if capture is None else bool(capture)

    def _build(self) -> None:
        """Compile (or take from the model's cache) the step for the model as it is now,
        and forget every binding to the tensors it had before."""
        model, loss = self.model, self.loss
        check_apart(model.state())  # an update in place must write each element once (as fit checks)
        for name, p in model.parameters().items():
            check_updatable(f"param {name}", p)
        names = list(model.parameters())
        kind = ("step", loss, "data-parallel") if self.distributed else ("step", loss, *self.monitor)
        gradients = (lambda: step_graph(model.graph(loss, training=True), names)) if self.distributed else \
            (lambda: add_monitors(grad(model.graph(loss, training=True), names), names, self.monitor)) \
            if self.monitor else (lambda: grad(model.graph(loss, training=True), names))
        self.compiled: Compiled = model.compiled(kind, lambda: compile(gradients()))
        self.arena_fn: ArenaCompiled = model.compiled((*kind, "arena"), lambda: lower(self.compiled.graph, arena=True))
        self.params = list(model.parameters().values())  # what the gradients are of, in their order
        # The buffers the step updates (outputs 1..S), then the gradients (from 1 + S on).
        state = model.state()
        self.state = [state[name] for name in state_updates(self.compiled.graph)]
        self._first_grad = 1 + len(self.state)
        self.names = names  # and their names, for the optimizer's groups (with a tied tensor's other places)
        self.aliases: dict[str, str] = model.ties() if hasattr(model, "ties") else {}
        # Each param's identity for the optimizer's state: the slot it is read from, which
        # a tensor assigned to the layer keeps (so its momentum does) and a new layer does not.
        self._identities: list[Slot] = [self.compiled.graph.params[name].slot for name in names]
        self._bound = model.binding()
        # With accumulation: the group's gradients so far, and the update planned on them.
        self._acc = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params] \
            if self.accumulate > 1 else []
        self._acc_update: Callable[[], None] | None = None
        self._arenas.clear()
        self._epochs.clear()
        # With monitor: what it keeps (the batches so far carried over a rebuild), and the
        # labels of the outputs after the gradients, which are the monitored values.
        kept = self._watch
        self._watch = Watch(self.compiled.graph, names, self.params, self._first_grad + len(names), self.monitor) \
            if self.monitor else None
        if kept is not None and self._watch is not None and kept.labels == self._watch.labels \
                and kept.layers == self._watch.layers:
            self._watch.rows, self._watch.ratios = kept.rows, kept.ratios
        self.monitored: tuple[str, ...] = self._watch.labels if self._watch is not None else ()

    # -- one batch -------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One step on the batch (x, y) at rate `lr`; returns the batch's loss."""
        lr = real("lr", lr, 0.0)
        self._refresh()  # first: the feeds are checked against the model as it is now
        self.compiled.check_feeds((x, y), {})  # shape, dtype and device, with the graph's messages
        loss = self.forward_backward(x, y)
        self.apply(lr)
        return loss

    @torch.inference_mode()
    def forward_backward(self, *feed: torch.Tensor) -> torch.Tensor:
        """The loss of the batch `feed` ((x, y), or data-parallel (x, y, scale)); its
        gradients stay in the arena for `apply`."""
        self._refresh()
        arena = self._arena(len(feed[0]))
        out = arena(feed)
        self._last = arena, out
        return out[0]

    @torch.inference_mode()
    def apply(self, lr: float, mark: tuple[float, bool] = (1.0, True)) -> None:
        """The optimizer's update from the gradients of the last `forward_backward`; with
        accumulation, `mark` is the batch's (weight, whether it ends its group), as
        `marks` gives them."""
        assert self._last is not None, "apply follows forward_backward"
        arena, out = self._last
        self._last = None
        self._update(arena, out, lr, mark)

    def marks(self, sizes: list[int]) -> list[tuple[float, bool]]:
        """For batches of these sizes: each one's weight in its group's gradient (its share
        of the group's rows) and whether its group ends with it (every batch, without
        accumulation)."""
        marks = []
        for first in range(0, len(sizes), self.accumulate):
            group = sizes[first:first + self.accumulate]
            total = sum(group)
            marks += [(size / total if total else 0.0, k == len(group) - 1) for k, size in enumerate(group)]
        return marks

    def discard_accumulated(self) -> None:
        """Forget the gradients of a group left unfinished (an epoch that stopped)."""
        if self._acc:
            torch._foreach_zero_(self._acc)

    # -- one epoch -------------------------------------------------------------------------

    @torch.inference_mode()
    def epoch(self, X: torch.Tensor, Y: torch.Tensor, batch_size: int, order: torch.Tensor | None,
              lr: float | Sequence[float]) -> torch.Tensor:
        """Every batch of X, Y taken in `order` (a permutation of the rows; None: as they
        are), one step each at rate `lr` (or at lr[k] for the k-th). Returns the batches'
        losses, a 1-d tensor on the device (on CUDA it is overwritten by the next epoch)."""
        batch_size = whole("batch_size", batch_size, 1)
        n = len(X) if isinstance(X, torch.Tensor) and X.dim() else 0
        sizes = [min(batch_size, n - first) for first in range(0, n, batch_size)]
        lr = _checked_rates(lr, -(-len(sizes) // self.accumulate) if n else None)
        self._refresh()
        data = (id(X), id(Y), X.shape, Y.shape, X.dtype, Y.dtype, X.device, Y.device, self.compiled) \
            if isinstance(X, torch.Tensor) and isinstance(Y, torch.Tensor) else None
        if data is None or data != self._checked:  # ~11 µs; once per data set and step, not per epoch
            self.compiled.check_feeds((X, Y), {})
            self._checked = data
        if self.capture:
            captured = self._captured(X, Y, batch_size, order is not None, isinstance(lr, list))
            if captured is not None:
                if isinstance(lr, list):
                    return captured.replay(order, lr)
                self.optimizer.set_lr(lr)
                return captured.replay(order)
        return torch.stack(self._steps(epoch_batches(X, Y, batch_size, order), lr, sizes))

    @torch.inference_mode()
    def steps(self, feeds: Iterable[tuple[torch.Tensor, ...]], lr: float | Sequence[float],
              sizes: list[int] | None = None,
              after: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """One step per feed tuple ((x, y), or data-parallel (x, y, scale)) at rate `lr`:
        a call of the generated function and one of the planned update. Returns the
        losses, tensors on the device. (`epoch` makes its feeds with `split`, all the
        batch views in one call: ~0.2 µs a batch against ~1 µs for slicing each.) The feeds
        are not checked: `fit` checks its data once, not at every step. With
        accumulation, `sizes` are the batches' (global) sizes; by default their rows.
        `after(k, loss)`, if given, is called after the k-th step (fit's batch logs)."""
        self._refresh()
        if self.accumulate > 1 and sizes is None:
            feeds = list(feeds)
            sizes = [feed[0].shape[0] for feed in feeds]
        return self._steps(feeds, _checked_rates(lr, None), sizes, after)

    def _steps(self, feeds: Iterable[tuple[torch.Tensor, ...]], lr: float | list[float],
               sizes: list[int] | None, after: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        # The planned update reads the rate from the optimizer (set_lr, in _update).
        losses: list[torch.Tensor] = []
        arena = None
        rates = lr if isinstance(lr, list) else None
        marks = self.marks(sizes) if self.accumulate > 1 and sizes is not None else None
        self.discard_accumulated()
        if self.accumulate == 1 and rates is None and after is None and self._watch is None:  # (monitored: _update)
            return self._plain_steps(feeds, lr)
        update = 0
        for k, feed in enumerate(feeds):
            mark = marks[k] if marks is not None else (1.0, True)
            if rates is not None:
                if update >= len(rates):
                    raise ValueError(f"lr holds {len(rates)} rates but there are more steps; give one per step")
                lr = rates[update]
            size = feed[0].shape[0]  # (0.1 µs; len() of a tensor takes 0.4)
            if arena is None or size != arena.batch:  # the arenas of the full batches and of the last
                arena = self._arena(size)
            out = arena.run(*feed, arena.bindings)  # `size` chose it: unchecked (a call less, ~1 µs a step)
            self._update(arena, out, lr, mark)
            update += mark[1]
            losses.append(out[0])
            if after is not None:
                after(k, out[0])
        if sum(a.bytes for a in self._arenas.values()) > KEEP_ARENA_BYTES:
            self._arenas.clear()
        return losses

    def take_monitored(self) -> Watch:
        """What the monitored step kept since the last `Watch.take` (graphdl.monitor's
        `epoch_values` takes it); a ValueError without monitor."""
        if self._watch is None:
            raise ValueError("this TrainStep monitors nothing: make it with monitor=[...]")
        return self._watch

    # -- bookkeeping -------------------------------------------------------------------------

    def _plain_steps(self, feeds: Iterable[tuple[torch.Tensor, ...]], lr: float) -> list[torch.Tensor]:
        """`_steps` for one update per batch at one rate, with no batch logs: what nearly every
        fit runs, so the loop carries nothing else (the general loop's bookkeeping cost ~2 µs
        a step, 4 % of the disk net's at batch 5)."""
        losses: list[torch.Tensor] = []
        arena = None
        state = self.state
        self.optimizer.set_lr(lr)
        for feed in feeds:
            size = feed[0].shape[0]  # (0.1 µs; len() of a tensor takes 0.4)
            if arena is None or size != arena.batch:  # the arenas of the full batches and of the last
                arena = self._arena(size)
            out = arena.run(*feed, arena.bindings)  # `size` chose it: unchecked (a call less, ~1 µs a step)
            if state:
                torch._foreach_copy_(state, list(out[1:self._first_grad]))  # the buffers' next values
            if arena.take is not None:
                arena.take(out)
            arena.update()  # (planned: no accumulation here)
            losses.append(out[0])
        if sum(a.bytes for a in self._arenas.values()) > KEEP_ARENA_BYTES:
            self._arenas.clear()
        return losses

    def _update(self, arena: _Arena, out: tuple[torch.Tensor, ...], lr: float | torch.Tensor | None,
                mark: tuple[float, bool] = (1.0, True)) -> None:
        """After a batch's forward and backward: the update at rate `lr` (a float, set with
        set_lr; a 0-d float64 tensor on the device, loaded from it; None: as it is), or
        with accumulation, the batch's gradients added into its group's, weighted by
        `mark`, and the update from those at the group's last batch."""
        self.write_state(out)
        if self._watch is not None:
            self._watch.batch(out)
        weight, last = mark
        if self.accumulate > 1:
            torch._foreach_add_(self._acc, self.grads(out), alpha=weight)
            if not last:
                return
            if self._acc_update is None:
                self._acc_update = _then(self._control(self._acc), self.optimizer.plan(self.params, self._acc))
            update = self._acc_update
        else:
            assert arena.update is not None, "without accumulation the update is planned on the arena"
            if arena.take is not None:
                arena.take(out)
            update = arena.update
        if isinstance(lr, torch.Tensor):
            self.optimizer.load_lr(lr)
        elif lr is not None:
            self.optimizer.set_lr(lr)
        if self._watch is not None:
            self._watch.before_update()
        update()
        if self._watch is not None:
            self._watch.after_update()
        if self.accumulate > 1:
            torch._foreach_zero_(self._acc)

    def write_state(self, out: tuple[torch.Tensor, ...]) -> None:
        """Put the buffers' next values, computed by the step that returned `out`, into them."""
        if self.state:  # one multi-tensor copy
            torch._foreach_copy_(self.state, list(out[1:self._first_grad]))

    def grads(self, out: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The gradients among the step's outputs `out`, in the order of `params`."""
        return list(out[self._first_grad:self._first_grad + len(self.params)])

    def _control(self, grads: list[torch.Tensor]) -> Callable[[], None] | None:
        return _clipper(grads, self.clip_norm, self.clip_value)

    def _arena(self, batch: int) -> _Arena:
        arena = self._arenas.get(batch)
        if arena is None:
            arena = self._arenas[batch] = _Arena(self.arena_fn, batch, self.optimizer, self.params,
                                                 self._control if self.accumulate == 1 else None, self._first_grad)
        return arena

    def _refresh(self) -> None:
        """Bind again after the model changed: the arena holds the tensors it was bound with
        and views of them (prepared transposes), and the planned updates write into them,
        so a tensor whose memory moved (`layer.weight = t`, `layer.weight.data = t`)
        needs new bindings, and a change of structure (a layer replaced or added, a dtype,
        device or tie changed) a new step. The optimizer keeps each param's state where
        the param is the same (same slot and shape) and starts it afresh elsewhere. ~40 µs
        for the disk net's 16 tensors: once an epoch in fit."""
        if self.model.binding() == self._bound:
            return
        before = self._identities
        self._build()
        self.optimizer.carry(before, self._identities, self.params, self.names, self.aliases)

    def _captured(self, X: torch.Tensor, Y: torch.Tensor, batch_size: int, shuffled: bool,
                  per_step: bool) -> CapturedEpoch | None:
        """The epoch's CUDA graph, captured on first use; None (after one warning, once)
        where capture cannot apply."""
        key = (id(X), id(Y), X.data_ptr(), Y.data_ptr(), len(X), batch_size, shuffled, per_step)
        captured = self._epochs.get(key)
        if captured is not None:
            return captured
        steps = -(-len(X) // batch_size)
        if steps > MAX_CAPTURED_STEPS:
            return self._no_capture(f"an epoch of {steps} steps is more than the {MAX_CAPTURED_STEPS} a graph "
                                    "holds; a larger batch size captures")
        try:
            captured = self._epochs[key] = CapturedEpoch(self, X, Y, batch_size, shuffled, per_step, _GRAPHS)
        except Exception as e:  # noqa: BLE001 - any failure to capture falls back to the plain step
            return self._no_capture(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return captured

    def _no_capture(self, why: str) -> None:
        warnings.warn(f"graphdl: not capturing the training step as a CUDA graph ({why}); running it uncaptured",
                      RuntimeWarning, stacklevel=4)
        self.capture = False
        return None


def step_graph(loss_graph: Graph, wrt: list[str], bucket_mib: float | None = None) -> Graph:
    """A rank's training step: the gradient graph of `loss_graph`'s loss times a new scalar
    input `scale` (this rank's share of the global batch), with its gradients summed over
    every rank (graphdl.passes.allreduce). Outputs: the weighted loss, then the buffers'
    next values (`NEXT`), then the summed gradients of `wrt`.

    A buffer's next value computed from the data (BatchNorm's running statistics) is
    averaged over the ranks, weighted by their shares, so that every rank keeps the same
    buffers (the statistics that normalise a batch stay each rank's own, as under DDP);
    one computed without the data (Dropout's key) is the same on every rank already."""
    loss_graph, _ = loss_graph.copy()  # the caller's graph stays as it was
    loss = loss_graph.outputs[0]
    scale = loss_graph.input("scale", (), loss.dtype)
    from_data = _computed_from(loss_graph, [v for v in loss_graph.inputs.values() if v is not scale])
    averaged = [i for i, (v, label) in enumerate(zip(loss_graph.outputs, loss_graph.output_labels))
                if label.startswith(NEXT) and v in from_data]
    with loss_graph.scope("loss"):
        loss_graph.set_output(0, mul(loss, scale))
        for i in averaged:
            loss_graph.set_output(i, mul(loss_graph.outputs[i], scale))
    step = grad(loss_graph, wrt)
    summed = [*averaged, *range(len(loss_graph.outputs), len(step.outputs))]
    step, _ = allreduce(step, summed, bucket_mib=DEFAULT_BUCKET_MIB if bucket_mib is None else bucket_mib)
    return step


def _computed_from(graph: Graph, sources: list[Value]) -> set[Value]:
    """`sources` and every value computed from any of them."""
    reached = set(sources)
    for node in graph.nodes:
        if any(v in reached for v in node.inputs):
            reached.add(node.out)
    return reached


def _positive(name: str, value: Any) -> float:
    number = real(name, value, 0.0)
    if number == 0:
        raise ValueError(f"{name} must be > 0 (None: none), got {value!r}")
    return number


def _then(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    if first is None:
        return then

    def both() -> None:
        first()
        then()
    return both


def _clipper(grads: list[torch.Tensor], clip_norm: float | None,
             clip_value: float | None) -> Callable[[], None] | None:
    """A function clipping `grads` in place, or None: each element clamped to
    [-clip_value, clip_value] (PyTorch's clip_grad_value_), then all scaled by
    min(1, clip_norm / (norm + 1e-6)) with norm their global L2 norm
    (clip_grad_norm_'s formula and ops), on the device."""
    grads = list(grads)
    if not grads or (clip_norm is None and clip_value is None):
        return None
    device = grads[0].device

    def clip() -> None:
        if clip_value is not None:
            torch._foreach_clamp_min_(grads, -clip_value)
            torch._foreach_clamp_max_(grads, clip_value)
        if clip_norm is not None:
            norms = torch._foreach_norm(grads, 2.0)
            total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)
            torch._foreach_mul_(grads, torch.clamp(clip_norm / (total + 1e-6), max=1.0))
    return clip


def _checked_rates(lr: Any, steps: int | None) -> float | list[float]:
    """One rate, or a list of one per step (`steps` of them, where known), each checked."""
    if not isinstance(lr, (list, tuple)):
        return real("lr", lr, 0.0)
    if steps is not None and len(lr) != steps:
        raise ValueError(f"lr holds {len(lr)} rates but the epoch has {steps} steps; give one rate, or one per step")
    return [real(f"lr[{k}]", v, 0.0) for k, v in enumerate(lr)]


def _check_arguments(model: Any, loss: Any, optimizer: Any, capture: Any, distributed: Any) -> None:
    if not isinstance(model, Model):
        raise ValueError(f"model must be a graphdl model such as gd.Sequential, got {type(model).__name__}")
    checked_loss(loss)
    checked_optimizer(optimizer)
    flag("distributed", distributed)
    if capture is not None and not isinstance(capture, bool):
        raise ValueError(f"capture must be None (capture on CUDA), True or False, got {capture!r}")
