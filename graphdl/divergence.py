"""When training diverges: `DivergedError`, and the replay of the diverged epoch that finds
its first non-finite batch, then the node where the first non-finite value appeared."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .step import TrainStep

if TYPE_CHECKING:
    from .train import History


class DivergedError(FloatingPointError):
    """`fit` stopped because the loss (or a param) stopped being finite.

    The model keeps its last finite params. `history` holds the completed epochs (it is
    also `model.history`); `epoch` and `batch` count from 1, as the progress lines do.
    `node` (`"%12"`), `op`, `layer` and `where` name the first non-finite value, found
    by replaying the batch node by node (`source`, a `graphdl.numerics.NonFinite`, has
    its inputs' ranges too); None where it is not known (data-parallel runs, or a
    replay that stayed finite).
    """

    def __init__(self, message: str, history: History, epoch: int, batch: int | None,
                 source: Any = None) -> None:
        super().__init__(message)
        self.history, self.epoch, self.batch, self.source = history, epoch, batch, source
        self.node = None if source is None or source.node < 0 else f"%{source.node}"
        self.op = None if source is None else source.op
        self.layer = None if source is None else source.layer or None
        self.where = None if source is None else source.where or None


# Divergence is found without a host sync per batch. Reading each batch's loss
# (`.item()`) would cost ~10 us a step, as much as the step itself on a tiny net. Instead
# fit copies the params and optimizer state at each epoch's start (a few small copies
# per epoch), checks the epoch's mean loss and the params once, at the sync the epoch
# already pays for its loss, and only after a divergence replays that epoch from the
# copy one batch at a time, reading every loss, to name the batch and stop at the last
# finite params. The replay runs the same kernels on the same batches in the same order,
# so it meets the same non-finite value. That batch is then run once more through the
# step's graph with a check after every node (graphdl.numerics), to name the node.



DivergedError.__module__ = "graphdl"  # its public name, gd.DivergedError, in tracebacks


class Snapshot:
    """Copies of tensors (params, optimizer state) taken by `save` and put back by `restore`."""

    def __init__(self, tensors: Callable[[], list[torch.Tensor]]) -> None:
        self.tensors = tensors
        self.copies = [t.clone() for t in tensors()]

    def save(self) -> None:
        if self.copies:  # one multi-tensor copy: 3 µs for the disk net's 16 tensors, 6 µs one by one
            torch._foreach_copy_(self.copies, self.tensors())

    def restore(self) -> None:
        if self.copies:
            torch._foreach_copy_(self.tensors(), self.copies)


def magnitude(tensors: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """A 0-d tensor on `device` that is finite exactly when every element is (0 when there
    are no elements): so one number tells whether all are. The largest |x|, from each
    tensor's aminmax (its min and max are NaN where an element is NaN, and -inf or inf
    where one is); being an element, it cannot overflow. One thread of the Zen 5 EPYC:
    16 µs for the disk net's 16 tensors, 35 µs for the 256-wide bench net's 132k elements,
    0.32 ms for the 1024-wide one's 2.1M and 5.3 ms for 34M, where the 2-norm summed in
    float64 it was before took 20 µs, 57-197 µs, 1.1-3.7 ms and 120 ms (torch's float64
    accumulation has no vectorised path from float32)."""
    extremes = [m for t in tensors if t.numel() for m in torch.aminmax(t)]  # (an empty tensor has none)
    if not extremes:
        return torch.zeros((), device=device)  # made there: a CPU 0 moved to CUDA would be a host sync
    return torch.stack(extremes).abs().max()  # (stack promotes: a float16 and a float64 param stack as float64)


class Found(NamedTuple):
    """The batch a replay found: its index, its loss, whether it was its update that made
    params non-finite (then `bad` lists them by index), its feed and its rate."""

    batch: int
    loss: float
    update: bool
    feed: tuple[torch.Tensor, ...]
    bad: tuple[int, ...] = ()
    lr: float = 0.0


def replay(step: TrainStep, start: Snapshot, feeds: Iterator[tuple[torch.Tensor, ...]],
            batch_loss: Callable[[torch.Tensor], float], lr: float | list[float],
            sizes: list[int]) -> Found | None:
    """Replay an epoch that diverged from its starting state, one checked batch at a time.

    Returns the batch found, with the model at the last finite params (those the batch
    started from), or None if the replay stayed finite (the model is then back at the
    epoch's start).
    """
    start.restore()
    step.discard_accumulated()
    before = Snapshot(start.tensors)
    update = 0
    for b, (feed, mark) in enumerate(zip(feeds, step.marks(sizes))):
        rate = lr[update] if isinstance(lr, list) else lr
        loss = batch_loss(step.forward_backward(*feed))
        if not math.isfinite(loss):  # the params that gave it are finite: the last update was checked
            return Found(b, loss, False, feed, (), rate)
        before.save()
        step.apply(rate, mark)
        update += mark[1]
        if not math.isfinite(float(magnitude(step.params))):
            bad = tuple(i for i, p in enumerate(step.params) if not bool(p.isfinite().all()))
            before.restore()
            return Found(b, loss, True, feed, bad, rate)
    start.restore()
    return None


def find_source(step: TrainStep, found: Found | None) -> Any:
    """The first non-finite value of the batch `found`, replayed node by node from the
    params (and buffers) it started from (graphdl.numerics); for an update that
    overflowed from finite gradients, the gradient of the first param it made non-finite.
    None if not found."""
    if found is None:
        return None
    from . import numerics  # only after a divergence
    graph = step.compiled.graph
    source, outputs = numerics.first_nonfinite(graph, found.feed)
    if source is None and found.bad and outputs:
        names = list(step.model.parameters())
        source = numerics.overflowed_update(graph, outputs, names[found.bad[0]], found.lr,
                                            type(step.optimizer).__name__, step.accumulate)
    return source


def diverged(found: Found | None, epoch: int, epochs: int, batches: int, lr: float,
              history: History, source: Any = None) -> DivergedError:
    where = f"epoch {epoch + 1}/{epochs}"
    if found is None:
        what = (f"training diverged in {where} (lr={lr:g}), but replaying it one batch at a time stayed finite, "
                "so the batch is unknown; the model keeps its params from the start of that epoch")
    elif found[2]:
        what = (f"training diverged: the update of {where}, batch {found[0] + 1}/{batches} (lr={lr:g}) made params "
                f"NaN or inf (the gradients overflowed; the loss was {found[1]:g}); the model keeps its params "
                "from before that update")
    else:
        what = (f"training diverged: the loss became {found[1]} in {where}, batch {found[0] + 1}/{batches} "
                f"(lr={lr:g}); the model keeps its last finite params, from before that batch")
    done = (f"The history of the {epoch} completed epoch{'s' if epoch != 1 else ''} is"
            if epoch else "No epoch completed; the empty history is")
    origin = f"\n  {source.describe()}." if source is not None else ""
    specific = f"\n  hint: {source.hint}" if source is not None and source.hint else ""
    message = (f"{what}.{origin}\n  {done} on this error's .history and on model.history.{specific}"
               f"\n  hint: lower the learning rate (e.g. lr={lr / 10:g}) or scale the inputs and targets "
               "to about [-1, 1]")
    return DivergedError(message, history, epoch + 1, None if found is None else found[0] + 1, source)
