"""Graph passes. Each is a small function `Graph -> (Graph, changed)` that edits the
graph it is given in place (callers that must keep theirs pass a copy)."""

from .dce import dce

__all__ = ["dce"]
