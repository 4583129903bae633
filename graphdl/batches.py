"""fit's walk over an epoch's batches, in one process (`OneProcess`) or shared between
data-parallel ranks (`Sharded`): both are `Batches`, so fit's one loop runs either.

`epoch_batches` cuts an epoch into (x, y) batches, the one walk that TrainStep's
epochs, their CUDA-graph capture and fit's replay after a divergence all take.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from . import distributed as dp


class Batches(Protocol):
    """An epoch's batches as fit's loop sees them."""

    is_main: bool  # whether this process prints and writes files
    sizes: list[int]  # the (global) batches' sizes

    def __len__(self) -> int:
        """The number of (global) batches an epoch has."""

    def run(self, step: Any, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None,
            lr: float) -> torch.Tensor:
        """Run the epoch's steps; returns this process's batch losses (on the device)."""

    def feeds(self, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, ...]]:
        """The feed tuple of each batch, as `run` takes them (to replay an epoch)."""

    def loss_and_finite(self, losses: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """[the epoch's mean loss, a number finite only while every param is], not yet read."""

    def batch_loss(self, loss: torch.Tensor) -> float:
        """One batch's loss as a float (data-parallel: summed over the ranks)."""

    def common_start(self, tensors: list[torch.Tensor], seed: int, settings: dict[str, int]) -> int:
        """The start every process shares: the seed to shuffle with (and, data-parallel,
        every rank checked to run the same fit and given rank 0's `tensors`)."""


# A shuffled epoch's rows are gathered in one call where the data is small, and batch by
# batch, as each is reached, where it is large on the CPU: one copy of all of it is fresh
# memory, faulted in page by page. MNIST-sized data (60,000 x 784, batch 128): 32 against
# 88-93 ms an epoch on one thread of the Zen 5 EPYC (docs/performance.md); the disk net's
# 1,000 x 2 stays one call (a call per batch would add ~3 µs to its 36 µs step at batch
# 5). On a GPU, whose allocator reuses memory, one call per epoch.
GATHER_WHOLE_BYTES = 2 << 20


def epoch_batches(X: torch.Tensor, Y: torch.Tensor, batch_size: int,
                  order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each batch of an epoch taken in `order` (None: as the rows are): what
    `TrainStep.epoch` runs uncaptured, and what fit replays after a divergence, which must
    meet the very same batches."""
    if order is None:
        return zip(X.split(batch_size), Y.split(batch_size))
    return gathered(X, Y, order.to(X.device), batch_size)


def gathered(X: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor,
             counts: int | list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """X's and Y's `rows` (indices on X's device), cut into consecutive batches of `counts`
    rows (as Tensor.split takes it): in one call where the data is small or on a GPU, batch
    by batch as each is reached where it is large (GATHER_WHOLE_BYTES)."""
    if X.device.type != "cpu" or X.numel() * X.itemsize + Y.numel() * Y.itemsize <= GATHER_WHOLE_BYTES:
        yield from zip(X.index_select(0, rows).split(counts), Y.index_select(0, rows.to(Y.device)).split(counts))
        return
    for part in rows.split(counts):
        yield X.index_select(0, part), Y.index_select(0, part.to(Y.device))


class OneProcess:
    """fit's epoch in one process: consecutive slices of the (shuffled) data."""

    is_main = True

    def __init__(self, n: int, batch_size: int, Y: torch.Tensor) -> None:
        self.batch_size = batch_size
        self.sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
        self.weights = epoch_weights(n, batch_size, Y)

    def __len__(self) -> int:
        return len(self.weights)

    def run(self, step: Any, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None,
            lr: float) -> torch.Tensor:
        """The epoch's steps (on CUDA, one captured graph); returns the batches' losses."""
        return step.epoch(X, Y, self.batch_size, order, lr)

    def feeds(self, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y) of each batch of the epoch, as `run` takes them (to replay an epoch)."""
        return epoch_batches(X, Y, self.batch_size, order)

    def loss_and_finite(self, losses: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """[the epoch's mean loss, 0 if every param is finite else NaN], not yet read: the
        flag is the params' magnitude (`divergence.magnitude`) times 0, made before the cast
        to the loss's dtype, which could not hold a float64 param's largest |x|."""
        wide = self.weights.dtype
        return torch.stack([losses.to(wide) @ self.weights, (magnitude * 0).to(wide)])

    def batch_loss(self, loss: torch.Tensor) -> float:
        return float(loss)

    def common_start(self, tensors: list[torch.Tensor], seed: int, settings: dict[str, int]) -> int:
        return seed


def epoch_weights(n: int, batch_size: int, Y: torch.Tensor) -> torch.Tensor:
    """Each batch's share of the epoch's mean loss, so one dot product gives the mean. It is
    kept in float32 or wider whatever the model's dtype (the targets'; the inputs may be
    indices): in float16 a batch of 65,536 is inf."""
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    return (torch.tensor(sizes, dtype=torch.float64) / n).to(Y.device, torch.promote_types(Y.dtype, torch.float32))


class Sharded:
    """fit's epoch on this rank: its share of each global batch.

    The epoch's order (a permutation of the n rows, the same on every rank) is cut into
    global batches of `batch_size` (the last may be smaller); each global batch is split
    over the ranks with `split`, rank r taking the r-th part. A rank feeds its part with
    `scale` = its size / the global batch's size, so its loss and gradient are its share
    of the global batch's mean, and the all-reduce's sum is that mean. A rank whose part
    is empty (a global batch smaller than the number of ranks) still takes part in every
    collective: it feeds one row of zeros with scale 0.
    """

    def __init__(self, n: int, batch_size: int, X: torch.Tensor, Y: torch.Tensor) -> None:
        me, world = dp.rank(), dp.world_size()
        sizes = [min(batch_size, n - first) for first in range(0, n, batch_size)]
        positions: list[int] = []
        self.counts: list[int] = []
        for first, size in zip(range(0, n, batch_size), sizes):
            parts = dp.split(size, world)
            start = first + sum(parts[:me])
            positions.extend(range(start, start + parts[me]))
            self.counts.append(parts[me])
        self.positions = torch.tensor(positions, dtype=torch.long, device=X.device)
        self.sizes = sizes
        self.scales = [torch.tensor(c / s, dtype=Y.dtype, device=X.device) for c, s in zip(self.counts, sizes)]
        self.weights = epoch_weights(n, batch_size, Y)
        self.empty = (X.new_zeros(1, *X.shape[1:]), Y.new_zeros(1, *Y.shape[1:]))
        self.is_main = me == 0

    def __len__(self) -> int:
        return len(self.counts)

    def run(self, step: Any, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None,
            lr: float) -> torch.Tensor:
        """This rank's steps of the epoch (a data-parallel `TrainStep`); returns its
        weighted shares of the batches' losses."""
        return torch.stack(step.steps(self.feeds(X, Y, order), lr, self.sizes))

    def feeds(self, X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y, scale) of this rank for each global batch of the epoch, sliced as it is reached."""
        rows = self.positions if order is None else order.to(X.device)[self.positions]
        for (x, y), count, scale in zip(gathered(X, Y, rows, self.counts), self.counts, self.scales, strict=True):
            yield (x, y, scale) if count else (*self.empty, scale)

    def loss_and_finite(self, losses: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """[the epoch's mean loss over every rank, 0 if every rank's params are finite
        (`magnitude`, `divergence.magnitude`, is) else NaN], not yet read: one collective,
        so every rank sees the same numbers and stops together. The magnitudes themselves
        are not summed: two ranks' 2e38 would overflow float32 and read as divergence."""
        wide = self.weights.dtype
        flag = (magnitude * 0).to(wide)  # 0, or NaN for inf or NaN (made before the cast: see above)
        both = torch.stack([losses.to(wide) @ self.weights, flag])
        return dp.sum_over_ranks(both, "summing the epoch's loss")

    def batch_loss(self, loss: torch.Tensor) -> float:
        """One global batch's loss, from this rank's weighted share (replaying an epoch)."""
        return float(dp.sum_over_ranks(loss.reshape(1).clone(), "summing a batch's loss"))

    def common_start(self, tensors: list[torch.Tensor], seed: int, settings: dict[str, int]) -> int:
        """Check that every rank runs the same fit, take rank 0's seed, and copy rank 0's
        params and optimizer state to every rank. Returns the seed."""
        seed = dp.agree(settings, seed, self.weights.device)
        dp.broadcast_from_main(tensors)
        return seed
