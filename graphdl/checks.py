"""Checked readers of every number and name that comes from outside, and the errors they raise.

Two families, one rule: a value from outside is checked before it is used, and a wrong
one is named in the error, with the range it must be in.

- From files and IR text (model headers, layer lists, ONNX, `parse`): `read_int`,
  `read_shape`, `read_float` raise `GraphError` naming the field, so no OverflowError,
  torch RuntimeError or int() digit-limit ValueError escapes, and no size reaches torch
  that it cannot even describe.
- From users' settings (learning rates, epochs, seeds, flags): `real`, `whole`, `flag`
  accept what a PyTorch or Keras user would pass (any real number type: int, float,
  numpy scalars, fractions) and raise `ValueError` naming the argument for what would
  fail later or compute nonsense: bools, complex numbers, strings, NaN, infinities and
  ints too large for a float (`10**400`).

The tensors users hand over are checked here too: `tensor_problem` (sparse, nested,
quantized) and `check_param_tensor` (a param's dense float tensor).

This module is graphdl's floor: it imports nothing of graphdl, and every other module
may import it. The types' names (`f32[N,25]`) are here too, since the messages use them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

Dim = int | str
Shape = tuple[Dim, ...]

DTYPES: dict[str, torch.dtype] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i64": torch.int64,  # indices (gd.Embedding, index_select): graph inputs only, never differentiated
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES: dict[str, torch.dtype] = {k: v for k, v in DTYPES.items() if v.is_floating_point}

class GraphError(ValueError):
    """An invalid graph, shape, feed, IR text or model file.

    The message names what is wrong (node, op, shapes, input) and how to fix it.
    """


GraphError.__module__ = "graphdl"  # tracebacks print the name users catch it by: graphdl.GraphError


class ShapeError(Exception):
    """Raised by an op's shape rule; `Graph.add_node` turns it into a `GraphError`
    that also names the node, its inputs and where it was created."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


