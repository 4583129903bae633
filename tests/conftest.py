"""Fixtures shared by the test files."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def dot_program() -> str:
    """The path of Graphviz's `dot`; skips the test without it, or fails it when CI sets
    GRAPHDL_REQUIRE_DOT (so a broken CI image cannot silently skip the drawing tests)."""
    path = shutil.which("dot")
    if path is None:
        if os.environ.get("GRAPHDL_REQUIRE_DOT"):
            pytest.fail("GRAPHDL_REQUIRE_DOT is set but Graphviz's `dot` program is not on PATH; install graphviz")
        pytest.skip("Graphviz's `dot` program is not installed (apt-get install graphviz); "
                    "set GRAPHDL_REQUIRE_DOT=1 to make this a failure")
    return path
