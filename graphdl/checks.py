"""Checked readers for the settings users pass (learning rates, epochs, seeds, flags...).

Every public argument that is a number goes through `real` or `whole`, so each accepts
what a PyTorch or Keras user would pass (any real number type: int, float, numpy
scalars, fractions) and refuses, with a `ValueError` naming the argument and the allowed
range, what would fail later or compute nonsense: bools, complex numbers, strings,
NaN, infinities and ints too large for a float (`10**400`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .ir import show_number


def shown(value: Any) -> str:
    """`repr(value)`, shortened: a 400-digit int would otherwise fill the screen."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit limit for str()
        return show_number(value)
    if len(text) <= 40:
        return text
    digits = f" ({len(str(abs(value)))} digits)" if isinstance(value, int) else ""
    return f"{text[:12]}...{text[-8:]}{digits}"


def _hint(value: Any) -> str:
    return "; pass a Python number, e.g. float(t) or t.item()" if isinstance(value, torch.Tensor) else ""


def real(name: str, value: Any, low: float = -math.inf, high: float = math.inf, high_open: bool = False) -> float:
    """`value` as a float, if it is a finite real number in [low, high] ([low, high) with
    `high_open`); otherwise a ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}{_hint(value)}")
    try:
        number = float(value)
    except OverflowError:  # 10**400, or a Fraction of huge ints
        raise ValueError(f"{name}={shown(value)} is too large for a float; {name} must be a finite number "
                         f"in [{low}, {high}{')' if high_open else ']'}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    if number < low or number > high or (high_open and number == high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {shown(value)}")
    return number


def flag(name: str, value: Any) -> bool:
    """`value` if it is True or False; otherwise a ValueError naming `name` (1, "yes" or
    a tensor would otherwise be taken for a flag)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {shown(value)}")
    return value


def whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int, if it is a whole number (int, numpy int, not bool) in [low, high];
    otherwise a ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        bounds = f" >= {low}" if high is None else f" in [{low}, {high}]"
        raise ValueError(f"{name} must be a whole number{bounds}, got {shown(value)}{_hint(value)}")
    number = int(value)
    if number < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {shown(value)}")
    if high is not None and number > high:
        raise ValueError(f"{name}={shown(value)} is too large; {name} must be at most {high}")
    return number
