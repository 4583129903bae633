"""Graph passes. Each is a small function `Graph -> (Graph, changed)` that edits the
graph it is given in place (callers that must keep theirs pass a copy); `pipeline` runs
them to a fixed point, as compile does."""

from __future__ import annotations

from collections.abc import Callable

from ..ir import Graph
from .allreduce import allreduce
from .cse import cse
from .dce import dce
from .fold import fold
from .fuse import fuse
from .memory import plan_inplace
from .simplify import simplify

Pass = Callable[[Graph], tuple[Graph, bool]]

# Cleanup first, so use counts are real when fuse asks whether a value has other users.
PASSES: list[tuple[str, Pass]] = [("dce", dce), ("simplify", simplify), ("fold", fold), ("cse", cse),
                                  ("fuse", fuse)]


def pipeline(graph: Graph, log: Callable[[str], object] | None = None, passes: list[tuple[str, Pass]] | None = None,
             max_rounds: int = 10) -> Graph:
    """Run `passes` (default PASSES) in order, round after round, until none changes
    the graph; a final DCE drops what the last round left dead.

    Args:
        graph: edited in place and returned.
        log: called with the IR text before the first pass and after each pass that
            changed it (e.g. `print`), and a one-line note after each that did not.
        passes: (name, pass) pairs.
        max_rounds: a bound on the rounds, in case two rewrites ever undo each other.

    Returns:
        The optimised graph.
    """
    passes = PASSES if passes is None else passes
    if log is not None:
        log(f"// input\n{graph}")
    for _ in range(max_rounds):
        changed_any = False
        for name, run in passes:
            graph, changed = run(graph)
            changed_any |= changed
            if log is not None:
                log(f"// after {name}\n{graph}" if changed else f"// after {name}: no change")
        if not changed_any:
            break
    graph, changed = dce(graph)
    if log is not None and changed:
        log(f"// after dce\n{graph}")
    return graph


__all__ = ["PASSES", "allreduce", "cse", "dce", "fold", "fuse", "pipeline", "plan_inplace", "simplify"]
