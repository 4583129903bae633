"""CUDA graphs for fit: the capture API (`CudaGraphs`, replaceable by a CPU stand-in in
tests) and whole epochs captured as one graph (`CapturedEpoch`), which `TrainStep` replays."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .batches import epoch_batches

# Capturing records every kernel of the epoch; past this many steps the graph would
# take long to capture and much memory to hold, and the steps run uncaptured. (A bound
# chosen without a GPU to measure on: ~100k kernels, some seconds of capture.)

if TYPE_CHECKING:
    from .step import TrainStep


class CudaGraphs:
    """What capturing an epoch needs from CUDA, in one place (tests stand in for it on
    CPU with a recorder that has a graph's semantics: see tests/test_step.py)."""

    def available(self, device: torch.device | None) -> bool:
        return device is not None and device.type == "cuda" and os.environ.get("GRAPHDL_CUDA_GRAPHS") != "0"

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Warm-up work off the capturing stream, as torch.cuda.graph asks."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, body: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """(replay, what body returned): body's kernels, recorded, not run."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = body()
        return graph.replay, result

    def staging(self, n: int) -> torch.Tensor:
        """Host memory the permutation is copied from without a sync (pinned)."""
        return torch.empty(n, dtype=torch.int64, pin_memory=True)

    def event(self) -> Any:
        return torch.cuda.Event()


class CapturedEpoch:
    """One epoch of steps over fixed data and batch size, captured as one CUDA graph.

    What changes between epochs lives in device tensors the graph reads: the
    permutation (`order`, copied in before each replay), the learning rate (the
    optimizer's rate tensors; with `per_step`, each step's rate, copied in with the
    order and loaded into them by the graph before each update) and, of course, the
    params and optimizer state.
    """

    def __init__(self, step: TrainStep, X: torch.Tensor, Y: torch.Tensor, batch_size: int, shuffled: bool,
                 per_step: bool = False, graphs: CudaGraphs | None = None) -> None:
        self.graphs = graphs if graphs is not None else CudaGraphs()  # step.py's, which tests may replace
        self.X, self.Y, self.optimizer = X, Y, step.optimizer  # the graph reads their memory: keep them alive
        n = len(X)
        self.order = torch.arange(n, device=X.device) if shuffled else None
        self.staging = self.graphs.staging(n) if shuffled else None
        sizes = [min(batch_size, n - first) for first in range(0, n, batch_size)]
        self.marks = step.marks(sizes)
        steps = sum(last for _, last in self.marks)  # updates
        self.rates = torch.zeros(steps, dtype=torch.float64, device=X.device) if per_step else None
        # (float64 rates in the staging made for int64 ids: the same 8 bytes each)
        self.rate_staging = self.graphs.staging(steps).view(torch.float64) if per_step else None
        self.copied = self.graphs.event()  # recorded after each copy out of staging
        self._warm_up(step, batch_size)
        self.replay_graph, self.losses = self.graphs.capture(lambda: self._body(step, batch_size))

    def _body(self, step: TrainStep, batch_size: int) -> torch.Tensor:
        losses = []
        update = 0
        for (x, y), mark in zip(epoch_batches(self.X, self.Y, batch_size, self.order), self.marks):  # order: device
            arena = step._arena(len(x))
            out = arena((x, y))
            step._update(arena, out, self.rates[update] if self.rates is not None and mark[1] else None, mark)
            update += mark[1]
            losses.append(out[0])
        return torch.stack(losses)

    def _warm_up(self, step: TrainStep, batch_size: int) -> None:
        """One step at each batch size the epoch has, on a side stream, before capture
        (cuBLAS and the kernels initialise lazily, which capture forbids); the params and
        velocities are put back afterwards, so training is unchanged."""
        state = [*step.params, *step.state, *step.optimizer.state_tensors(), *step._acc]
        saved = [t.clone() for t in state]
        # The sizes the epoch's batches really have: with a batch larger than the data, an
        # arena of batch_size rows run on fewer would have torch resize its out= buffers.
        sizes = {len(x) for x, _ in epoch_batches(self.X, self.Y, batch_size, None)}
        try:
            with self.graphs.side_stream():
                if self.order is not None:
                    self.X.index_select(0, self.order)
                for size in sizes:
                    arena = step._arena(size)
                    out = arena((self.X[:size], self.Y[:size]))
                    step._update(arena, out, None)  # (with accumulation: the group's update too)
        finally:  # also when warming up fails: the fallback trains from the same state
            torch._foreach_copy_(state, saved)

    def replay(self, order: torch.Tensor | None, rates: list[float] | None = None) -> torch.Tensor:
        """Run the epoch's steps with this permutation (and, per step, these rates);
        returns the batches' losses."""
        if self.order is not None or self.rates is not None:
            self.copied.synchronize()  # the last copy out of staging is done (fit synced since)
            if self.order is not None:
                self.staging.copy_(order)
                self.order.copy_(self.staging, non_blocking=True)
            if self.rates is not None:
                self.rate_staging.copy_(torch.tensor(rates, dtype=torch.float64))
                self.rates.copy_(self.rate_staging, non_blocking=True)
            self.copied.record()
        self.replay_graph()
        if self.rates is not None:
            self.optimizer.forget_lr()  # the graph loaded the rates: set_lr must fill them afresh
        return self.losses
