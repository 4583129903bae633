"""Collectives: the all-reduce of data-parallel training, as ops.

Data-parallel training sums every gradient over the processes (ranks) with an
all-reduce. graphdl.passes.allreduce inserts these ops into a gradient graph, packing
gradients into flat buckets; their code calls torch.distributed through
graphdl.distributed. Every rank runs the same graph, so all issue the same collectives
in the same order. They have no VJP: a graph is differentiated before it is reduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import distributed
from ..checks import Shape, ShapeError, format_shape
from ..ir import Value
from .registry import CODE_GLOBALS, VARIADIC, Collective, defop, same_dtype


def _known_size(v: Value) -> int:
    if not all(isinstance(d, int) for d in v.shape):
        raise ShapeError(f"{v.label} has the shape {format_shape(v.shape)}; a bucket packs values of fixed size",
                         "all-reduce the gradients of params, whose shapes are fixed")
    return math.prod(v.shape)


def allreduce_start_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    dtype = same_dtype(inputs)
    total = 0
    for v in inputs:
        total += _known_size(v)
    return (total,), dtype


def allreduce_wait_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype]:
    (pending,) = inputs
    if pending.node is None or pending.node.op is not allreduce_start:
        raise ShapeError(f"{pending.label} is not the result of an allreduce_start",
                         "wait on what allreduce_start returns")
    return pending.shape, pending.dtype


def unpack_rule(inputs: list[Value], attrs: Mapping[str, Any]) -> tuple[Shape, torch.dtype, dict[str, Any]]:
    (flat,) = inputs
    offset, shape = attrs["offset"], attrs["shape"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ShapeError(f"offset={offset!r} must be a whole number >= 0")
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ShapeError(f"shape {shape!r} must be a tuple of whole numbers >= 0")
    shape = tuple(shape)
    size = _known_size(flat)
    if flat.ndim != 1 or offset + math.prod(shape) > size:
        raise ShapeError(f"elements {offset}..{offset + math.prod(shape)} ({format_shape(shape)}) do not lie "
                         f"inside the flat buffer {format_shape(flat.shape)}",
                         "unpack a 1-d buffer within its length")
    return shape, flat.dtype, {"shape": shape}


def _unpack_code(args: list[str], attrs: dict, inputs: list[Value]) -> str:
    offset, shape = attrs["offset"], attrs["shape"]
    return f"{args[0]}[{offset}:{offset + math.prod(shape)}].view({shape!r})"


allreduce_start = defop(
    "allreduce_start", lambda args, attrs, inputs: f"collective.allreduce_start({', '.join(args)})",
    allreduce_start_rule, None, arity=VARIADIC, collective=Collective(read_by="allreduce_wait"),
    doc="Pack the inputs into one flat buffer and start summing it over every rank, without "
        "waiting; the result is the operation in flight, which only allreduce_wait reads.",
)

allreduce_wait = defop(
    "allreduce_wait", "{0}.wait()", allreduce_wait_rule, None, collective=Collective(read_by="unpack"),
    doc="Wait for an allreduce_start to finish: the flat buffer summed over every rank.",
)

# A view of the buffer, but a disjoint slice of one that only unpacks read (read_by), so
# writing into it touches nothing else: `new_storage` lets compile return it without a copy.
unpack = defop("unpack", _unpack_code, unpack_rule, None, attrs={"offset": 0, "shape": ()}, new_storage=True,
               doc="The elements offset.. of a flat buffer, viewed as `shape` (a gradient out of a bucket).")


CODE_GLOBALS["collective"] = distributed  # the runtime the collectives' code calls
