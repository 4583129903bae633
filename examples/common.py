"""What the examples share: their flags, checked as argparse checks them (a mistake is one
line on stderr, `PROG: error: argument --lr: must be > 0, got -1 (see --help)`, and exit
status 2, never a traceback from deep inside training), and writing a model file."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import graphdl as gd


class Parser(argparse.ArgumentParser):
    """argparse, with each mistake reported on one line and `--help` showing the defaults."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except for switches and flags that are unset by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unset = action.default is None or action.default is False
        return action.help if unset else super()._get_help_string(action)


def number(kind: type, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` (int or float) in [low, high), or (low, high) with low_open."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not (low < value if low_open else low <= value) or not value < high:
            bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


def training_flags(parser: Parser, epochs: int, batch_size: int, lr: float, momentum: float) -> None:
    """The flags both examples share: seed, SGD settings, threads, figures and --save."""
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seeds data, initial weights and shuffling")
    parser.add_argument("--epochs", type=number(int, 1), default=epochs, help="passes over the training set")
    parser.add_argument("--batch-size", type=number(int, 1), default=batch_size, help="examples per SGD step")
    parser.add_argument("--lr", type=number(float, 0, low_open=True), default=lr,
                        help="base learning rate, annealed to 0 by a cosine schedule")
    parser.add_argument("--momentum", type=number(float, 0, 1), default=momentum, help="SGD momentum, in [0, 1)")
    parser.add_argument("--threads", type=number(int, 1), default=None,
                        help="torch CPU threads while training (default: fit's choice, which is one for a net "
                             "this small)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--out", default="out", help="folder for the figures (created if need be)")
    parser.add_argument("--save", metavar="PATH", default=None,
                        help="also write the trained model there, e.g. out/model.gdl (by default no model file "
                             "is written; reload it with gd.load)")


def save(model: gd.Sequential, path: str, what: str) -> bool:
    """Write the model file (making its folder) and say where; False, with a one-line
    message on stderr, if it cannot."""
    import graphdl as gd

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        model.save(path)
    except (gd.GraphError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    print(f"wrote {path}: {what} (load it with gd.load)")
    return True
