"""Instrumented variants of the compiled code: the same lines, with a probe's around each node.

The profiler (graphdl.profiler) times every node's line; the search for the first
non-finite value after a divergence (graphdl.numerics) checks every node's result. Both
need the code fit runs, not an imitation of it, so both lower the graph through a
subclass of the compiler's emitter (`compile._Emitter`, or `_ArenaEmitter` for the
arena form fit's step runs) that writes each node's line exactly as the plain emitter
does, with the probe's lines before and after it (before the `del` of the values that
die there, so the probe can still read the node's inputs). Every probe line ends in
`# probe`, so `strip` gives back the plain source: the tests compare it with the code
that really runs.

Nothing here is imported unless a profile or a divergence asks for it: the code fit and
compile generate is untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch

from .compile import Compiled, _ArenaEmitter, _Emitter, lower
from .ir import Graph, Node

MARK = "  # probe"


class Probe(Protocol):
    """What to write around each node's line (hoisted constants get none)."""

    env: dict[str, Any]  # globals the probe's lines read

    def before(self, k: int, node: Node) -> list[str]: ...

    def after(self, k: int, node: Node, out: str, inputs: list[str]) -> list[str]: ...


class _Probed:
    """The mixin: the emitter's lines for node k, with the probe's around them."""

    probe: Probe
    body: list[str]
    hoisted: set[int]
    names: dict[int, str]
    env: dict[str, Any]

    def _emit(self, k: int, node: Node, returned: set[int]) -> None:
        if id(node.out) in self.hoisted:
            super()._emit(k, node, returned)  # type: ignore[misc]
            return
        self.body.extend(line + MARK for line in self.probe.before(k, node))
        start = len(self.body)
        super()._emit(k, node, returned)  # type: ignore[misc]
        frees = self.body[start + 1:]  # the `del` after the node's line, if any
        del self.body[start + 1:]
        inputs = [self.names[id(v)] for v in node.inputs]
        self.body.extend(line + MARK for line in self.probe.after(k, node, self.names[id(node.out)], inputs))
        self.body.extend(frees)


class _ProbedEmitter(_Probed, _Emitter):
    def __init__(self, graph: Graph, device: torch.device | None, reuse: bool, probe: Probe) -> None:
        super().__init__(graph, device, reuse)
        self.probe = probe
        self.env.update(probe.env)


class _ProbedArenaEmitter(_Probed, _ArenaEmitter):
    def __init__(self, graph: Graph, device: torch.device | None, reuse: bool, probe: Probe) -> None:
        super().__init__(graph, device, reuse)
        self.probe = probe
        self.env.update(probe.env)


def lower_probed(graph: Graph, probe: Probe, device: torch.device | None = None, reuse: bool = True,
                 arena: bool = False) -> Compiled:
    """`compile.lower(graph, device, reuse, arena)` with `probe`'s lines around every node."""
    emitter = _ProbedArenaEmitter if arena else _ProbedEmitter
    return lower(graph, device, reuse, arena, emitter=functools.partial(emitter, probe=probe))


def strip(source: str) -> str:
    """The source without the probe's lines: the plain emitter's code."""
    return "".join(line for line in source.splitlines(True) if not line.rstrip("\n").endswith(MARK))
