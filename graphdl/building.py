"""What every graph builder shares, whatever it builds: where in the user's code a call
came from (`caller_location`: each node records it and each error names it), and
Python's cycle collector paused while a graph is built node by node (`pauses_gc`).

It imports nothing of graphdl; graphdl.ir and the builders (text, autodiff, compile)
import it.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Frames a user's call passes through on its way into graphdl but did not write: graphdl's
# own, and torch's decorators (fit runs under @torch.inference_mode()).
_NOT_USER_CODE = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)))


def caller_location() -> str:
    """file:line of the innermost frame outside graphdl (and torch), where the user built a node."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_NOT_USER_CODE):
        frame = frame.f_back
    if frame is None:
        return "<graphdl>"
    return f"{_display_path(frame.f_code.co_filename, os.getcwd())}:{frame.f_lineno}"


@functools.lru_cache(maxsize=256)
def _display_path(filename: str, cwd: str) -> str:
    # Cached: os.path.relpath costs 5 µs, paid once per node built: a third of grad's time.
    return os.path.relpath(filename, cwd)


def pauses_gc(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` (grad, parse, compile: each builds a graph node by node) with Python's
    cycle collector paused; it runs again, as usual, once `fn` returns.

    Every full collection walks every object alive, and one comes each time the heap
    grows by a quarter, so building a graph of n nodes walks the objects of the n
    already built again and again: on a 44,000-node gradient graph grad + print +
    parse + compile took 5.3 s of CPU time with the collector running, 3.3 s with it
    paused here.
    """
    @functools.wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return paused
