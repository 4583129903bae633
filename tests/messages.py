"""Helpers for the tests of error messages: the message a call raises, and its parts."""

from __future__ import annotations

import re

import pytest

import graphdl as gd


def message(fn, *args, **kwargs) -> str:
    """The GraphError message `fn(*args, **kwargs)` raises."""
    with pytest.raises(gd.GraphError) as err:
        fn(*args, **kwargs)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def names(msg: str, *parts: str) -> None:
    """Every part (a regex) appears in the message."""
    for part in parts:
        assert re.search(part, msg), f"{part!r} not in:\n{msg}"
