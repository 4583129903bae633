"""Constant folding: a node computed only from constants becomes one constant."""

from __future__ import annotations

import math

import torch

from ..checks import dtype_name
from ..ir import Graph, Node
from ..ops.registry import CODE_GLOBALS, const
from .match import const_value, producer, rebuild


def fold(graph: Graph) -> tuple[Graph, bool]:
    """Evaluate every node whose inputs are all scalar `const` nodes, with the op's own
    lowering in its dtype, and replace it by a `const` holding the result.

    Constants are scalars and no op grows a shape out of scalars alone, so a result is
    always a scalar too. A result that is not finite is left unfolded: the text IR
    could not print it back.
    """
    changed = False
    for node in list(graph.nodes):
        if not _foldable(node):
            continue
        result = _evaluate(node)
        if result.dim() != 0 or result.dtype != node.out.dtype or not math.isfinite(float(result)):
            continue
        rebuild(graph, node, const, [], {"value": float(result), "dtype": dtype_name(result.dtype)})
        changed = True
    return graph, changed


def _foldable(node: Node) -> bool:
    """A node of scalar `const` inputs only, and no collective (those run at run time)."""
    return not (node.op is const or not node.inputs or node.op.collective
                or any(producer(v, const) is None for v in node.inputs))


def _evaluate(node: Node) -> torch.Tensor:
    """The node's result, computed by its op's own lowering from its constants, in their dtypes."""
    env = dict(CODE_GLOBALS)
    args = []
    for i, v in enumerate(node.inputs):
        env[f"a{i}"] = torch.tensor(const_value(v), dtype=v.dtype)
        args.append(f"a{i}")
    return eval(node.op.lower(args, node.attrs, node.inputs), env)  # noqa: S307 - registry code
