"""The reference experiment: classify points of [0,1]² as inside or outside a disk.

1,000 training and 1,000 test points, uniform in [0,1]²; label 1 inside the disk of
radius 1/sqrt(2π) centred at (0.5, 0.5) (area 1/2, so the classes are balanced), 0
outside. A 2-25-25-25-1 net, with the inputs standardised inside the model, trained with
MSE and SGD; the loss is logged every epoch and the run ends with the train and test error.

    python examples/disk_graph.py                 # one run, figures in out/
    python examples/disk_graph.py --save out/disk.gdl     # ... and the trained model
    python examples/disk_graph.py --seeds 10 --no-plots   # median/best/worst over seeds 0..9
    torchrun --standalone --nproc_per_node 2 examples/disk_graph.py   # data-parallel, same result
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from common import Parser, number, save, training_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import graphdl as gd  # noqa: E402

RADIUS = 1 / math.sqrt(2 * math.pi)


def disk_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points uniform in [0,1]² and their labels (1 inside the disk, 0 outside)."""
    X = torch.rand(n, 2, generator=gen)
    Y = (((X - 0.5) ** 2).sum(1, keepdim=True) < RADIUS**2).float()
    return X, Y


def make_model(X: torch.Tensor, gen: torch.Generator) -> gd.Sequential:
    """Standardize, then 2-25-25-25-1: the inputs centred and scaled with the training
    set's statistics (X), so tanh units start in their steep range, and kept in the model,
    so a saved model takes raw points; tanh hidden layers (zero-centred, smooth: easy for
    SGD on a round boundary) and a linear output, thresholded at 0.5 (a sigmoid there
    trains slower under MSE, its gradient vanishing on confident mistakes)."""
    return gd.Sequential(
        gd.Standardize().adapt(X),
        gd.Linear(2, 25, generator=gen), gd.Tanh(),
        gd.Linear(25, 25, generator=gen), gd.Tanh(),
        gd.Linear(25, 25, generator=gen), gd.Tanh(),
        gd.Linear(25, 1, generator=gen),
    )


def run(args: argparse.Namespace, seed: int, verbose: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    X, Y = disk_data(1000, gen)
    Xt, Yt = disk_data(1000, gen)
    init = gen.get_state()
    model = make_model(X, gen)

    distributed = gd.distributed.world_size() > 1
    # The figure shows each layer's gradient health (computed in the step, read once an
    # epoch; it changes nothing in training); a run without figures does without.
    monitor = None if args.no_plots or distributed else ["grad_norm", "update_ratio"]

    def train(model: gd.Sequential, shuffle: bool, verbose: bool, monitor: list[str] | None = None) -> gd.History:
        return model.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=args.lr, momentum=args.momentum),
                         schedule=gd.CosineDecay(args.epochs), epochs=args.epochs, batch_size=args.batch_size,
                         shuffle=shuffle, validation_data=(Xt, Yt), seed=seed, verbose=verbose, threads=args.threads,
                         distributed=distributed, monitor=monitor)

    started = time.perf_counter()
    gd.TrainStep(model, gd.MSE(), gd.SGD(), monitor=monitor or ())  # compile the step now (fit reuses it)
    compiled = time.perf_counter()
    history = train(model, shuffle=True, verbose=verbose, monitor=monitor)
    seconds = time.perf_counter() - compiled
    result = {
        "model": model, "history": history, "seconds": seconds, "compile_seconds": compiled - started,
        "train_error": model.evaluate(X, Y)["error"], "test_error": model.evaluate(Xt, Yt)["error"],
        "X": X, "Y": Y, "Xt": Xt, "Yt": Yt, "pred": model.predict(Xt),
    }
    if not args.no_plots:  # the same initial weights, trained without shuffling, for comparison
        gen.set_state(init)
        result["history_no_shuffle"] = train(make_model(X, gen), shuffle=False, verbose=False)
    return result


