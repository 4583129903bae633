"""The digits CNN's training step: graphdl's against PyTorch eager, per batch of 32.

The net is examples/digits_cnn.py's (Reshape((1, 8, 8)), Conv2d(1, 16, 3, padding=1),
BatchNorm2d(16), ReLU, MaxPool2d(2), Dropout(0.25), Flatten, Linear(256, 10)), on rows of
64 random pixels and random labels, with CrossEntropy and SGD (momentum 0.9):

  graphdl   gd.TrainStep, the step fit runs (forward, loss, backward, update and the
            buffers' next values: the running statistics and Dropout's key), over an
            epoch of batches (`TrainStep.epoch`)
  eager     the same net in torch.nn (the same weights) + autograd + torch.optim.SGD,
            one step per batch: zero_grad, forward, loss, backward, step

One torch thread. The contenders alternate, an epoch of `--batches` steps each, and
each one's median time per step over `--rounds` epochs is printed, with the ratio.

    PYTHONPATH=. python tools/bench_cnn.py
    PYTHONPATH=. python tools/bench_cnn.py --device cuda   # on a GPU: the step captured as a CUDA graph
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import graphdl as gd  # noqa: E402


def cnn(gen: torch.Generator) -> gd.Sequential:
    return gd.Sequential(
        gd.Reshape((1, 8, 8)), gd.Conv2d(1, 16, 3, padding=1, generator=gen), gd.BatchNorm2d(16), gd.ReLU(),
        gd.MaxPool2d(2), gd.Dropout(0.25, generator=gen), gd.Flatten(), gd.Linear(256, 10, generator=gen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=15, help="timed epochs per contender")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    n = args.batch_size * args.batches
    X = torch.rand(n, 64, generator=gen).to(device)
    labels = torch.randint(0, 10, (n,), generator=gen)
    Y = torch.nn.functional.one_hot(labels, 10).float().to(device)
    model = cnn(gen).to(device)
    net = model.to_torch().to(device)  # the same net in torch.nn, with copies of its weights
    step = gd.TrainStep(model, gd.CrossEntropy(), gd.SGD(lr=0.01, momentum=0.9))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    labels = labels.to(device)

    def graphdl_epoch() -> None:
        step.epoch(X, Y, args.batch_size, None, 0.01).sum().item()

    def eager_epoch() -> None:
        total = torch.zeros((), device=device)
        for s in range(0, n, args.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(X[s:s + args.batch_size]), labels[s:s + args.batch_size])
            loss.backward()
            opt.step()
            total += loss.detach()
        total.item()

    contenders = {"graphdl": graphdl_epoch, "eager": eager_epoch}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm up: compile, allocate, capture
        fn()
        fn()
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / args.batches)
    median = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread"
    print(f"digits CNN, batch {args.batch_size}, {where}: median per step over {args.rounds} epochs of "
          f"{args.batches} steps")
    for name, us in median.items():
        print(f"  {name:8s} {us:9.1f} us")
    print(f"  graphdl / eager = {median['graphdl'] / median['eager']:.2f}")


if __name__ == "__main__":
    main()
