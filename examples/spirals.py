"""Three-class classification: points on three interleaved spirals, with CrossEntropy.

1,500 training and 1,500 test points in the unit disk, a third on each of three spiral
arms (each winding 1.6 turns outwards, with angular noise), labelled 0, 1 or 2. A
Standardize-2-32-32-3 tanh net is trained on the integer labels with CrossEntropy (the
net outputs logits; the class is the argmax), then gd.Softmax() is appended so that the
model outputs class probabilities, and that is the model --save writes.

    python examples/spirals.py                          # one run, the figure in out/
    python examples/spirals.py --save out/spirals.gdl   # ... and the model
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from common import Parser, save, training_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import graphdl as gd  # noqa: E402

CLASSES, TURN, NOISE = 3, 10.0, 0.2  # TURN: radians an arm winds from the centre to radius 1


def spiral_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points [n, 2] and their arms [n] (integer class labels 0, 1, 2)."""
    arm = torch.randint(0, CLASSES, (n,), generator=gen)
    r = torch.rand(n, generator=gen)
    angle = TURN * r + arm * (2 * math.pi / CLASSES) + NOISE * torch.randn(n, generator=gen)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1), arm


def make_model(X: torch.Tensor, gen: torch.Generator) -> gd.Sequential:
    """Standardize (fitted to X), then 2-32-32-3 with tanh: three logits, one per class."""
    return gd.Sequential(
        gd.Standardize().adapt(X),
        gd.Linear(2, 32, generator=gen), gd.Tanh(),
        gd.Linear(32, 32, generator=gen), gd.Tanh(),
        gd.Linear(32, CLASSES, generator=gen),
    )


def run(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    X, y = spiral_data(1500, gen)
    Xt, yt = spiral_data(1500, gen)
    model = make_model(X, gen)
    started = time.perf_counter()
    history = model.fit(X, y, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=args.lr, momentum=args.momentum),
                        schedule=gd.CosineDecay(args.epochs), epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(Xt, yt), seed=args.seed, verbose=args.verbose, threads=args.threads)
    seconds = time.perf_counter() - started
    # The trained layers (the same live tensors) with a softmax on top: probabilities out.
    probabilities = gd.Sequential(*model.layers, gd.Softmax())
    return {"model": model, "probabilities": probabilities, "history": history, "seconds": seconds,
            "train": model.evaluate(X, y), "test": model.evaluate(Xt, yt), "Xt": Xt, "yt": yt}


def plot(result: dict, out: str) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    os.makedirs(out, exist_ok=True)
    colours = ["tab:blue", "tab:orange", "tab:green"]
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1, 1.15]})
    grid = torch.linspace(-1.1, 1.1, 300)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    p = result["probabilities"].predict(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1))
    regions, confidence = p.argmax(1).reshape(gx.shape), p.max(1).values.reshape(gx.shape)
    ax.imshow(regions.numpy(), origin="lower", extent=(-1.1, 1.1, -1.1, 1.1), cmap=ListedColormap(colours),
              alpha=(0.15 + 0.25 * confidence).numpy(), interpolation="nearest")
    Xt, yt = result["Xt"], result["yt"]
    wrong = result["model"].predict(Xt).argmax(1) != yt
    for k in range(CLASSES):
        pts = Xt[(yt == k) & ~wrong].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=5, c=colours[k], label=f"class {k}")
    pts = Xt[wrong].numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=30, marker="x", c="black", lw=1, label=f"wrong ({int(wrong.sum())})")
    ax.set(xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), aspect="equal",
           title=f"test set and the net's classes: {result['test']['accuracy'] * 100:.2f}% right")
    ax.legend(loc="lower left", fontsize=8)
    h = result["history"]
    epochs = range(1, h.epochs + 1)
    curves.plot(epochs, h["loss"], c="tab:blue", label="train loss (cross-entropy)")
    curves.plot(epochs, h["val_loss"], c="tab:orange", label="test loss")
    curves.plot(epochs, [1 - a for a in h["val_accuracy"]], "--", c="tab:red", label="test error")
    curves.set(xlabel="epoch", yscale="log", title="per epoch")
    curves.legend(fontsize=8)
    curves.grid(alpha=0.3)
    path = os.path.join(out, "spirals.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [(path, "the test set over the net's decision regions, and the curves per epoch")]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="spirals.py", description=__doc__.splitlines()[0])
    training_flags(parser, epochs=100, batch_size=20, lr=0.1, momentum=0.9)
    parser.add_argument("--verbose", action="store_true", help="print a line per epoch")
    args = parser.parse_args(argv)

    result = run(args)
    if args.save is not None and not save(result["probabilities"], args.save,
                                          "the trained model with a softmax on top: class probabilities"):
        return 1
    if not args.no_plots:
        for path, what in plot(result, args.out):
            print(f"wrote {path}: {what}")
    print(f"trained in {result['seconds']:.2f}s")
    for name in ("train", "test"):
        scores = result[name]
        print(f"{name}: cross-entropy {scores['loss']:.4f}, accuracy {scores['accuracy'] * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