def plot(result: dict, out: str) -> list[tuple[str, str]]:
    """The figures, and the graphs drawn: a list of (path, what it shows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    Xt, Yt, pred = result["Xt"], result["Yt"], result["pred"]
    right = ((pred > 0.5) == (Yt > 0.5)).squeeze(1)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(*Xt[right].T, s=8, c="tab:green", label=f"correct ({int(right.sum())})")
    ax.scatter(*Xt[~right].T, s=14, c="tab:red", label=f"wrong ({int((~right).sum())})")
    ax.add_patch(plt.Circle((0.5, 0.5), RADIUS, fill=False, color="black", lw=1.2))
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal",
           title=f"test set: {result['test_error'] * 100:.2f}% error")
    ax.legend(loc="upper right", fontsize=8)
    paths = [(os.path.join(out, "disk_predictions.png"), "the test set, right and wrong")]
    fig.savefig(paths[-1][0], dpi=110, bbox_inches="tight")
    plt.close(fig)

    monitored = [key.split("/", 1)[1] for key in result["history"] if key.startswith("grad_norm/")]
    fig, grid = plt.subplots(2 if monitored else 1, 2, figsize=(11, 8 if monitored else 4), squeeze=False)
    axes = grid[0]
    runs = [("shuffled", result["history"], "-")]
    if "history_no_shuffle" in result:
        runs.append(("not shuffled", result["history_no_shuffle"], "--"))
    for label, h, style in runs:
        epochs = range(1, h.epochs + 1)
        axes[0].plot(epochs, h["loss"], style, c="tab:blue", label=f"train, {label}")
        axes[0].plot(epochs, h["val_loss"], style, c="tab:orange", label=f"test, {label}")
        axes[1].plot(epochs, h["accuracy"], style, c="tab:blue", label=f"train, {label}")
        axes[1].plot(epochs, h["val_accuracy"], style, c="tab:orange", label=f"test, {label}")
    axes[0].set(xlabel="epoch", ylabel="MSE loss", yscale="log", title="loss per epoch")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy per epoch", ylim=(0.8, 1.0))
    if monitored:  # the shuffled run's gradient health, per layer
        h = result["history"]
        epochs = range(1, h.epochs + 1)
        for layer in monitored:
            grid[1][0].plot(epochs, h[f"grad_norm/{layer}"], label=layer)
            grid[1][1].plot(epochs, h[f"update_ratio/{layer}"], label=layer)
        grid[1][0].set(xlabel="epoch", ylabel="‖gradient‖", yscale="log", title="gradient norm per layer")
        grid[1][1].set(xlabel="epoch", ylabel="‖update‖ / ‖weights‖", yscale="log",
                       title="update / weight ratio per layer")
    for ax in grid.flat:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append((os.path.join(out, "disk_curves.png"), "loss and accuracy per epoch" +
                  (", gradient health per layer" if monitored else "")))
    fig.savefig(paths[-1][0], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths + draw_graphs(result["model"], out)


def draw_graphs(model: gd.Sequential, out: str) -> list[tuple[str, str]]:
    """The training graph (forward + MSE) and its gradient graph, as SVG (or DOT text
    when Graphviz's `dot` program is not installed)."""
    loss_graph = model.graph(loss=gd.MSE(), name="disk")
    grad_graph = gd.grad(loss_graph, wrt=list(model.parameters()))
    paths = []
    for name, graph, what in (("disk_graph", loss_graph, "the training graph"),
                              ("disk_grad_graph", grad_graph, "its gradient graph")):
        try:
            paths.append((str(gd.render(graph, os.path.join(out, f"{name}.svg"))), what))
        except gd.DotNotFoundError as e:
            print(f"{e}; writing {name}.dot instead", file=sys.stderr)
            paths.append((str(gd.render(graph, os.path.join(out, f"{name}.dot"))), what))
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="disk_graph.py", description=__doc__.splitlines()[0])
    training_flags(parser, epochs=50, batch_size=20, lr=0.1, momentum=0.9)
    parser.add_argument("--seeds", type=number(int, 1), default=None, metavar="N",
                        help="run seeds 0..N-1 and report the median, best and worst test error, instead of "
                             "one run")
    parser.add_argument("--timings", action="store_true", help="print the seconds spent compiling and training")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.save is not None:
        parser.error("--save keeps one trained model; drop --seeds, or pick the run with --seed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if gd.distributed.init().rank != 0:  # under torchrun, every rank trains; rank 0 reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
    if args.seeds is not None:
        errors = []
        for seed in range(args.seeds):
            r = run(args, seed, verbose=False)
            errors.append(r["test_error"])
            print(f"seed {seed}: train error {r['train_error'] * 100:.2f}%  test error "
                  f"{r['test_error'] * 100:.2f}%  ({r['seconds']:.2f}s)", flush=True)
        print(f"test error over {args.seeds} seeds: median {statistics.median(errors) * 100:.2f}%  "
              f"best {min(errors) * 100:.2f}%  worst {max(errors) * 100:.2f}%")
        return 0

    result = run(args, args.seed, verbose=True)
    if args.save is not None and not save(result["model"], args.save, "the trained model, Standardize included"):
        return 1
    if not args.no_plots and gd.distributed.is_main():
        for path, what in plot(result, args.out):
            print(f"wrote {path}: {what}")
    print(f"trained in {result['seconds']:.2f}s")
    if args.timings:  # tools/bench.py --startup adds the import and exit times it measures outside
        print(f"time: compile={result['compile_seconds']:.4f}s training={result['seconds']:.4f}s")
    print(f"train error: {result['train_error'] * 100:.2f}%")
    print(f"test error: {result['test_error'] * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