# These run once per printed or compiled node: map(str, ...) and no eagerly built default
# for .get make format_type 1.4 µs instead of 2.2.
def format_shape(shape: Shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def dtype_name(dtype: torch.dtype) -> str:
    name = DTYPE_NAMES.get(dtype)
    return name if name is not None else str(dtype).removeprefix("torch.")


def format_type(dtype: torch.dtype, shape: Shape) -> str:
    return dtype_name(dtype) + format_shape(shape)


# -- numbers from outside --------------------------------------------------------------
# Every number graphdl reads from IR text, a model file's header or its layer list goes
# through read_int, read_shape or read_float. Each raises GraphError naming the field, so
# no OverflowError, torch RuntimeError or int() digit-limit ValueError escapes, and no
# size reaches torch that it cannot even describe.

INT64_MAX = 2**63 - 1  # torch's sizes, element counts and byte counts are int64
_MAX_DIGITS = 20  # a longer run of digits is out of any range here; int() need not read it


class NumberText(str):
    """A number from a file kept as its text, because reading it is unsafe or lossy: an
    integer of thousands of digits, or a float literal beyond float64 such as 1e400.
    The readers refuse it, quoting the text."""


def whole_number(text: str) -> int | NumberText:
    """The int that a run of ASCII digits (with an optional '-') spells, or NumberText if
    it is too long to be in range (so a 5,000-digit dim costs nothing to refuse)."""
    return int(text) if len(text.lstrip("-")) <= _MAX_DIGITS else NumberText(text)


def show_number(value: object) -> str:
    """A number (or whatever came instead) for a message, cut short."""
    if isinstance(value, NumberText):
        digits = value.lstrip("-").isdigit()
        return f"{value[:10]}... ({len(value)} {'digits' if digits else 'characters'})" if len(value) > 24 else value
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 133:  # over 40 digits
        return f"{'-' if value < 0 else ''}2**{value.bit_length() - 1} or more"
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "..."


def _bound(n: int) -> str:
    return "2**63 - 1" if n == INT64_MAX else str(n)


def read_int(value: object, field: str, low: int = 0, high: int = INT64_MAX) -> int:
    """`value` as an int in [low, high]; otherwise GraphError naming `field`.

    Only an int is a whole number here: a bool, a float (even 3.0), a str of digits or a
    NumberText is refused, so a file cannot pass a width as true, 25.0 or "25".
    """
    wanted = f"{field} must be a whole number from {_bound(low)} to {_bound(high)}"
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "" if isinstance(value, (float, NumberText)) else f" (a {type(value).__name__})"
        raise GraphError(f"{wanted}, got {show_number(value)}{kind}")
    if not low <= value <= high:
        raise GraphError(f"{wanted}, got {show_number(value)}")
    return value


def read_shape(dims: Sequence[object], field: str, dtype: torch.dtype, symbolic: bool = True) -> Shape:
    """A shape of whole numbers and, if `symbolic`, symbols (such as "N"), each dim and the
    tensor's byte count within int64 (a symbol counts as 1), so torch can describe it."""
    def is_symbol(d: object) -> bool:
        return symbolic and isinstance(d, str) and not isinstance(d, NumberText) and d.isidentifier()

    shape = tuple(d if is_symbol(d) else read_int(d, f"{field}: dimension {i}") for i, d in enumerate(dims))
    count = math.prod(d for d in shape if isinstance(d, int))
    if count * dtype.itemsize > INT64_MAX:
        raise GraphError(f"{field}: {format_type(dtype, shape)} holds {show_number(count)} elements, more bytes "
                         "than a tensor can hold (torch counts them in int64)")
    return shape


def read_float(value: object, field: str, dtype: torch.dtype) -> float:
    """A real number (int, float, numpy scalar, fraction) as the float `dtype` will hold.
    nan and +-inf stay as they are (they say what they are); a number beyond float64
    (10**400, or a NumberText such as 1e400) or a finite one that `dtype` would turn into
    inf (1e5 in f16) is refused."""
    too_large = f"{field} {show_number(value)} is too large for a float; write inf if that is meant"
    if isinstance(value, NumberText):
        raise GraphError(too_large)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GraphError(f"{field} must be a number, got {show_number(value)} (a {type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:
        raise GraphError(too_large) from None
    # Past the largest finite value, whether it rounds down or to inf is torch's call (the
    # lowering builds the constant with torch.tensor); on the CPU, even under torch.device("meta").
    if math.isfinite(number) and abs(number) > torch.finfo(dtype).max and \
            not math.isfinite(torch.tensor(number, dtype=dtype, device="cpu").item()):
        raise GraphError(f"{field} {show_number(value)} does not fit {dtype_name(dtype)} (largest finite value "
                         f"{torch.finfo(dtype).max:.6g}): it would silently become inf; write inf if that is "
                         "meant, or use a wider dtype")
    return number


def check_dtype(what: str, dtype: Any, integer: bool = False) -> None:
    """`dtype` must be a floating dtype the IR has, or with `integer` (a graph input) also
    its integer dtype, torch.int64, for indices."""
    allowed = DTYPES if integer else FLOAT_DTYPES
    if not isinstance(dtype, torch.dtype) or dtype not in allowed.values():
        hint = f"; did you mean {DTYPES[dtype]}?" if isinstance(dtype, str) and dtype in allowed else ""
        supported = ", ".join(str(d) for d in allowed.values())
        raise GraphError(f"{what}: dtype {dtype!r} is not supported; use one of {supported}{hint}")


def tensor_problem(t: torch.Tensor) -> str | None:
    """What makes `t` unusable as graphdl data (None if nothing): graphdl computes on
    dense (strided) tensors of any layout, not sparse, nested or quantized ones."""
    if t.layout != torch.strided:
        return f"is a {str(t.layout).removeprefix('torch.')} tensor; convert it with .to_dense()"
    if t.is_nested:
        return "is a nested tensor; pad it to a dense tensor first"
    if t.is_quantized:
        return "is a quantized tensor; convert it with .dequantize()"
    return None


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite (a host sync). One pass of aminmax, whose
    min and max are NaN where any element is NaN and -inf or inf where one is: 7 ms for
    47M float32 values (MNIST's training images) on one thread of the Zen 5 EPYC, against
    200 ms for isfinite().all(), which makes a temporary of |t| and one of bools, each a
    pass over fresh memory. Integer, bool and empty tensors are finite; complex ones,
    which aminmax does not take, are checked with isfinite, and the float8s (which
    neither takes them all) in float32, which holds each of their values exactly."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    if t.dtype not in _AMINMAX_DTYPES:
        t = t.float()
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


_AMINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def finite_mask(t: torch.Tensor) -> torch.Tensor:
    """isfinite(t), for every float dtype (the float8s in float32): to find the first bad
    value once `all_finite` said there is one."""
    wide = t.is_floating_point() and t.dtype not in _AMINMAX_DTYPES
    return torch.isfinite(t.float() if wide else t)


def declared_with(obj: Any, flag: str, method: str) -> bool:
    """`flag` (a class attribute such as Layer.rows_apart) as said alongside `method`: the
    first of `obj`'s own attributes and then its classes' (the most derived first) that
    sets `flag` or defines `method` decides, and one that defines `method` without
    setting `flag` says False. So what overrides `method` (a subclass, or an instance's
    own `forward`) must say `flag` again, and a subclass may say it outright. Read at
    each call, so a method replaced later counts."""
    cls = obj if isinstance(obj, type) else type(obj)
    own = [] if isinstance(obj, type) else [getattr(obj, "__dict__", {})]  # (an object of __slots__ has none)
    scopes = [*own, *(vars(k) for k in cls.__mro__)]
    for scope in scopes:
        if flag in scope:
            return bool(scope[flag])
        if method in scope:
            return False
    return False


def check_param_tensor(what: str, t: Any) -> None:
    """A param's tensor must be a dense tensor of a floating dtype the IR has (indices, i64, are inputs)."""
    if not isinstance(t, torch.Tensor):
        raise GraphError(f"{what}: its value must be a torch.Tensor, got {type(t).__name__}")
    problem = tensor_problem(t)
    if problem:
        raise GraphError(f"{what} {problem}")
    if t.dtype not in FLOAT_DTYPES.values():
        supported = ", ".join(str(d) for d in FLOAT_DTYPES.values())
        raise GraphError(f"{what}: dtype {t.dtype} is not supported; use a floating dtype: one of {supported}")


# -- users' settings ------------------------------------------------------------------


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
                         f"in {_interval(low, high, high_open)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    if number < low or number > high or (high_open and number == high):
        raise ValueError(f"{name} must be in {_interval(low, high, high_open)}, got {shown(value)}")
    return number


def _interval(low: float, high: float, high_open: bool) -> str:
    return f"[{low}, {high}{')' if high_open else ']'}"


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
