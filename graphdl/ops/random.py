"""Randomness as data: dropout's mask, a pure function of a key.

`dropout_mask(key, x, p, seed)` is the same mask every time it is given the same key,
seed, p and shape: its randomness lives in the graph's values, not in a generator's
hidden state. A Dropout layer holds its key, a step counter, as model state (a float64
scalar buffer) and the training graph outputs the next one (key + 1), which the
training step writes back; so a run is reproduced by its starting model, resumes
exactly from a checkpoint (which holds the key), and every data-parallel rank draws
from the same stream. The mask is made on the device, from device tensors alone: no
host sync, and a CUDA graph that captures it replays a fresh mask at every step.

Being pure, it needs no exception in the passes: DCE may drop a mask nobody reads,
and CSE merges two masks only when their key, seed, p and input are the same, which
makes them equal. Two places that want independent masks use different keys or seeds
(each Dropout layer has its own seed).

The bits come from splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014): element i of the mask hashes stream + (i+1)*golden,
where stream hashes the key and seed. torch's int64 arithmetic wraps as the algorithm
needs; its right shifts are arithmetic, so each logical shift masks off the sign bits.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..checks import Shape, ShapeError, format_type
from ..ir import Value
from .registry import CODE_GLOBALS, defop


def _int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)
_BITS = 24  # a keep threshold on 24 random bits: p is honoured to within 2**-24


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on int64."""
    z.bitwise_xor_(z.bitwise_right_shift(30).bitwise_and_((1 << 34) - 1)).mul_(_MIX1)
    z.bitwise_xor_(z.bitwise_right_shift(27).bitwise_and_((1 << 37) - 1)).mul_(_MIX2)
    return z.bitwise_xor_(z.bitwise_right_shift(31).bitwise_and_((1 << 33) - 1))


def keep_threshold(p: float) -> int:
    """An element is kept when its 24 random bits are at least this: probability 1 - p."""
    return round(p * 2**_BITS)


def dropout_mask_kernel(key: torch.Tensor, like: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The mask: 1 / (1 - p) where an element is kept, 0 where it is dropped (all 0 for p=1)."""
    z = torch.add(_places(like.numel(), like.device), _stream(key, seed))
    keep = _mix_(z).bitwise_and_((1 << _BITS) - 1).ge_(keep_threshold(p)).view(like.shape)
    return keep.to(like.dtype).mul_(0.0 if p == 1 else 1.0 / (1.0 - p))


def _stream(key: torch.Tensor, seed: int) -> torch.Tensor | int:
    """The key's and seed's stream. On the CPU, where reading the key waits for nothing,
    it is hashed in Python: the same bits as the dozen 0-d tensor ops (~30 us of the
    digits CNN's ~130 us mask). Elsewhere, and under a dispatch mode (which records the
    ops to replay them, as a CUDA graph's stand-in does), it stays a tensor op; so does a
    key that is no whole number from 0 to 2**53 (which a step counter never leaves), whose
    conversion to int64 is the device's own (x86 makes every key from 2**63 up -2**63)."""
    if key.device.type == "cpu" and not torch._C._len_torch_dispatch_stack():
        k = key.item()
        if 0 <= k <= 2**53 and k == int(k):
            z = (int(k) * _GOLDEN + seed) % 2**64
            z = ((z ^ (z >> 30)) * _MIX1) % 2**64
            z = ((z ^ (z >> 27)) * _MIX2) % 2**64
            return _int64(z ^ (z >> 31))
    return _mix_(key.to(torch.int64).mul(_GOLDEN).add_(_int64(seed % 2**64)))


_PLACES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _places(n: int, device: torch.device) -> torch.Tensor:
    """(i + 1) * golden for i < n, int64, kept for the last few sizes (a mask per step
    at the same size would make it again each time: ~25 us at 8,192 elements)."""
    places = _PLACES.get((n, device))
    if places is None:
        if len(_PLACES) >= 8:
            _PLACES.pop(next(iter(_PLACES)))
        places = _PLACES[(n, device)] = torch.arange(1, n + 1, dtype=torch.int64, device=device).mul_(_GOLDEN)
    return places


CODE_GLOBALS["rng"] = sys.modules[__name__]  # what the generated code calls


def dropout_mask_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    key, x = inputs
    if key.shape != () or key.dtype != torch.float64:
        raise ShapeError(f"the key {key.label} is {format_type(key.dtype, key.shape)}; a key is an f64[] step counter",
                         "give the mask a Dropout layer's key (a 0-d float64 tensor holding a whole number)")
    p, seed = attrs["p"], attrs["seed"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
        raise ShapeError(f"p={p!r} must be a probability in [0, 1]", "p is the chance that an element is dropped")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ShapeError(f"seed={seed!r} must be a whole number from 0 to 2**63 - 1")
    return x.shape, x.dtype, {"p": float(p)}


dropout_mask = defop(
    "dropout_mask", "rng.dropout_mask_kernel({0}, {1}, {seed}, {p})", dropout_mask_rule,
    lambda g, out, key, x, p, seed: [None, None], arity=2, attrs={"p": 0.5, "seed": 0}, new_storage=True,
    doc="A dropout mask of x's shape and dtype: each element 1 / (1 - p) with probability 1 - p, else 0, "
        "drawn from the key (an f64[] counter) and seed; x is read for its shape alone. The same key, "
        "seed, p and shape give the same mask, on any device.")
