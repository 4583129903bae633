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


def pytest_configure(config: pytest.Config) -> None:
    """The kernel choices the suite makes (graphdl.ops.choice) go to a file of the run's
    own, not the user's ~/.cache, unless GRAPHDL_CHOICES names one already (its
    subprocesses inherit it)."""
    if "GRAPHDL_CHOICES" not in os.environ:
        import tempfile
        os.environ["GRAPHDL_CHOICES"] = os.path.join(tempfile.mkdtemp(prefix="graphdl-test-choices-"), "choices.jsonl")
