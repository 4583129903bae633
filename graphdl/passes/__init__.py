"""Graph passes. Each is a small function `Graph -> (Graph, changed)` that edits the
graph it is given in place (callers that must keep theirs pass a copy); `pipeline` runs
them to a fixed point, as compile does."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from ..ir import Graph
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
    """Run `passes` (default PASSES) in order, round after round, until each has run
    once on the graph as it stands without changing it; a final DCE drops what the last
    round left dead.

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
    # Stop as soon as the last len(passes) runs changed nothing, not at the end of a
    # round: when only a round's first pass (DCE) changes the graph, the passes after it
    # have already seen the result, and another round would find nothing (on a deep
    # net's gradient graph that saves 4 of 15 pass runs, a sixth of the pipeline's time).
    unchanged = 0  # passes run in a row without a change
    for name, run in itertools.islice(itertools.cycle(passes), max_rounds * len(passes)):
        graph, changed = run(graph)
        unchanged = 0 if changed else unchanged + 1
        if log is not None:
            log(f"// after {name}\n{graph}" if changed else f"// after {name}: no change")
        if unchanged == len(passes):
            break
    graph, changed = dce(graph)
    if log is not None and changed:
        log(f"// after dce\n{graph}")
    return graph


__all__ = ["PASSES", "cse", "dce", "fold", "fuse", "pipeline", "plan_inplace", "simplify"]
