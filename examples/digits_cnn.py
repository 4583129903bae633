"""Handwritten digits with a small convolutional net, beside an MLP, on scikit-learn's 8x8 digits.

scikit-learn's bundled digits (1,797 images of 8x8 pixels, 0 to 16, ten classes; no
download) are split 75 % / 25 % into training and test sets, seeded. The CNN is

    Reshape((1, 8, 8)), Conv2d(1, 16, 3, padding=1), BatchNorm2d(16), ReLU(),
    MaxPool2d(2), Dropout(0.25), Flatten(), Linear(16 * 4 * 4, 10)

trained on the integer labels with CrossEntropy (BatchNorm on the batch's statistics and
Dropout dropping in fit; the running statistics and no dropout in evaluate and predict).
An MLP of 64-64-10 (tanh) is trained the same way for comparison. The figure shows the
CNN's confusion matrix on the test set and the test digits it gets wrong.

    python examples/digits_cnn.py                         # both nets, the figure in out/
    python examples/digits_cnn.py --save out/digits.gdl   # ... and the CNN's model file

It needs scikit-learn (`pip install graphdl[examples]`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from common import Parser, save, training_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import graphdl as gd  # noqa: E402

CLASSES = 10


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, y, X_test, y_test): rows of 64 pixels scaled to [0, 1] and their digits, 3:1."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    cut = len(X) * 3 // 4
    return X[order[:cut]], y[order[:cut]], X[order[cut:]], y[order[cut:]]


def cnn(gen: torch.Generator) -> gd.Sequential:
    return gd.Sequential(
        gd.Reshape((1, 8, 8)),
        gd.Conv2d(1, 16, 3, padding=1, generator=gen), gd.BatchNorm2d(16), gd.ReLU(), gd.MaxPool2d(2),
        gd.Dropout(0.25, generator=gen), gd.Flatten(),
        gd.Linear(16 * 4 * 4, CLASSES, generator=gen),
    )


def mlp(gen: torch.Generator) -> gd.Sequential:
    return gd.Sequential(gd.Linear(64, 64, generator=gen), gd.Tanh(), gd.Linear(64, CLASSES, generator=gen))


def train(model: gd.Sequential, data: tuple, args: argparse.Namespace) -> dict:
    X, y, Xt, yt = data
    started = time.perf_counter()
    history = model.fit(X, y, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=args.lr, momentum=args.momentum),
                        schedule=gd.CosineDecay(args.epochs), epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(Xt, yt), seed=args.seed, verbose=args.verbose, threads=args.threads)
    return {"model": model, "history": history, "seconds": time.perf_counter() - started,
            "test": model.evaluate(Xt, yt)}


def run(args: argparse.Namespace) -> dict:
    data = digits(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    result = {"cnn": train(cnn(gen), data, args), "mlp": train(mlp(gen), data, args)}
    Xt, yt = data[2], data[3]
    result["Xt"], result["yt"], result["pred"] = Xt, yt, result["cnn"]["model"].predict(Xt).argmax(1)
    return result


def plot(result: dict, out: str) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    Xt, yt, pred = result["Xt"], result["yt"], result["pred"]
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    confusion.index_put_((yt, pred), torch.ones_like(yt), accumulate=True)
    wrong = (pred != yt).nonzero().flatten()[:24].tolist()
    fig = plt.figure(figsize=(13, 5.5))
    grid = fig.add_gridspec(4, 12)
    ax = fig.add_subplot(grid[:, :5])
    ax.imshow(confusion.numpy(), cmap="Blues")
    for i in range(CLASSES):
        for j in range(CLASSES):
            if confusion[i, j]:
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ax.set(xticks=range(CLASSES), yticks=range(CLASSES), xlabel="predicted", ylabel="true digit",
           title=f"CNN on the test set: {result['cnn']['test']['accuracy'] * 100:.2f}% right")
    for k, i in enumerate(wrong):
        cell = fig.add_subplot(grid[k // 6, 6 + k % 6])
        cell.imshow(Xt[i].reshape(8, 8).numpy(), cmap="gray_r")
        cell.set_title(f"{int(yt[i])} as {int(pred[i])}", fontsize=8)
        cell.axis("off")
    if not wrong:
        fig.text(0.75, 0.5, "no test digit wrong", ha="center")
    fig.suptitle(f"the test digits the CNN gets wrong ({int((pred != yt).sum())} of {len(yt)}), "
                 "true as predicted", x=0.75, y=0.98, fontsize=10)
    path = os.path.join(out, "digits_cnn.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [(path, "the CNN's confusion matrix on the test set, and the test digits it gets wrong")]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="digits_cnn.py", description=__doc__.splitlines()[0])
    training_flags(parser, epochs=30, batch_size=32, lr=0.05, momentum=0.9)
    parser.add_argument("--verbose", action="store_true", help="print a line per epoch")
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("error: digits_cnn.py needs scikit-learn for its data; install it with "
              "pip install 'graphdl[examples]'", file=sys.stderr)
        return 1

    result = run(args)
    if args.save is not None and not save(result["cnn"]["model"], args.save, "the trained CNN (logits)"):
        return 1
    if not args.no_plots:
        for path, what in plot(result, args.out):
            print(f"wrote {path}: {what}")
    for name, title in (("cnn", "CNN"), ("mlp", "MLP")):
        scores = result[name]
        print(f"{title}: test accuracy {scores['test']['accuracy'] * 100:.2f}% (cross-entropy "
              f"{scores['test']['loss']:.4f}), trained in {scores['seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
