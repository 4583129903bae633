"""Where a `fit` epoch's time goes beyond its steps, on the bench's 2-w-w-w-1 tanh net.

`gd.profile` times the training step node by node; an epoch also shuffles, takes the
batches' views, checks that the model still has the tensors the step was bound to,
scores the metrics on the training data (a forward over every point), checks the params'
finiteness and reads it all in one host sync. This fits the bench's net (the data, loss,
optimizer, shuffling and metrics of `tools/bench.py`) for some epochs with each of
those parts wrapped in a timer, one thread, and prints each part's median µs an epoch:

  epoch          the whole epoch (fit's _Run.epoch)
  steps          TrainStep.epoch: the steps and what it does around them
    plain steps    the generated step and the planned update, batch after batch
    batch views    the shuffled data's batches, made as views in one call
    rebind check   whether the model still holds the tensors the step was bound to
  metrics        the accuracy pass on the training data (graphdl.metrics.measure)
  finiteness     the params' 2-norm, finite exactly when every param is
  (rest)         the epoch less the parts above: the permutation, the host sync, the
                 history, the callbacks

and then what a fit call costs besides its epochs, from fits of two epochs: setting the
run up (the call less its epochs), and how much longer its first epoch takes than its
second (the first touch of memory given back between calls), medians.

    PYTHONPATH=. python tools/bench_epoch.py
    PYTHONPATH=. python tools/bench_epoch.py --width 256 --batch 256 --epochs 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench  # noqa: E402

import graphdl as gd  # noqa: E402
import graphdl.step  # noqa: E402
import graphdl.train  # noqa: E402

# (where the part is looked up, its name there, what to call it): the calls fit makes
PARTS = [
    (graphdl.train._Run, "epoch", "epoch"),
    (graphdl.step.TrainStep, "epoch", "steps"),
    (graphdl.step.TrainStep, "_plain_steps", "plain steps"),
    (graphdl.step, "epoch_batches", "batch views"),
    (graphdl.step.TrainStep, "_refresh", "rebind check"),
    (graphdl.train, "measure", "metrics"),
    (graphdl.train, "magnitude", "finiteness"),
]
INSIDE_STEPS = ("plain steps", "batch views", "rebind check")


def timed(fn: Callable, times: list[float]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)
    return wrapper


@contextlib.contextmanager
def timing(parts: list[tuple[Any, str, str]]) -> Iterator[dict[str, list[float]]]:
    """Each part (where it is looked up, its name there, what to call it) wrapped in a
    timer while the block runs: {what to call it: the calls' seconds}."""
    times: dict[str, list[float]] = {name: [] for _, _, name in parts}
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in parts]
    try:
        for owner, attr, name in parts:
            setattr(owner, attr, timed(getattr(owner, attr), times[name]))
        yield times
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def measure(width: int, batch: int, epochs: int) -> dict[str, float]:
    """Each part's median µs an epoch (a part called several times an epoch: their sum),
    then a fit call's "setup" and "first extra" (its first epoch's time over its second)."""
    model = bench.build_model(bench.initial_weights(width), "tanh")
    X, Y = bench.disk_data(bench.points(batch), "cpu")

    def fit(n: int) -> None:
        model.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=bench.LR, momentum=bench.MOMENTUM), epochs=n,
                  batch_size=batch, shuffle=True, seed=bench.SEED, verbose=False)

    fit(3)  # compiled, bound, kernels chosen
    with timing(PARTS) as times:
        fit(epochs)
    per_epoch = {name: statistics.median(_per_epoch(t, epochs)) * 1e6 for name, t in times.items()}
    outside = ("steps", "metrics", "finiteness")
    per_epoch["(rest)"] = per_epoch["epoch"] - sum(per_epoch[name] for name in outside)
    # A fit call besides its epochs: fits of two epochs, each timed whole and epoch by epoch
    setup, first = [], []
    with timing([(graphdl.train._Run, "epoch", "epoch")]) as times:
        for _ in range(7):
            epoch_times = times["epoch"]
            epoch_times.clear()
            start = time.perf_counter()
            fit(2)
            whole = time.perf_counter() - start
            setup.append(whole - sum(epoch_times))
            first.append(epoch_times[0] - epoch_times[1])
    per_epoch["setup"] = statistics.median(setup) * 1e6
    per_epoch["first extra"] = statistics.median(first) * 1e6
    return per_epoch


def _per_epoch(times: list[float], epochs: int) -> list[float]:
    """The calls' times summed epoch by epoch (a part called k times an epoch, k > 1)."""
    k = max(1, len(times) // epochs)
    return [sum(times[i:i + k]) for i in range(0, k * epochs, k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=25)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args.width, args.batch, args.epochs)
    steps = bench.points(args.batch) // args.batch
    print(f"2-{args.width}-{args.width}-{args.width}-1 tanh net, batch {args.batch}, {steps} steps an epoch, "
          f"1 thread: median µs an epoch")
    for name in ("epoch", "steps", *INSIDE_STEPS, "metrics", "finiteness", "(rest)"):
        indent = "    " if name in INSIDE_STEPS else "  "
        print(f"{indent}{name:<{16 - len(indent)}} {r[name]:10.1f}")
    print(f"a fit call besides its epochs: {r['setup']:.1f} µs to set up, and its first epoch takes "
          f"{r['first extra']:.1f} µs longer than the next")


if __name__ == "__main__":
    main()
